"""MoE layer forward+backward time relative to a dense MLP of equal compute.

Run: `KERAS_BACKEND=jax python -m benchmarks.moe_layer` (JAX only).

Shape (the paper's B/32-like group): d=384, h=1536, E=8, 8 groups of
8 images x 65 tokens = 520 tokens. Every sparse router processes 520 expert
slots per group (Token Choice K=1 at factor 1; Expert Choice factor 1;
Soft MoE 65 slots per expert), the same per-token compute as the dense MLP
d->h->d. Capacities are not rounded to multiples of 4 here, so that the
routers and the dense MLP do exactly the same expert FLOPs. "routing ms"
is the layer's router alone (forward, evaluation mode) on the same groups,
timed in the same turns, and "routing share" its fraction of the layer. One more row
runs Soft MoE in its own setting (one image per group, 8 slots per expert:
64 slots for 65 tokens), where its dispatch and combine cost 8x less, and
one the expert matmuls alone on the slots `(E, G, C, d)`.
"""

import keras
import numpy as np

from benchmarks.common import interleaved_median_times, jax_train_step, markdown_table
from benchmarks.routing_step import make_step
from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE

D, H, E = 384, 1536, 8
EXPERTS_ONLY = "experts only (no routing, dispatch or combine)"
IMAGES_PER_GROUP, TOKENS_PER_IMAGE, GROUPS = 8, 65, 8
S = IMAGES_PER_GROUP * TOKENS_PER_IMAGE

# Every router fills S / E = 65 slots per expert (one slot per token, the
# dense MLP's compute): each router's settings for that budget.
BUDGET = routers.ComputeBudget.from_capacity_factor(S, E, 1, 1.0)
ROUTER_SETTINGS = {
    name: routers.get_class(name).equal_compute_config(BUDGET)
    for name in routers.router_names()
}


def dense_mlp():
    return keras.Sequential(
        [
            keras.layers.Dense(H, activation="gelu", name="dense_in"),
            keras.layers.Dense(D, name="dense_out"),
        ],
        name="dense_mlp",
    )


def make_moe(name, use_einsum_dispatch=False, group_size=S):
    kwargs = dict(ROUTER_SETTINGS[name], num_experts=E)
    return MoE(
        routers.get(name, **kwargs),
        MlpExperts(E, H),
        group_size=group_size,
        use_einsum_dispatch=use_einsum_dispatch,
    )


def run(repeats=10, router_names=None):
    """Rows of {layer, ms, ratio, compile s}; all variants timed in turns."""
    x = np.random.default_rng(0).normal(
        size=(GROUPS * IMAGES_PER_GROUP, TOKENS_PER_IMAGE, D)
    )
    x = x.astype("float32")
    variants = {"dense MLP": dense_mlp()}
    for name in router_names or ROUTER_SETTINGS:
        for einsum in (False, True):
            label = f"{name} ({'einsum' if einsum else 'index'} dispatch)"
            variants[label] = make_moe(name, use_einsum_dispatch=einsum)
    # Soft MoE in its own setting: one image per group, 8 slots per expert.
    variants["soft, 1 image per group (index dispatch)"] = MoE(
        routers.get("soft", num_experts=E, num_slots=8),
        MlpExperts(E, H),
        group_size=TOKENS_PER_IMAGE,
    )
    steps, compile_seconds = {}, {}
    for label, layer in variants.items():
        steps[label], compile_seconds[label], _ = jax_train_step(layer, x)
    # The expert matmuls alone on the slots (E, G, C, d), C = S / E: what
    # the sparse layers would cost if routing, dispatch and combine were free.
    slots = np.random.default_rng(1).normal(size=(E, GROUPS, S // E, D))
    label = EXPERTS_ONLY
    steps[label], compile_seconds[label], _ = jax_train_step(
        MlpExperts(E, H), slots.astype("float32")
    )
    variants[label] = None
    # Each index-dispatch layer's routing step alone (its router's forward
    # on the same groups), timed in the same turns: the router's share.
    routing_labels = {}
    for label, layer in variants.items():
        if label.endswith("(index dispatch)"):
            groups = x.reshape(-1, layer.group_size, D)
            routing_labels[label] = f"{label} routing step"
            steps[routing_labels[label]], _ = make_step(layer.router, groups)
    times = interleaved_median_times(steps, repeats)
    dense = times["dense MLP"]
    rows = []
    for label in variants:
        t = times[label]
        routing = times.get(routing_labels.get(label))
        rows.append(
            {
                "layer": label,
                "ms": t * 1e3,
                "ratio": t / dense,
                "compile s": compile_seconds[label],
                "routing ms": "" if routing is None else routing * 1e3,
                "routing share": "" if routing is None else f"{100 * routing / t:.1f}%",
            }
        )
    return rows


COLUMNS = ["layer", "ms", "ratio", "compile s", "routing ms", "routing share"]

if __name__ == "__main__":
    print(markdown_table(run(), COLUMNS))
