"""Routing-step time of every router relative to Softmax Expert Choice.

Run: `KERAS_BACKEND=jax python -m benchmarks.routing_step`.

One router call (gating logits, the allocation algorithm, the sparse
`Routing` tensors; evaluation mode, so no noise) on the same input for every
router: G=8 groups of S=8*65=520 tokens, E=32 experts, d=384. Token Choice
routers use K=2 at capacity factor 1.05 (the V-MoE recipe), Expert Choice
routers factor 2.0 (the same expert compute), Soft MoE 2*S/E slots per
expert. On JAX each router call is jitted (`stateless_call` under
`jax.jit`); other backends run eagerly. All routers are measured side by
side in one process: warm-up, then the median of repeated runs.

One more row, `SOLVE_FLOOR`, bounds what any faster selection could give the
Sparsity-constrained router. It times the router's sparse OT solve alone
(`sparse_ot_plan_with_top_k` on the router's similarities) with each of its
top-k calls replaced by taking the first k tokens of every expert column:
no selection at all, the same shapes and the same elementwise work (wrong
routing, of course). Whatever selection algorithm the solver used, the
router's step could not cost less than the gating plus this row.
"""

import time
from unittest import mock

import keras
import numpy as np
from keras import ops

from benchmarks.common import interleaved_median_times, markdown_table
from keras_vmoe import routers
from keras_vmoe.ot import sparse

G, S, E, D = 8, 8 * 65, 32, 384
BASELINE = "softmax_expert_choice"
# Each router at its setting in the paper's presets (its `preset_recipe`).
ROUTER_SETTINGS = {
    name: routers.get_class(name).preset_recipe().router_config
    for name in routers.router_names()
    if routers.get_class(name).preset_recipe() is not None
}
SPARSITY = "sparsity_constrained_expert_choice"
SOLVE_FLOOR = "sparse OT solve alone, no top-k (floor)"


def _first_k_and_threshold(x, k, lower_bound=None):
    """The solver's `_top_k_and_threshold` without the selection.

    Takes the first `k` entries of each row as the "top-k" and computes the
    simplex threshold over them as the solver does; skips the pruning pass
    (`lower_bound`), which only serves the selection.
    """
    del lower_bound
    values = x[..., :k]  # (..., k)
    indices = ops.broadcast_to(ops.arange(k, dtype="int32"), values.shape)
    return values, indices, sparse.simplex_threshold(values)


def _solve_floor_step(router, x):
    """A step running the router's solve with `_first_k_and_threshold`.

    Args:
        router: a built `SparsityConstrainedExpertChoiceRouter`.
        x: np.ndarray. Token groups `(G, S, d)`.

    Returns:
        `(step, compile_seconds)` as `make_step`.
    """
    _, logits = router.gating_logits(ops.convert_to_tensor(x), False)
    similarity = ops.softmax(logits, axis=-1)  # (G, S, E)
    capacity = router.slots_per_expert(S, training=False)

    def solve(similarity):
        with mock.patch.object(sparse, "_top_k_and_threshold", _first_k_and_threshold):
            return sparse.sparse_ot_plan_with_top_k(
                similarity, capacity, router.num_steps, router.learning_rate
            )

    if keras.backend.backend() != "jax":

        def step():
            return [ops.convert_to_numpy(t) for t in solve(similarity)]

        return step, 0.0

    import jax

    start = time.perf_counter()
    compiled = jax.jit(solve).lower(similarity).compile()
    compile_seconds = time.perf_counter() - start
    return lambda: jax.block_until_ready(compiled(similarity)), compile_seconds


def _routing_tensors(routing):
    """The tensors a `Routing` carries (sparse slots or soft weights)."""
    if isinstance(routing, routers.SparseRouting):
        return routing.slot_token, routing.slot_mask, routing.slot_weight
    return routing.dispatch_weights, routing.combine_weights


def make_step(router, x):
    """A function running one routing step and blocking until it is done.

    Args:
        router: keras.layers.Layer. A router layer.
        x: np.ndarray. Token groups `(G, S, d)`.

    Returns:
        `(step, compile_seconds)`; `compile_seconds` is 0 off JAX.
    """
    router(x)  # build
    if keras.backend.backend() != "jax":
        x = ops.convert_to_tensor(x)

        def step():
            return [ops.convert_to_numpy(t) for t in _routing_tensors(router(x))]

        return step, 0.0

    import jax

    trainable = [v.value for v in router.trainable_variables]
    non_trainable = [v.value for v in router.non_trainable_variables]

    def route(trainable, non_trainable, x):
        routing, _ = router.stateless_call(trainable, non_trainable, x, training=False)
        return _routing_tensors(routing)

    x = jax.numpy.asarray(x)
    start = time.perf_counter()
    compiled = jax.jit(route).lower(trainable, non_trainable, x).compile()
    compile_seconds = time.perf_counter() - start

    def step():
        return jax.block_until_ready(compiled(trainable, non_trainable, x))

    return step, compile_seconds


def run(rounds=5, per_round=4, warmup=3, names=None):
    """Times every router's routing step on one shared input.

    Args:
        rounds: int. Interleaved timing rounds. Defaults to 5.
        per_round: int. Timed runs per router and round (the median over
            all of them is reported). Defaults to 4.
        warmup: int. Untimed runs first. Defaults to 3.
        names: list of str. Routers to time (registry names); the baseline
            is always included. Defaults to all six. The `SOLVE_FLOOR` row
            is added when the Sparsity-constrained router is timed.

    Returns:
        list of dicts, one per router (and `SOLVE_FLOOR`): `router`,
        `capacity`, `median_ms`, `compile_s`, `ratio_vs_softmax_ec` (median
        time over the baseline's).
    """
    names = list(names or ROUTER_SETTINGS)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(G, S, D)).astype("float32")
    steps, results = {}, []
    for name in names:
        router = routers.get(name, num_experts=E, **ROUTER_SETTINGS[name])
        steps[name], compile_seconds = make_step(router, x)
        capacity = int(_routing_tensors(router(x))[0].shape[-1])
        results.append(
            {"router": name, "capacity": capacity, "compile_s": compile_seconds}
        )
        if name == SPARSITY:
            steps[SOLVE_FLOOR], compile_seconds = _solve_floor_step(router, x)
            results.append(
                {
                    "router": SOLVE_FLOOR,
                    "capacity": capacity,
                    "compile_s": compile_seconds,
                }
            )
    medians = interleaved_median_times(steps, rounds * per_round, warmup)
    baseline = medians[BASELINE]
    for row in results:
        row["median_ms"] = 1e3 * medians[row["router"]]
        row["ratio_vs_softmax_ec"] = medians[row["router"]] / baseline
    return results


COLUMNS = ["router", "capacity", "median_ms", "compile_s", "ratio_vs_softmax_ec"]


if __name__ == "__main__":
    print(
        f"Routing step, backend {keras.backend.backend()}: G={G}, S={S}, E={E}, "
        f"d={D}; median ms and ratio to {BASELINE}.\n"
    )
    print(markdown_table(run(), COLUMNS))
