import numpy as np
import pytest
from keras import ops

from keras_vmoe.routers import expert_choice, token_choice
from tests import numpy_reference as ref

# One group, S=4 tokens, E=3 experts. Rows are tokens.
GATES = np.array(
    [
        [
            [0.5, 0.3, 0.2],  # t0: 1st e0, 2nd e1
            [0.6, 0.1, 0.3],  # t1: 1st e0, 2nd e2
            [0.7, 0.2, 0.1],  # t2: 1st e0, 2nd e1
            [0.1, 0.2, 0.7],  # t3: 1st e2, 2nd e1
        ]
    ],
    "float32",
)


def combine_of(routing):
    return ops.convert_to_numpy(routing.combine_tensor())


def dispatch_of(routing):
    return ops.convert_to_numpy(routing.dispatch_tensor())


def test_token_choice_hand_worked():
    # K=2, C=2, sequence order.
    # Rank 0: t0->(e0,0), t1->(e0,1), t2->e0 is full: dropped, t3->(e2,0).
    # Rank 1: t0->(e1,0), t1->(e2,1), t2->(e1,1) (kept although its first
    #         choice was dropped), t3->e1 is full: dropped.
    expected = np.zeros((1, 4, 3, 2), "float32")
    expected[0, 0, 0, 0] = 0.5
    expected[0, 0, 1, 0] = 0.3
    expected[0, 1, 0, 1] = 0.6
    expected[0, 1, 2, 1] = 0.3
    expected[0, 2, 1, 1] = 0.2
    expected[0, 3, 2, 0] = 0.7
    routing = token_choice(GATES, num_selected_experts=2, capacity=2)
    np.testing.assert_allclose(combine_of(routing), expected, atol=1e-7)
    np.testing.assert_array_equal(
        dispatch_of(routing), (expected > 0).astype("float32")
    )


def test_token_choice_batch_priority_hand_worked():
    # Top-1 gates: t0 .5, t1 .6, t2 .7, t3 .7 -> priority t2, t3 (tie: lower
    # index first), t1, t0.
    # Rank 0: t2->(e0,0), t3->(e2,0), t1->(e0,1), t0->e0 full: dropped.
    # Rank 1: t2->(e1,0), t3->(e1,1), t1->(e2,1), t0->e1 full: dropped.
    # So t0 reaches no expert at all.
    expected = np.zeros((1, 4, 3, 2), "float32")
    expected[0, 1, 0, 1] = 0.6
    expected[0, 1, 2, 1] = 0.3
    expected[0, 2, 0, 0] = 0.7
    expected[0, 2, 1, 0] = 0.2
    expected[0, 3, 2, 0] = 0.7
    expected[0, 3, 1, 1] = 0.2
    routing = token_choice(GATES, 2, 2, batch_priority=True)
    np.testing.assert_allclose(combine_of(routing), expected, atol=1e-7)
    stats = {k: ops.convert_to_numpy(v) for k, v in routing.statistics().items()}
    assert stats["fraction_tokens_dropped"] == pytest.approx(0.25)  # t0
    assert stats["experts_per_token"] == pytest.approx(6 / 4)
    # Filled slots per expert: e0 2, e1 2, e2 2 -> perfectly balanced.
    np.testing.assert_allclose(stats["expert_load"], [1 / 3] * 3, atol=1e-6)
    assert stats["load_imbalance"] == pytest.approx(1.0)


def test_expert_choice_hand_worked():
    # C=2. e0 column (.5,.6,.7,.1): t2 then t1.
    # e1 column (.3,.1,.2,.2): t0, then t2 and t3 tie at .2: t2 (lower index).
    # e2 column (.2,.3,.1,.7): t3 then t1.
    expected = np.zeros((1, 4, 3, 2), "float32")
    expected[0, 2, 0, 0] = 0.7
    expected[0, 1, 0, 1] = 0.6
    expected[0, 0, 1, 0] = 0.3
    expected[0, 2, 1, 1] = 0.2
    expected[0, 3, 2, 0] = 0.7
    expected[0, 1, 2, 1] = 0.3
    routing = expert_choice(GATES, capacity=2)
    np.testing.assert_allclose(combine_of(routing), expected, atol=1e-7)
    stats = {k: ops.convert_to_numpy(v) for k, v in routing.statistics().items()}
    assert stats["fraction_tokens_dropped"] == 0.0
    assert stats["experts_per_token"] == pytest.approx(6 / 4)


def test_separate_combine_weights():
    weights = np.full_like(GATES, 2.0)
    routing = expert_choice(GATES, capacity=1, combine_weights=weights)
    # e0 takes t2, e1 takes t0, e2 takes t3, each with weight 2.
    assert combine_of(routing)[0, 2, 0, 0] == 2.0
    assert combine_of(routing)[0, 0, 1, 0] == 2.0
    assert combine_of(routing)[0, 3, 2, 0] == 2.0
    assert combine_of(routing).sum() == 6.0


def test_ties_lower_index_wins():
    gates = np.full((1, 5, 4), 0.25, "float32")
    # Token Choice, K=1: every token picks e0; only t0, t1 fit (C=2).
    tc = combine_of(token_choice(gates, 1, 2))
    assert tc[0, :, 0, 0].tolist() == [0.25, 0, 0, 0, 0]
    assert tc[0, :, 0, 1].tolist() == [0, 0.25, 0, 0, 0]
    assert tc[0, :, 1:].sum() == 0
    # Expert Choice: every expert takes t0 then t1.
    ec = ops.convert_to_numpy(expert_choice(gates, 2).slot_token)
    assert ec[0].tolist() == [[0, 1]] * 4


def test_expert_choice_capacity_larger_than_group():
    routing = expert_choice(GATES, capacity=6)
    mask = ops.convert_to_numpy(routing.slot_mask)
    # Each expert takes all 4 tokens; the 2 extra slots stay empty.
    assert mask[0].tolist() == [[1, 1, 1, 1, 0, 0]] * 3
    combine = combine_of(routing)
    np.testing.assert_allclose(combine.sum(axis=(2, 3)), GATES.sum(-1), atol=1e-6)


@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("k, capacity", [(1, 3), (2, 4), (3, 2)])
def test_token_choice_matches_numpy_loops(k, capacity, batch_priority):
    rng = np.random.default_rng(k * 10 + capacity)
    gates = ref.softmax(rng.normal(size=(3, 12, 5))).astype("float32")
    combine = rng.uniform(size=gates.shape).astype("float32")
    routing = token_choice(gates, k, capacity, batch_priority, combine_weights=combine)
    expected = ref.token_choice(gates, k, capacity, batch_priority, combine)
    np.testing.assert_allclose(combine_of(routing), expected, atol=1e-6)


@pytest.mark.parametrize("capacity", [1, 3, 12, 15])
def test_expert_choice_matches_numpy_loops(capacity):
    rng = np.random.default_rng(capacity)
    gates = ref.softmax(rng.normal(size=(3, 12, 5))).astype("float32")
    routing = expert_choice(gates, capacity)
    np.testing.assert_allclose(
        combine_of(routing), ref.expert_choice(gates, capacity), atol=1e-6
    )


@pytest.mark.parametrize("sparse", ["token", "expert"])
def test_index_path_equals_einsum_path(sparse):
    rng = np.random.default_rng(0)
    gates = ref.softmax(rng.normal(size=(2, 10, 4))).astype("float32")
    routing = (
        token_choice(gates, 2, 4) if sparse == "token" else expert_choice(gates, 3)
    )
    x = rng.normal(size=(2, 10, 6)).astype("float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.dispatch(x)),
        ops.convert_to_numpy(routing.einsum_dispatch(x)),
        atol=1e-6,
    )
    y = rng.normal(size=(4, 2, routing.capacity, 6)).astype("float32")  # (E, G, C, d)
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.combine(y)),
        ops.convert_to_numpy(routing.einsum_combine(y)),
        atol=1e-5,
    )


def test_allocation_errors():
    with pytest.raises(ValueError, match="num_selected_experts"):
        token_choice(GATES, num_selected_experts=4, capacity=2)
    with pytest.raises(ValueError, match="num_selected_experts"):
        token_choice(GATES, num_selected_experts=0, capacity=2)
    with pytest.raises(ValueError, match="capacity"):
        token_choice(GATES, 1, capacity=0)
    with pytest.raises(ValueError, match="capacity"):
        expert_choice(GATES, capacity=0)
    with pytest.raises(ValueError, match="scores"):
        expert_choice(GATES[0], capacity=1)
    with pytest.raises(ValueError, match="combine_weights"):
        expert_choice(GATES, 1, combine_weights=GATES[:, :2])
