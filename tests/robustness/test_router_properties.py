"""Property-based tests: routing invariants over random shapes and scores.

Scores are drawn from a small set of values so that ties are frequent. Each
example is also compared with the NumPy loop references, so the invariants
hold identically on every backend.
"""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops

from keras_vmoe.routers import expert_choice, token_choice
from tests import numpy_reference as ref

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def _dense(routing, x):
    """Everything the checks read, as a tuple of tensors."""
    return (
        routing.dispatch_tensor(),
        routing.combine_tensor(),
        routing.dispatch(x),
        routing.einsum_dispatch(x),
    )


def run(allocate, scores, x):
    """Runs `allocate` (jitted on JAX: eager JAX compiles op by op) -> NumPy."""
    fn = lambda s, x: _dense(allocate(s), x)  # noqa: E731
    if keras.backend.backend() == "jax":
        import jax

        fn = jax.jit(fn)
    return [ops.convert_to_numpy(t) for t in fn(scores, x)]


@st.composite
def problems(draw):
    g = draw(st.integers(1, 3))
    s = draw(st.integers(1, 10))
    e = draw(st.integers(1, 5))
    values = draw(st.lists(st.integers(0, 4), min_size=g * s * e, max_size=g * s * e))
    scores = (np.array(values, "float32").reshape(g, s, e) + 1) / 5
    k = draw(st.integers(1, e))
    capacity = draw(st.integers(1, s + 2))
    return scores, k, capacity


def check_sparse(dispatch, combine, scores):
    assert set(np.unique(dispatch)) <= {0.0, 1.0}
    assert (dispatch.sum(axis=1) <= 1).all()  # at most one token per slot
    assert (dispatch.sum(axis=3) <= 1).all()  # a token enters an expert once
    # Slots fill from the first one: a filled slot never follows an empty one.
    filled = dispatch.sum(axis=1)  # (G, E, C)
    assert (np.diff(filled, axis=-1) <= 0).all()
    assert (combine >= 0).all()
    assert (combine <= scores[..., None] * dispatch + 1e-7).all()


@SETTINGS
@given(problems(), st.booleans())
def test_token_choice_invariants(problem, batch_priority):
    scores, k, capacity = problem
    x = np.arange(scores.shape[0] * scores.shape[1] * 3, dtype="float32")
    x = x.reshape(scores.shape[0], scores.shape[1], 3)
    dispatch, combine, fast, einsum = run(
        lambda s: token_choice(s, k, capacity, batch_priority), scores, x
    )
    check_sparse(dispatch, combine, scores)
    assert (dispatch.sum(axis=(2, 3)) <= k).all()  # at most K experts per token
    np.testing.assert_allclose(fast, einsum, atol=1e-5)
    expected = ref.token_choice(scores, k, capacity, batch_priority)
    np.testing.assert_allclose(combine, expected, atol=1e-6)


@SETTINGS
@given(problems())
def test_expert_choice_invariants(problem):
    scores, _, capacity = problem
    g, s, _ = scores.shape
    x = np.arange(g * s * 3, dtype="float32").reshape(g, s, 3)
    dispatch, combine, fast, einsum = run(
        lambda sc: expert_choice(sc, capacity), scores, x
    )
    check_sparse(dispatch, combine, scores)
    # Every expert fills exactly min(C, S) slots.
    assert (dispatch.sum(axis=(1, 3)) == min(capacity, s)).all()
    np.testing.assert_allclose(fast, einsum, atol=1e-5)
    np.testing.assert_allclose(combine, ref.expert_choice(scores, capacity), atol=1e-6)
