"""Tests of the optimal-transport routers (Sinkhorn Token Choice, Sinkhorn
Expert Choice, Sparsity-constrained Expert Choice: docs/routers.md).

Each router's routing is compared with an independent NumPy computation
written here from the definitions (float64 loops, no package code).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.routers.sinkhorn_expert_choice import SinkhornExpertChoiceRouter
from keras_vmoe.routers.sinkhorn_token_choice import SinkhornTokenChoiceRouter
from keras_vmoe.routers.sparsity_constrained_expert_choice import (
    SparsityConstrainedExpertChoiceRouter,
)

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2, 12, 8)).astype("float32")
KERNEL = RNG.normal(size=(8, 4)).astype("float32")
NOISE = (0.8 * RNG.normal(size=(2, 12, 4))).astype("float32")
ROUTER_CLASSES = [
    SinkhornTokenChoiceRouter,
    SinkhornExpertChoiceRouter,
    SparsityConstrainedExpertChoiceRouter,
]


# ----------------------------------------------------------------------------
# Independent NumPy reference.
# ----------------------------------------------------------------------------
def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_sinkhorn(logits, num_iters=20):
    """Kernel-form Sinkhorn, u = v = 1 start, columns then rows."""
    out = []
    for scores in logits:
        s, e = scores.shape
        kernel = np.exp(scores)
        u, v = np.ones(s), np.ones(e)
        for _ in range(num_iters):
            v = (s / e) / (kernel.T @ u)
            u = 1.0 / (kernel @ v)
        out.append(u[:, None] * kernel * v[None, :])
    return np.stack(out)


def np_top(values, k):
    """Indices of the k largest values, lower index first on ties."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def np_simplex(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = max(j for j in range(1, len(v) + 1) if u[j - 1] > (css[j - 1] - 1) / j)
    return np.maximum(v - (css[rho - 1] - 1) / rho, 0.0)


def np_sparse_ot(similarity, k, num_steps=20, lr=0.01):
    """Adam on the k-sparse semi-dual, then P[:, j] = b * p_j."""
    out = []
    for sim in similarity:
        s, e = sim.shape
        b = s / e

        def plan(alpha, sim=sim, b=b, s=s, e=e):
            p = np.zeros((s, e))
            for j in range(e):
                z = (alpha + sim[:, j]) / b
                top = np_top(z, k)
                p[top, j] = b * np_simplex(z[top])
            return p

        alpha, m, v = np.zeros(s), np.zeros(s), np.zeros(s)
        for t in range(1, num_steps + 1):
            g = plan(alpha).sum(axis=1) - 1.0
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            alpha -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        out.append(plan(alpha))
    return np.stack(out)


def np_token_choice(scores, weights, k, capacity, batch_priority=False):
    """Combine tensor (G, S, E, C): choice-rank order, then token order."""
    g_count, s, e = scores.shape
    out = np.zeros((g_count, s, e, capacity))
    for g in range(g_count):
        choices = [np_top(scores[g, i], k) for i in range(s)]
        order = list(range(s))
        if batch_priority:
            order.sort(key=lambda i: (-scores[g, i].max(), i))
        used = [0] * e
        for rank in range(k):
            for i in order:
                j = choices[i][rank]
                if used[j] < capacity:
                    out[g, i, j, used[j]] = weights[g, i, j]
                    used[j] += 1
    return out


def np_expert_choice(scores, weights, capacity):
    """Combine tensor (G, S, E, C): each expert's top-C tokens, by rank."""
    g_count, s, e = scores.shape
    out = np.zeros((g_count, s, e, capacity))
    for g in range(g_count):
        for j in range(e):
            for c, i in enumerate(np_top(scores[g, :, j], min(capacity, s))):
                out[g, i, j, c] = weights[g, i, j]
    return out


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
def np_(x):
    return ops.convert_to_numpy(x)


def built(router, noise=None):
    """Router with the known gating kernel; optional fixed training noise."""
    router.build(X.shape)
    router.gating_kernel.assign(KERNEL)
    if noise is not None:
        # Replace the random gating noise by a known one (training only).
        router.add_noise = lambda logits, training=False: (
            ops.add(logits, ops.convert_to_tensor(noise)) if training else logits
        )
    return router


CLEAN = X.astype("float64") @ KERNEL.astype("float64")  # (G, S, E)
NOISY = CLEAN + NOISE


def assert_routing(routing, expected_combine):
    np.testing.assert_allclose(
        np_(routing.combine_tensor()), expected_combine, atol=1e-5
    )
    np.testing.assert_array_equal(
        np_(routing.dispatch_tensor()), (expected_combine > 0).astype("float32")
    )


# ----------------------------------------------------------------------------
# Routing equals NumPy.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_priority", [False, True])
def test_sinkhorn_token_choice_equals_numpy(batch_priority):
    router = built(
        SinkhornTokenChoiceRouter(
            4,
            capacity_factor=1.0,
            capacity_multiple_of=1,
            batch_priority=batch_priority,
        )
    )
    routing = router(X, training=False)
    assert routing.capacity == 6  # ceil(12 * 2 * 1.0 / 4)
    plan = np_sinkhorn(CLEAN)
    expected = np_token_choice(plan, np_softmax(CLEAN), 2, 6, batch_priority)
    assert (expected > 0).sum() < 2 * 2 * 12  # some choices were dropped
    assert_routing(routing, expected)
    assert routing.auxiliary_loss is None


def test_sinkhorn_token_choice_plan_on_noisy_logits_weights_on_clean():
    router = built(
        SinkhornTokenChoiceRouter(4, capacity_factor=1.0, capacity_multiple_of=1),
        noise=NOISE,
    )
    routing = router(X, training=True)
    expected = np_token_choice(np_sinkhorn(NOISY), np_softmax(CLEAN), 2, 6)
    # The noise changes which experts are chosen.
    assert not np.array_equal(
        expected > 0, np_token_choice(np_sinkhorn(CLEAN), np_softmax(CLEAN), 2, 6) > 0
    )
    assert_routing(routing, expected)


def test_sinkhorn_token_choice_batch_priority_uses_max_plan_value():
    # Capacity 1, K=1, all tokens prefer expert 0 on the logits; BPR must give
    # the slot to the token with the largest plan value, not the first token.
    router = built(
        SinkhornTokenChoiceRouter(
            4, num_selected_experts=1, capacity=1, batch_priority=True
        )
    )
    routing = router(X, training=False)
    plan = np_sinkhorn(CLEAN)
    expected = np_token_choice(plan, np_softmax(CLEAN), 1, 1, batch_priority=True)
    assert_routing(routing, expected)
    for g in range(2):
        for j in range(4):
            tokens = [i for i in range(12) if plan[g, i].argmax() == j]
            if tokens:
                best = max(tokens, key=lambda i: plan[g, i].max())
                assert expected[g, best, j, 0] > 0


def test_sinkhorn_token_choice_optional_losses():
    router = built(
        SinkhornTokenChoiceRouter(4, importance_loss_weight=0.5, seed=0),
    )
    routing = router(X, training=False)
    importance = np.array(
        [(q.var() / q.mean() ** 2) for q in np_softmax(CLEAN).sum(axis=1)]
    )
    np.testing.assert_allclose(np_(routing.auxiliary_loss), 0.5 * importance, rtol=1e-4)
    assert set(routing.auxiliary_losses) == {"importance_loss"}


def test_sinkhorn_expert_choice_equals_numpy():
    router = built(
        SinkhornExpertChoiceRouter(4, capacity_factor=1.0, capacity_multiple_of=1)
    )
    routing = router(X, training=False)
    assert routing.capacity == 3  # ceil(12 * 1.0 / 4)
    expected = np_expert_choice(np_sinkhorn(CLEAN), np_softmax(CLEAN), 3)
    assert_routing(routing, expected)
    # The plan, not the softmax, decides the tokens.
    by_softmax = np_expert_choice(np_softmax(CLEAN), np_softmax(CLEAN), 3)
    assert not np.array_equal(expected > 0, by_softmax > 0)
    assert routing.auxiliary_loss is None


def test_sinkhorn_expert_choice_noisy_plan_and_noisy_weights():
    router = built(
        SinkhornExpertChoiceRouter(4, capacity_factor=2.0, num_iters=5), noise=NOISE
    )
    routing = router(X, training=True)
    assert routing.capacity == 8  # ceil(12 * 2 / 4) = 6 -> 8
    expected = np_expert_choice(np_sinkhorn(NOISY, 5), np_softmax(NOISY), 8)
    assert_routing(routing, expected)


@pytest.mark.parametrize("capacity_factor, capacity", [(1.0, 3), (2.0, 6)])
def test_sparsity_constrained_expert_choice_equals_numpy(capacity_factor, capacity):
    router = built(
        SparsityConstrainedExpertChoiceRouter(
            4, capacity_factor=capacity_factor, capacity_multiple_of=1
        )
    )
    routing = router(X, training=False)
    assert routing.capacity == capacity
    similarity = np_softmax(CLEAN)
    plan = np_sparse_ot(similarity, capacity)
    assert np.all((plan > 0).sum(axis=1) <= capacity)
    expected = np_expert_choice(plan, similarity, capacity)
    assert_routing(routing, expected)
    assert routing.auxiliary_loss is None


def test_sparsity_constrained_solver_settings_and_no_noise_by_default():
    router = built(
        SparsityConstrainedExpertChoiceRouter(
            4, capacity=4, num_steps=7, learning_rate=0.1, seed=0
        )
    )
    train = router(X, training=True)  # noise_std defaults to 0: same as eval
    evaluation = router(X, training=False)
    np.testing.assert_array_equal(np_(train.slot_token), np_(evaluation.slot_token))
    similarity = np_softmax(CLEAN)
    plan = np_sparse_ot(similarity, 4, num_steps=7, lr=0.1)
    assert_routing(evaluation, np_expert_choice(plan, similarity, 4))


def _sparse_router_and_reference(x, kernel, capacity):
    """A built router with `kernel`, and expert_choice on its solver's plan."""
    from keras_vmoe.routers.allocation import expert_choice

    router = SparsityConstrainedExpertChoiceRouter(
        kernel.shape[1], capacity=capacity, capacity_multiple_of=1
    )
    router.build(x.shape)
    router.gating_kernel.assign(kernel)
    similarity = ops.softmax(ops.matmul(x, kernel), axis=-1)
    plan = sparse_ot_plan_for(x, kernel, capacity)
    return router, expert_choice(plan, capacity, combine_weights=similarity)


def sparse_ot_plan_for(x, kernel, capacity):
    """The solver's plan on `softmax(x @ kernel)`, `(G, S, E)`."""
    from keras_vmoe.ot import sparse_ot_plan

    similarity = ops.softmax(ops.matmul(x, kernel), axis=-1)
    return sparse_ot_plan(similarity, capacity)


@pytest.fixture
def marked_fallback(monkeypatch):
    """Makes the router's fallback `expert_choice` return weights minus 10."""
    from keras_vmoe.routers import sparsity_constrained_expert_choice as module
    from keras_vmoe.routers.routing import SparseRouting

    unmarked = module.expert_choice

    def marked(plan, capacity, combine_weights=None):
        routing = unmarked(plan, capacity, combine_weights=combine_weights)
        return SparseRouting(
            routing.slot_token,
            routing.slot_mask,
            routing.slot_weight - 10.0,
            num_tokens=routing.num_tokens,
        )

    monkeypatch.setattr(module, "expert_choice", marked)


def _tokens_match(routing, reference):
    np.testing.assert_array_equal(np_(routing.slot_token), np_(reference.slot_token))
    np.testing.assert_array_equal(np_(routing.slot_mask), np_(reference.slot_mask))


def test_sparsity_constrained_reuses_the_solver_top_k(marked_fallback):
    # Distinct positive plan values: the slots come from the solver's last
    # top-k (no fallback, so no marked weights) and equal Expert Choice on
    # the plan.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 40, 8)).astype("float32")
    kernel = rng.normal(size=(8, 5)).astype("float32")
    router, reference = _sparse_router_and_reference(x, kernel, capacity=10)
    routing = router(x)
    _tokens_match(routing, reference)
    np.testing.assert_array_equal(np_(routing.slot_weight), np_(reference.slot_weight))


def test_sparsity_constrained_falls_back_on_tied_plan_values(marked_fallback):
    # Duplicated tokens that expert 0 prefers tie in its plan column: the
    # router falls back to Expert Choice on the plan (marked weights), which
    # orders the tie by token index.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 12, 8)).astype("float32")
    kernel = rng.normal(size=(8, 4)).astype("float32")
    x[:, 7] = x[:, 2] = 3.0 * kernel[:, 0] / np.linalg.norm(kernel[:, 0]) ** 2
    router, reference = _sparse_router_and_reference(x, kernel, capacity=6)
    routing = router(x)
    _tokens_match(routing, reference)
    np.testing.assert_allclose(
        np_(routing.slot_weight), np_(reference.slot_weight) - 10.0, atol=1e-6
    )


def test_sparsity_constrained_falls_back_on_fewer_positive_values(marked_fallback):
    # S = 2 tokens, E = 4 experts (b = 1/2), each token clearly preferring
    # its own expert: experts 0 and 1 get one non-zero plan value, fewer
    # than C = 2, so the fallback fills the zero-valued slot by token index.
    x = 20.0 * np.eye(2, 4, dtype="float32")[None]  # (1, 2, 4)
    kernel = np.eye(4, dtype="float32")
    router, reference = _sparse_router_and_reference(x, kernel, capacity=2)
    plan = ops.convert_to_numpy(sparse_ot_plan_for(x, kernel, capacity=2))
    assert np.any((plan > 0).sum(axis=1) < 2)
    routing = router(x)
    _tokens_match(routing, reference)
    np.testing.assert_allclose(
        np_(routing.slot_weight), np_(reference.slot_weight) - 10.0, atol=1e-6
    )


# ----------------------------------------------------------------------------
# Inside the MoE layer: training, config, saving.
# ----------------------------------------------------------------------------
def make_model(router_class, **router_kwargs):
    router_kwargs.setdefault("seed", 0)
    inputs = keras.Input((6, 8))
    x = MoE(
        router_class(4, **router_kwargs),
        MlpExperts(4, 16, seed=0),
        group_size=12,
        name="moe",
    )(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("router_class", ROUTER_CLASSES)
def test_fit_in_moe_lowers_loss(router_class):
    keras.utils.set_random_seed(0)
    model = make_model(router_class)
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 8)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int32") + (x[:, :, 1].mean(1) > 0.3)
    moe = model.get_layer("moe")
    kernel_before = np_(moe.router.gating_kernel).copy()
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.85 * losses[0]
    # The gating kernel learns through the softmax combine weights.
    assert not np.allclose(kernel_before, np_(moe.router.gating_kernel))
    assert moe.losses == []
    stats = moe.routing_statistics()
    assert 0.0 <= stats["fraction_tokens_dropped"] < 1.0


@pytest.mark.parametrize(
    "router_class, kwargs",
    [
        (
            SinkhornTokenChoiceRouter,
            {"num_iters": 7, "epsilon": 0.5, "batch_priority": True},
        ),
        (SinkhornExpertChoiceRouter, {"num_iters": 9, "eval_capacity_factor": 4.0}),
        (SparsityConstrainedExpertChoiceRouter, {"num_steps": 5, "learning_rate": 0.1}),
    ],
)
def test_config_round_trip_and_keras_save_load(router_class, kwargs, tmp_path):
    router = router_class(4, **kwargs)
    config = router.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    clone = router_class.from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(router))
    assert type(restored) is router_class
    assert restored.get_config() == config

    model = make_model(router_class, **kwargs)
    x = np.random.default_rng(1).normal(size=(4, 6, 8)).astype("float32")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("moe").router.get_config() == (
        model.get_layer("moe").router.get_config()
    )
    np.testing.assert_array_equal(np_(model(x)), np_(loaded(x)))


BAD_SETTINGS = [
    (lambda: SinkhornTokenChoiceRouter(4, num_iters=0), "num_iters"),
    (lambda: SinkhornTokenChoiceRouter(4, epsilon=0.0), "epsilon"),
    (lambda: SinkhornTokenChoiceRouter(4, num_selected_experts=5), "num_selected"),
    (lambda: SinkhornTokenChoiceRouter(4, load_loss_weight=-1.0), "load_loss"),
    (lambda: SinkhornExpertChoiceRouter(4, num_iters=-3), "num_iters"),
    (lambda: SinkhornExpertChoiceRouter(4, epsilon=-1.0), "epsilon"),
    (lambda: SinkhornExpertChoiceRouter(4, capacity=0), "capacity"),
    (lambda: SparsityConstrainedExpertChoiceRouter(4, num_steps=0), "num_steps"),
    (
        lambda: SparsityConstrainedExpertChoiceRouter(4, learning_rate=0.0),
        "learning_rate",
    ),
    (
        lambda: SparsityConstrainedExpertChoiceRouter(4, learning_rate="a"),
        "learning_rate",
    ),
    (lambda: SparsityConstrainedExpertChoiceRouter(0), "num_experts"),
]


def test_bad_settings():
    for make, match in BAD_SETTINGS:
        with pytest.raises(ValueError, match=match):
            make()


def test_bad_input_rank():
    for router_class in ROUTER_CLASSES:
        with pytest.raises(ValueError, match="groups, group_size, dim"):
            router_class(4)(X[0])


@pytest.mark.parametrize("router_class", ROUTER_CLASSES)
def test_float32_under_mixed_precision(router_class):
    # The router takes the global policy (bfloat16 compute), but its OT
    # plans and the combine tensor stay float32.
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = router_class(4)
    assert router.compute_dtype == "bfloat16"
    routing = router(ops.cast(X, "bfloat16"), training=True)
    combine = routing.combine_tensor()
    assert keras.backend.standardize_dtype(combine.dtype) == "float32"
    assert np.all(np.isfinite(np_(combine)))
