"""Few-shot linear evaluation: closed-form ridge regression on frozen features.

The paper's transfer metric (big_vision's `fewshot_lsr`), in NumPy float64:

1. For each class take `shot` training examples: the first `shot` examples
   of that class in one seeded permutation of the training set (so the
   5-shot set contains the 1-shot set).
2. Standardise the features with the mean and `std + 1e-5` of those few-shot
   examples (the test features get the same transform) and append a
   constant column of 100 (a nearly unregularised bias).
3. Targets `2 * one_hot - 1`; ridge `W = (X^T X + l2 I)^-1 X^T Y` (primal,
   when features <= examples) or `X^T (X X^T + l2 I)^-1 Y` (dual). Both use
   one symmetric eigendecomposition, so a sweep over l2 costs one
   decomposition plus a matrix product per value.
4. Predict the argmax over classes (ties go to the lower class) and report
   the test accuracy for every (shot, l2).
"""

import numpy as np

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2 = 2.0**10
L2_SWEEP = 2.0 ** np.arange(-10, 20)
BIAS_VALUE = 100.0
STD_EPS = 1e-5


def _check_features_labels(features, labels, name):
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(
            f"`{name}_features` must be 2-D (examples, features), got shape "
            f"{features.shape}."
        )
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"`{name}_labels` must be 1-D with one label per row of "
            f"`{name}_features` ({features.shape[0]}), got shape {labels.shape}."
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"`{name}_labels` must be integer class ids.")
        labels = labels.astype(np.int64)
    if not np.all(np.isfinite(features)):
        raise ValueError(f"`{name}_features` contains NaN or inf.")
    return features.astype(np.float64), labels.astype(np.int64)


def _check_l2_regs(l2_regs):
    l2 = np.atleast_1d(np.asarray(l2_regs, dtype=np.float64))
    if l2.ndim != 1 or l2.size == 0 or not np.all(np.isfinite(l2)) or np.any(l2 <= 0):
        raise ValueError(
            f"`l2_regs` must be a non-empty sequence of positive floats, got {l2_regs!r}."
        )
    return l2


def _check_shots(shots):
    shots = (shots,) if isinstance(shots, (int, np.integer)) else tuple(shots)
    if not shots or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
        for s in shots
    ):
        raise ValueError(f"`shots` must be positive ints, got {shots!r}.")
    return tuple(int(s) for s in shots)


def _resolve_classes(train_labels, test_labels, num_classes):
    if num_classes is not None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
        for name, labels in (
            ("train_labels", train_labels),
            ("test_labels", test_labels),
        ):
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.size:
                raise ValueError(
                    f"`{name}` has class {int(bad[0])} outside "
                    f"[0, num_classes={num_classes})."
                )
        classes = np.arange(num_classes)
    else:
        classes = np.unique(np.concatenate([train_labels, test_labels]))
    missing = np.setdiff1d(np.unique(test_labels), np.unique(train_labels))
    if missing.size:
        raise ValueError(
            f"Classes {missing.tolist()} appear in `test_labels` but not in "
            "`train_labels`: few-shot evaluation cannot learn them."
        )
    if classes.size < 2:
        raise ValueError(f"Need at least 2 classes, got {classes.tolist()}.")
    return classes


def fewshot_indices(train_labels, shot, seed=0, classes=None):
    """Indices of the few-shot training set: `shot` examples per class.

    One seeded permutation of the whole training set is drawn
    (`numpy.random.default_rng(seed).permutation`); each class contributes
    its first `shot` examples in that order, so smaller shots are subsets of
    larger ones.

    Args:
        train_labels: array-like of int, shape `(N,)`. Class of each example.
        shot: int. Examples per class.
        seed: int. Seed of the permutation. Defaults to `0`.
        classes: array-like of int. Classes to sample. Defaults to `None`
            (every class in `train_labels`).

    Returns:
        int64 array of `shot * len(classes)` indices, grouped by class in
        the order of `classes`.

    Example:

    >>> fewshot_indices([0, 1, 0, 1, 0, 1], shot=2, seed=0).shape
    (4,)
    """
    labels = np.asarray(train_labels).astype(np.int64)
    if labels.ndim != 1:
        raise ValueError(f"`train_labels` must be 1-D, got shape {labels.shape}.")
    (shot,) = _check_shots(shot)
    classes = np.unique(labels) if classes is None else np.asarray(classes)
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    permuted = labels[perm]
    chosen = []
    for c in classes:
        members = perm[permuted == c]
        if members.size == 0:
            raise ValueError(
                f"Class {int(c)} is missing from the training split "
                "(`train_labels` has no example of it): few-shot evaluation "
                "cannot learn it."
            )
        if members.size < shot:
            raise ValueError(
                f"shot={shot} needs {shot} training examples of class {int(c)}, "
                f"but `train_labels` has only {members.size}."
            )
        chosen.append(members[:shot])
    return np.concatenate(chosen).astype(np.int64)


def ridge_weights(x, y, l2_regs=(DEFAULT_L2,), form="auto"):
    """Closed-form ridge regression for many l2 values, one eigendecomposition.

    Primal: `W = V diag(1 / (s + l2)) V^T X^T Y` with `X^T X = V diag(s) V^T`.
    Dual: `W = X^T U diag(1 / (s + l2)) U^T Y` with `X X^T = U diag(s) U^T`.
    Both equal `argmin_W |X W - Y|^2 + l2 |W|^2`.

    Args:
        x: array-like, shape `(n, d)`. Inputs (already standardised and with
            any bias column appended).
        y: array-like, shape `(n, c)`. Targets.
        l2_regs: sequence of float. Positive regularisation strengths.
            Defaults to `(2.0**10,)`.
        form: str. `"primal"`, `"dual"` or `"auto"` (primal when
            `d <= n`). Defaults to `"auto"`.

    Returns:
        float64 array `(len(l2_regs), d, c)`, one weight matrix per l2.

    Example:

    >>> w = ridge_weights(np.eye(3), np.eye(3), l2_regs=[1.0])
    >>> float(w[0, 0, 0])
    0.5
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`x` (n, d) and `y` (n, c) must share n, got {x.shape} and {y.shape}."
        )
    l2 = _check_l2_regs(l2_regs)
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"`form` must be 'auto', 'primal' or 'dual', got {form!r}.")
    if form == "auto":
        form = "primal" if x.shape[1] <= x.shape[0] else "dual"
    if form == "primal":
        s, v = np.linalg.eigh(x.T @ x)
        proj = v.T @ (x.T @ y)  # (d, c)
        scale = 1.0 / (np.maximum(s, 0.0)[None, :] + l2[:, None])  # (L, d)
        return np.einsum("ik,lk,kc->lic", v, scale, proj)
    s, u = np.linalg.eigh(x @ x.T)
    proj = u.T @ y  # (n, c)
    scale = 1.0 / (np.maximum(s, 0.0)[None, :] + l2[:, None])  # (L, n)
    alpha = np.einsum("ik,lk,kc->lic", u, scale, proj)  # (L, n, c)
    return np.einsum("nd,lnc->ldc", x, alpha)


def _standardise_with_bias(train_x, test_x):
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + STD_EPS

    def transform(x):
        x = (x - mean) / std
        return np.concatenate([x, np.full((x.shape[0], 1), BIAS_VALUE)], axis=1)

    return transform(train_x), transform(test_x)


def linear_probe_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    l2_regs=(DEFAULT_L2,),
    classes=None,
    form="auto",
):
    """Test accuracy of the ridge probe trained on all the given examples.

    Steps 2-4 of the few-shot protocol (standardise, bias column of 100,
    targets `2 * one_hot - 1`, ridge, argmax) on a training set that is
    already the few-shot subset.

    Args:
        train_features: array-like, shape `(n, d)`. Training features.
        train_labels: array-like of int, shape `(n,)`. Training classes.
        test_features: array-like, shape `(m, d)`. Test features.
        test_labels: array-like of int, shape `(m,)`. Test classes.
        l2_regs: sequence of float. Ridge strengths to evaluate. Defaults to
            `(2.0**10,)`.
        classes: array-like of int. The classes (one output column each,
            ties go to the earlier one). Defaults to `None` (the classes of
            `train_labels`).
        form: str. `"primal"`, `"dual"` or `"auto"`. Defaults to `"auto"`.

    Returns:
        Dict `{l2: accuracy}` with float keys and values.

    Example:

    >>> x = np.array([[0.0], [1.0]])
    >>> linear_probe_accuracy(x, [0, 1], x, [0, 1])
    {1024.0: 1.0}
    """
    train_x, train_y = _check_features_labels(train_features, train_labels, "train")
    test_x, test_y = _check_features_labels(test_features, test_labels, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"`train_features` has {train_x.shape[1]} features but "
            f"`test_features` has {test_x.shape[1]}."
        )
    l2 = _check_l2_regs(l2_regs)
    classes = np.unique(train_y) if classes is None else np.asarray(classes)
    unknown = np.setdiff1d(np.unique(test_y), classes)
    if unknown.size:
        raise ValueError(
            f"Classes {unknown.tolist()} appear in `test_labels` but not in "
            "the training classes."
        )
    x, xt = _standardise_with_bias(train_x, test_x)
    targets = 2.0 * (train_y[:, None] == classes[None, :]) - 1.0
    weights = ridge_weights(x, targets, l2, form=form)
    logits = np.einsum("md,ldc->lmc", xt, weights)
    predicted = classes[np.argmax(logits, axis=-1)]  # (L, m)
    accuracy = np.mean(predicted == test_y[None, :], axis=1)
    return {float(r): float(a) for r, a in zip(l2, accuracy, strict=True)}


def fewshot_linear_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    shots=DEFAULT_SHOTS,
    l2_regs=(DEFAULT_L2,),
    seed=0,
    num_classes=None,
    form="auto",
):
    """Few-shot linear-probe accuracy on frozen features (the paper's metric).

    For each shot: sample `shot` training examples per class with
    `fewshot_indices(train_labels, shot, seed)`, then run
    `linear_probe_accuracy` on them for every l2. Every class must have
    enough training examples, and every test class must appear in training:
    otherwise a `ValueError` names the class (nothing is skipped silently).

    Args:
        train_features: array-like, shape `(N, d)`. Features of the pool the
            few-shot sets are drawn from.
        train_labels: array-like of int, shape `(N,)`. Their classes.
        test_features: array-like, shape `(M, d)`. Test features.
        test_labels: array-like of int, shape `(M,)`. Test classes.
        shots: sequence of int. Examples per class. Defaults to
            `(1, 5, 10, 25)`.
        l2_regs: sequence of float. Ridge strengths; pass `L2_SWEEP`
            (`2.0**arange(-10, 20)`) for big_vision's sweep. Defaults to
            `(2.0**10,)`.
        seed: int. Seed of the few-shot sampling. Defaults to `0`.
        num_classes: int. If given, the classes are `0..num_classes-1` and
            all must be sampled; labels outside are an error. Defaults to
            `None` (the classes found in the labels).
        form: str. Ridge form: `"primal"`, `"dual"` or `"auto"` (primal when
            features + 1 <= examples). Defaults to `"auto"`.

    Returns:
        Dict `{shot: {l2: accuracy}}` (int, float and float). Use
        `best_l2(result)` for the best l2 per shot.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat(np.arange(3), 10)
    >>> x = np.eye(3)[y] * 5 + rng.normal(size=(30, 3))
    >>> fewshot_linear_accuracy(x, y, x, y, shots=(5,))
    {5: {1024.0: 1.0}}
    """
    train_x, train_y = _check_features_labels(train_features, train_labels, "train")
    test_x, test_y = _check_features_labels(test_features, test_labels, "test")
    shots = _check_shots(shots)
    l2 = _check_l2_regs(l2_regs)
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    classes = _resolve_classes(train_y, test_y, num_classes)
    results = {}
    for shot in shots:
        idx = fewshot_indices(train_y, shot, seed=seed, classes=classes)
        results[shot] = linear_probe_accuracy(
            train_x[idx], train_y[idx], test_x, test_y, l2, classes=classes, form=form
        )
    return results


def best_l2(results):
    """The best l2 and its accuracy for each shot of a few-shot result.

    Ties go to the l2 listed first.

    Args:
        results: dict. `{shot: {l2: accuracy}}` as returned by
            `fewshot_linear_accuracy`.

    Returns:
        Dict `{shot: (l2, accuracy)}`.

    Example:

    >>> best_l2({1: {0.5: 0.2, 8.0: 0.4}})
    {1: (8.0, 0.4)}
    """
    if not isinstance(results, dict) or not all(
        isinstance(v, dict) and v for v in results.values()
    ):
        raise ValueError("`results` must map each shot to a non-empty {l2: accuracy}.")
    out = {}
    for shot, per_l2 in results.items():
        l2 = max(per_l2, key=lambda k: per_l2[k])  # first maximum wins
        out[shot] = (l2, per_l2[l2])
    return out
