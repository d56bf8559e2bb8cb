"""`FewShotEvaluator`: the paper's few-shot linear metric as a Keras callback.

At the end of every n-th epoch it extracts frozen features (by default the
output of the classifier's layer named `"pre_logits"`), fits the closed-form
ridge probe of `keras_vmoe.evaluation` and writes
`fewshot/{dataset}/{shot}shot` into the epoch logs, where `History`,
`ModelCheckpoint(monitor=...)` and `EarlyStopping` see it (list this
callback before them).

Only the few-shot training examples are pushed through the model: the
sampled indices depend on the labels and the seed only, so they are drawn
once (exactly as `fewshot_linear_accuracy` draws them on the full training
set) and the numbers equal `fewshot_linear_accuracy` on features of the whole
training set.

A V-MoE routes the tokens of `group_size` images together, so it only runs
on whole groups: the callback extracts features with
`keras_vmoe.evaluation.predict_in_groups` (the group read from the model
by `model_group_size`), whose padding rule every evaluation of the package
shares: a short last group is filled with copies of its own images, and the
padding's features are dropped.
"""

import numpy as np
from keras import callbacks

from keras_vmoe.evaluation import fewshot as fs
from keras_vmoe.evaluation.grouped import model_group_size, predict_in_groups

PRE_LOGITS_LAYER = "pre_logits"


def _is_dataset(obj):
    return hasattr(obj, "element_spec") and hasattr(obj, "as_numpy_iterator")


def _image_label(*element):
    if len(element) == 1 and isinstance(element[0], dict):
        d = element[0]
        return d.get("image", d.get("images")), d.get("label", d.get("labels"))
    if len(element) == 2:
        return element
    raise ValueError(
        "A few-shot tf.data.Dataset must yield (images, labels) or "
        "{'image', 'label'} elements."
    )


def _labels_to_int(labels):
    labels = np.asarray(labels)
    if labels.ndim == 2:  # one-hot or soft labels
        labels = labels.argmax(axis=-1)
    return labels.astype(np.int64)


def _iterate_batches(dataset, batch_size):
    """Yields NumPy `(images, int labels)` batches from a tf.data.Dataset."""
    ds = dataset.map(lambda *e: tuple(_image_label(*e)))
    label_spec = ds.element_spec[1]
    # Unbatched: scalar int labels, or one (float) one-hot vector per image.
    if label_spec.shape.rank == 0 or (
        label_spec.shape.rank == 1
        and label_spec.dtype.is_floating
        and ds.element_spec[0].shape.rank == 3
    ):
        ds = ds.batch(batch_size)
    for images, labels in ds.as_numpy_iterator():
        yield images, _labels_to_int(labels)


def _check_split(split, dataset_name, which):
    if _is_dataset(split):
        return split
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise ValueError(
            f"`datasets[{dataset_name!r}]` {which} must be (images, labels) "
            f"arrays or a tf.data.Dataset, got {type(split).__name__}."
        )
    images, labels = np.asarray(split[0]), _labels_to_int(split[1])
    if images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(
            f"`datasets[{dataset_name!r}]` {which}: {images.shape[0]} images "
            f"but labels of shape {labels.shape}."
        )
    return images, labels


def _check_seeds(seed, seeds):
    """`seeds` (or `(seed,)`) as a tuple of distinct ints."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    if seeds is None:
        return (int(seed),)
    if seed != 0:
        raise ValueError("Give `seed` or `seeds`, not both.")
    seeds = (seeds,) if isinstance(seeds, (int, np.integer)) else seeds
    try:
        seeds = tuple(seeds)
    except TypeError:
        seeds = None
    if (
        not seeds
        or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds
        )
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"`seeds` must be an int or distinct ints, got {seeds!r}.")
    return tuple(int(s) for s in seeds)


class FewShotEvaluator(callbacks.Callback):
    """Few-shot linear-probe accuracy of frozen features, every n epochs.

    For each dataset `name -> (train, test)`: sample `shot` training
    examples per class (`keras_vmoe.evaluation.fewshot_indices`), extract
    features of those and of the test set, fit the ridge probe for each l2
    and write into the epoch `logs`:

    - `fewshot/{name}/{shot}shot`: test accuracy (the best over `l2_regs`);
    - `fewshot/{name}/{shot}shot_best_l2`: the l2 reaching it (only when
      several `l2_regs` are given).

    With several `seeds` (big_vision evaluates 3), each accuracy is the mean
    over the seeds' few-shot draws, and the best l2 is chosen on that mean.

    Features: `feature_fn(model, images)` if given; otherwise the output of
    the model's layer named `"pre_logits"` (`layer_name`), which the
    keras_vmoe classifiers expose: the callback builds
    `keras.Model(model.inputs, model.get_layer("pre_logits").output)` once
    and runs it with `predict_on_batch` (any backend). That graph starts at
    the backbone's input, so a classifier's `preprocessor` does not run:
    images must already be preprocessed as the model expects, e.g. by
    `keras_vmoe.data.eval_pipeline` or `load_arrays` (`from_dataset_names`
    uses it), which resize and scale exactly as the model's
    `VisionMoEImageConverter` does (`keras_vmoe.utils.pixels.scale_pixels`).

    Models that route images in groups (`model_group_size`: a keras_vmoe
    classifier's `backbone.group_size`) get whole groups, through
    `keras_vmoe.evaluation.predict_in_groups`: `batch_size` is rounded down
    to a multiple of the group, the images of a set (an array, or all the
    batches of a Dataset in order) are cut into consecutive groups, and a
    short last group is filled with copies of its own images before the
    feature model or `feature_fn` sees it; the padding's features are
    dropped. As in any batch, the images that share a group with the
    padding are routed together with it.

    Args:
        datasets: dict. Maps a name to `(train, test)`; each of those is an
            `(images, labels)` pair of NumPy arrays or a `tf.data.Dataset`
            yielding `(images, labels)` (batched or not; int or one-hot
            labels). A training Dataset is read twice on first use (labels,
            then the sampled images) and must keep its order.
        shots: sequence of int. Examples per class. Defaults to
            `(1, 5, 10, 25)`.
        l2_regs: sequence of float. Ridge strengths; with several the best
            is reported (pass `keras_vmoe.evaluation.L2_SWEEP` for
            2^-10..2^19). Defaults to `(2.0**10,)`.
        every_n_epochs: int. Evaluate after epochs `n, 2n, ...` (1-based).
            Defaults to `1`.
        seed: int. Seed of the few-shot sampling. Defaults to `0`.
        seeds: int or sequence of int. Seeds of the few-shot sampling; the
            reported accuracies are means over them (`last_results_per_seed`
            keeps each). Give `seed` or `seeds`, not both. Defaults to
            `None` (`(seed,)`).
        feature_fn: callable. `feature_fn(model, images) -> (batch, d)`
            features of a batch of whole routing groups. Defaults to `None`
            (the `"pre_logits"` layer).
        batch_size: int. Images per feature-extraction batch (for arrays and
            unbatched Datasets), rounded down to whole routing groups (at
            least one). Defaults to `256`.
        layer_name: str. Layer whose output is the feature when
            `feature_fn` is None. Defaults to `"pre_logits"`.
        verbose: int. 1 prints the accuracies after each evaluation.
            Defaults to `0`.

    Example:

    ```python
    evaluator = FewShotEvaluator(
        {"digits": (load_arrays("digits", "train", 32, channels=3),
                    load_arrays("digits", "test", 32, channels=3))},
        shots=(1, 5), every_n_epochs=1,
    )
    history = classifier.fit(train_ds, epochs=2, callbacks=[evaluator])
    history.history["fewshot/digits/5shot"]
    ```
    """

    def __init__(
        self,
        datasets,
        shots=fs.DEFAULT_SHOTS,
        l2_regs=(fs.DEFAULT_L2,),
        every_n_epochs=1,
        seed=0,
        seeds=None,
        feature_fn=None,
        batch_size=256,
        layer_name=PRE_LOGITS_LAYER,
        verbose=0,
    ):
        super().__init__()
        if not isinstance(datasets, dict) or not datasets:
            raise ValueError(
                "`datasets` must be a non-empty dict name -> (train, test), "
                f"got {type(datasets).__name__}."
            )
        self.datasets = {}
        for name, pair in datasets.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"`datasets` keys must be non-empty str, got {name!r}."
                )
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"`datasets[{name!r}]` must be a (train, test) pair.")
            self.datasets[name] = (
                _check_split(pair[0], name, "train"),
                _check_split(pair[1], name, "test"),
            )
        self.shots = fs._check_shots(shots)  # noqa: SLF001
        self.l2_regs = tuple(float(r) for r in fs._check_l2_regs(l2_regs))  # noqa: SLF001
        if (
            not isinstance(every_n_epochs, int)
            or isinstance(every_n_epochs, bool)
            or every_n_epochs < 1
        ):
            raise ValueError(
                f"`every_n_epochs` must be a positive int, got {every_n_epochs!r}."
            )
        self.seeds = _check_seeds(seed, seeds)
        if feature_fn is not None and not callable(feature_fn):
            raise ValueError(
                f"`feature_fn` must be callable or None, got {feature_fn!r}."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"`batch_size` must be a positive int, got {batch_size!r}."
            )
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(
                f"`layer_name` must be a non-empty str, got {layer_name!r}."
            )
        self.every_n_epochs = every_n_epochs
        self.seed = self.seeds[0]
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self.layer_name = layer_name
        self.verbose = verbose
        self.last_results = {}
        self.last_results_per_seed = {}
        self._probe_sets = {}
        self._feature_model = None
        self._feature_model_of = None
        for name, (train, _) in self.datasets.items():
            if not _is_dataset(train):  # fail early on too few examples
                self._probe_set(name)

    @classmethod
    def from_dataset_names(
        cls,
        names,
        image_shape,
        shots=fs.DEFAULT_SHOTS,
        l2_regs=(fs.DEFAULT_L2,),
        data_dir=None,
        **kwargs,
    ):
        """An evaluator over bundled or prepared TFDS datasets, by name.

        Each dataset's train split is the few-shot pool and its test split
        the test set, loaded in memory with `keras_vmoe.data.load_arrays`
        at the model's input size (the whole image resized, no crop).

        Args:
            names: sequence of str. Dataset names (e.g. `("digits",)`).
            image_shape: tuple. `(height, width, channels)` of the model
                input (`keras_vmoe.evaluation.model_image_shape(model)`).
            shots: sequence of int. Examples per class. Defaults to
                `(1, 5, 10, 25)`.
            l2_regs: sequence of float. Ridge strengths. Defaults to
                `(2.0**10,)`.
            data_dir: str or None. TFDS data directory. Defaults to `None`.
            **kwargs: other `FewShotEvaluator` arguments (`every_n_epochs`,
                `seed`, `batch_size`, ...).

        Returns:
            `FewShotEvaluator`.

        Example:
        >>> evaluator = FewShotEvaluator.from_dataset_names(
        ...     ["digits"], (8, 8, 1), shots=(1, 5))
        >>> evaluator.datasets["digits"][0][0].shape
        (1437, 8, 8, 1)
        """
        from keras_vmoe import data

        h, w, c = image_shape
        datasets = {
            name: tuple(
                data.load_arrays(
                    name, split, image_size=(h, w), data_dir=data_dir, channels=c
                )
                for split in ("train", "test")
            )
            for name in names
        }
        return cls(datasets, shots=shots, l2_regs=l2_regs, **kwargs)

    # Few-shot training subsets (drawn once).

    def _probe_set(self, name):
        """`(images of the sampled union, labels, {(seed, shot): rows}, classes)`."""
        if name in self._probe_sets:
            return self._probe_sets[name]
        train = self.datasets[name][0]
        if _is_dataset(train):
            labels = np.concatenate(
                [y for _, y in _iterate_batches(train, self.batch_size)]
            )
        else:
            labels = train[1]
        classes = np.unique(labels)
        per_shot = {
            (seed, shot): fs.fewshot_indices(labels, shot, seed=seed, classes=classes)
            for seed in self.seeds
            for shot in self.shots
        }
        union = np.unique(np.concatenate(list(per_shot.values())))
        rows = {shot: np.searchsorted(union, idx) for shot, idx in per_shot.items()}
        if _is_dataset(train):
            images = self._gather(train, union, labels)
        else:
            images = train[0][union]
        probe = (images, labels[union], rows, classes)
        self._probe_sets[name] = probe
        return probe

    def _gather(self, dataset, wanted, labels):
        chosen, offset = [], 0
        for images, batch_labels in _iterate_batches(dataset, self.batch_size):
            stop = offset + len(batch_labels)
            if not np.array_equal(batch_labels, labels[offset:stop]):
                raise ValueError(
                    "A few-shot training tf.data.Dataset must yield the same "
                    "order every time it is iterated (do not reshuffle it)."
                )
            lo, hi = np.searchsorted(wanted, [offset, stop])
            chosen.append(images[wanted[lo:hi] - offset])
            offset = stop
        return np.concatenate(chosen)

    # Features.

    def _feature_runner(self, model):
        """`fn(batch) -> features` of a batch of whole routing groups."""
        if self.feature_fn is not None:
            return lambda images: self.feature_fn(model, images)
        return self._default_feature_model(model).predict_on_batch

    def _features(self, model, images):
        """`(n, d)` features of an array or an iterable of image batches."""
        out = predict_in_groups(
            self._feature_runner(model),
            images,
            self.batch_size,
            group_size=model_group_size(model),
        )
        return out.reshape(out.shape[0], -1)

    def _default_feature_model(self, model):
        if self._feature_model_of is not model:
            import keras

            try:
                layer = model.get_layer(self.layer_name)
            except ValueError as e:
                raise ValueError(
                    f"The model has no layer named {self.layer_name!r}: pass "
                    "`feature_fn=lambda model, images: ...` or `layer_name`."
                ) from e
            inputs = model.inputs
            inputs = inputs[0] if len(inputs) == 1 else inputs
            self._feature_model = keras.Model(inputs, layer.output)
            self._feature_model_of = model
        return self._feature_model

    def _test_features(self, model, test):
        if not _is_dataset(test):
            return self._features(model, test[0]), test[1]
        labels = []

        def images():  # the Dataset's images, in order; keeps the labels
            for batch_images, batch_labels in _iterate_batches(test, self.batch_size):
                labels.append(batch_labels)
                yield batch_images

        features = self._features(model, images())
        return features, np.concatenate(labels)

    # Evaluation.

    def evaluate_now(self, model=None):
        """Run the few-shot evaluation now and return the metrics.

        Args:
            model: keras.Model. The model to evaluate. Defaults to `None`
                (the model this callback is attached to).

        Returns:
            Dict of the metrics written to the logs, e.g.
            `{"fewshot/digits/5shot": 0.93}`; the full `{dataset: {shot:
            {l2: accuracy}}}` (means over the seeds) is kept in
            `self.last_results`, and each seed's in
            `self.last_results_per_seed[seed]`.

        Example:

        ```python
        metrics = FewShotEvaluator({"digits": (train, test)}).evaluate_now(model)
        ```
        """
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("`model` is required when the callback is not attached.")
        metrics, results = {}, {}
        per_seed = {seed: {} for seed in self.seeds}
        for name, (_, test) in self.datasets.items():
            images, labels, rows, classes = self._probe_set(name)
            train_features = self._features(model, images)
            test_features, test_labels = self._test_features(model, test)
            for seed in self.seeds:
                per_seed[seed][name] = {
                    shot: fs.linear_probe_accuracy(
                        train_features[rows[seed, shot]],
                        labels[rows[seed, shot]],
                        test_features,
                        test_labels,
                        self.l2_regs,
                        classes=classes,
                    )
                    for shot in self.shots
                }
            results[name] = {
                shot: {
                    l2: float(
                        np.mean([per_seed[s][name][shot][l2] for s in self.seeds])
                    )
                    for l2 in self.l2_regs
                }
                for shot in self.shots
            }
            for shot, (l2, acc) in fs.best_l2(results[name]).items():
                metrics[f"fewshot/{name}/{shot}shot"] = acc
                if len(self.l2_regs) > 1:
                    metrics[f"fewshot/{name}/{shot}shot_best_l2"] = l2
        self.last_results = results
        self.last_results_per_seed = per_seed
        if self.verbose:
            print(" - ".join(f"{k}: {v:.4g}" for k, v in metrics.items()))
        return metrics

    def on_epoch_end(self, epoch, logs=None):
        """Evaluate after every `every_n_epochs`-th epoch; add to `logs`.

        Args:
            epoch: int. Index of the epoch that ended (0-based).
            logs: dict. The epoch logs, updated in place. Defaults to
                `None`.
        """
        if (epoch + 1) % self.every_n_epochs:
            return
        metrics = self.evaluate_now(self.model)
        if logs is not None:
            logs.update(metrics)
