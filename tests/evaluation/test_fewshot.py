"""Few-shot linear evaluation against an independent lstsq ridge and by hand."""

import numpy as np
import pytest

from keras_vmoe import evaluation
from keras_vmoe.evaluation import fewshot as fs


def lstsq_ridge(x, y, l2):
    """Ridge via least squares on the augmented system [X; sqrt(l2) I]."""
    d = x.shape[1]
    a = np.concatenate([x, np.sqrt(l2) * np.eye(d)])
    b = np.concatenate([y, np.zeros((d, y.shape[1]))])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def reference_fewshot(train_x, train_y, test_x, test_y, shot, l2, seed):
    """The protocol written out independently with lstsq (no eigh)."""
    classes = np.unique(train_y)
    perm = np.random.default_rng(seed).permutation(len(train_y))
    idx = np.concatenate([[i for i in perm if train_y[i] == c][:shot] for c in classes])
    x, y = train_x[idx], train_y[idx]
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = np.c_[(x - mean) / std, np.full(len(x), 100.0)]
    xt = np.c_[(test_x - mean) / std, np.full(len(test_x), 100.0)]
    targets = 2.0 * (y[:, None] == classes[None, :]) - 1.0
    w = lstsq_ridge(x, targets, l2)
    return np.mean(classes[np.argmax(xt @ w, axis=1)] == test_y)


@pytest.mark.parametrize("n, d", [(40, 7), (9, 30)])  # primal regime, dual regime
@pytest.mark.parametrize("form", ["primal", "dual", "auto"])
def test_ridge_weights_match_lstsq(n, d, form):
    rng = np.random.default_rng(n * d)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    l2s = [2.0**-3, 1.0, 2.0**10]
    w = fs.ridge_weights(x, y, l2s, form=form)
    assert w.shape == (3, d, 3)
    for i, l2 in enumerate(l2s):
        np.testing.assert_allclose(w[i], lstsq_ridge(x, y, l2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [6, 60])  # 5-shot x 4 classes = 20 rows: primal, dual
def test_fewshot_matches_independent_lstsq_protocol(dim):
    rng = np.random.default_rng(dim)
    means = rng.normal(size=(4, dim))
    train_y = rng.integers(0, 4, size=200)
    test_y = rng.integers(0, 4, size=100)
    train_x = means[train_y] + 1.5 * rng.normal(size=(200, dim))
    test_x = means[test_y] + 1.5 * rng.normal(size=(100, dim))
    l2s = (2.0**-2, 2.0**4, 2.0**10)
    for form in ("primal", "dual"):
        got = evaluation.fewshot_linear_accuracy(
            train_x,
            train_y,
            test_x,
            test_y,
            shots=(1, 5),
            l2_regs=l2s,
            seed=3,
            form=form,
        )
        for shot in (1, 5):
            for l2 in l2s:
                expected = reference_fewshot(
                    train_x, train_y, test_x, test_y, shot, l2, 3
                )
                assert got[shot][l2] == pytest.approx(expected), (form, shot, l2)
    assert 0.25 < got[5][2.0**4] <= 1.0  # better than chance on this data


def test_hand_worked_one_dimensional_two_class_case():
    # Train (2-shot, all examples used): class 0 at x = 0, 2; class 1 at 4, 6.
    # Mean 3, std sqrt(((-3)^2 + 1 + 1 + 3^2) / 4) = sqrt(5); with
    # a = 1 / (sqrt(5) + 1e-5) the standardised inputs are z = [-3a, -a, a, 3a]
    # and the bias column is 100. Targets (2 * one_hot - 1): [1, -1] for class
    # 0, [-1, 1] for class 1. X^T X = [[20 a^2, 0], [0, 40000]] is diagonal
    # (z sums to 0), X^T Y = [[-8a, 8a], [0, 0]] (balanced classes), so
    #   W = [[-8a / (20a^2 + l2), 8a / (20a^2 + l2)], [0, 0]].
    # With l2 = 1: 20a^2 = 3.99998..., W[0] = [-8a/4.99998, 8a/4.99998].
    # logit_1 - logit_0 = 16 a^2 (x - 3) / (20a^2 + l2): class 1 iff x > 3.
    train_x = np.array([[0.0], [2.0], [4.0], [6.0]])
    train_y = np.array([0, 0, 1, 1])
    a = 1.0 / (np.sqrt(5.0) + 1e-5)
    w = fs.ridge_weights(
        np.c_[(train_x - 3.0) * a, np.full(4, 100.0)],
        2.0 * np.eye(2)[train_y] - 1.0,
        [1.0],
    )[0]
    np.testing.assert_allclose(
        w, [[-8 * a / (20 * a**2 + 1), 8 * a / (20 * a**2 + 1)], [0, 0]], atol=1e-12
    )
    # Test points 1, 2.9 -> class 0; 3.1, 5 -> class 1.
    test_x = np.array([[1.0], [2.9], [3.1], [5.0]])
    acc = evaluation.fewshot_linear_accuracy(
        train_x, train_y, test_x, np.array([0, 0, 1, 1]), shots=(2,), l2_regs=(1.0,)
    )
    assert acc == {2: {1.0: 1.0}}
    # Label 2.9 as class 1 instead: 3 of 4 predictions are right.
    acc = evaluation.fewshot_linear_accuracy(
        train_x, train_y, test_x, np.array([0, 1, 1, 1]), shots=(2,), l2_regs=(1.0,)
    )
    assert acc == {2: {1.0: 0.75}}
    # Default l2 = 2^10 shrinks W but keeps its sign: same predictions.
    assert evaluation.fewshot_linear_accuracy(
        train_x, train_y, test_x, np.array([0, 0, 1, 1]), shots=(2,)
    ) == {2: {1024.0: 1.0}}


def test_linearly_separable_features_give_accuracy_one():
    rng = np.random.default_rng(0)
    # Every feature dimension carries signal (one class centre per axis).
    centres = 10.0 * np.eye(10)
    train_y = np.repeat(np.arange(10), 30)
    test_y = np.tile(np.arange(10), 20)
    train_x = centres[train_y] + rng.normal(size=(300, 10))
    test_x = centres[test_y] + rng.normal(size=(200, 10))
    acc = evaluation.fewshot_linear_accuracy(
        train_x,
        train_y,
        test_x,
        test_y,
        shots=(1, 5, 10, 25),
        l2_regs=evaluation.L2_SWEEP,
    )
    assert set(acc) == {1, 5, 10, 25}
    assert len(acc[1]) == 30
    best = evaluation.best_l2(acc)
    assert all(a == 1.0 for _, a in best.values())
    assert acc[25][evaluation.DEFAULT_L2] == 1.0


def test_sampling_is_seeded_per_class_and_nested():
    labels = np.repeat(np.arange(3), 10)
    one = fs.fewshot_indices(labels, 1, seed=5)
    five = fs.fewshot_indices(labels, 5, seed=5)
    np.testing.assert_array_equal(labels[five], np.repeat(np.arange(3), 5))
    assert set(one) <= set(five)
    np.testing.assert_array_equal(five, fs.fewshot_indices(labels, 5, seed=5))
    assert not np.array_equal(five, fs.fewshot_indices(labels, 5, seed=6))


def test_constants_and_best_l2():
    np.testing.assert_array_equal(evaluation.L2_SWEEP, 2.0 ** np.arange(-10, 20))
    assert evaluation.DEFAULT_L2 == 1024.0
    assert evaluation.best_l2({5: {1.0: 0.5, 2.0: 0.7, 4.0: 0.7}}) == {5: (2.0, 0.7)}


def test_error_cases():
    x = np.zeros((6, 2))
    y = np.array([0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"shot=2 .* class 2.* only 1"):
        evaluation.fewshot_linear_accuracy(x, y, x, y, shots=(1, 2))
    with pytest.raises(ValueError, match=r"Classes \[7\].*`test_labels`"):
        evaluation.fewshot_linear_accuracy(x, y, x[:1], np.array([7]), shots=(1,))
    # Class 3 of num_classes=4 has no training example: named, not skipped.
    with pytest.raises(ValueError, match=r"Class 3 is missing from the training"):
        evaluation.fewshot_linear_accuracy(x, y, x, y, shots=(1,), num_classes=4)
    with pytest.raises(ValueError, match=r"Class 5 is missing from the training"):
        fs.fewshot_indices(y, 1, classes=[0, 5])
    with pytest.raises(ValueError, match="outside"):
        evaluation.fewshot_linear_accuracy(x, y, x, y, shots=(1,), num_classes=2)
    with pytest.raises(ValueError, match="`shots`"):
        evaluation.fewshot_linear_accuracy(x, y, x, y, shots=(0,))
    with pytest.raises(ValueError, match="`l2_regs`"):
        evaluation.fewshot_linear_accuracy(x, y, x, y, shots=(1,), l2_regs=(0.0,))
    with pytest.raises(ValueError, match="`train_labels`"):
        evaluation.fewshot_linear_accuracy(x, y[:5], x, y, shots=(1,))
    with pytest.raises(ValueError, match="`test_features`"):
        evaluation.fewshot_linear_accuracy(x, y, x[:, 0], y, shots=(1,))
    with pytest.raises(ValueError, match="`form`"):
        fs.ridge_weights(x, np.eye(6), form="other")
