"""FewShotEvaluator writes the few-shot accuracies into the epoch logs."""

import csv
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vmoe.callbacks import FewShotEvaluator
from keras_vmoe.data import load_arrays
from keras_vmoe.evaluation import best_l2, fewshot_linear_accuracy

SHOTS = (1, 5)
L2S = (1.0, 1024.0)


@pytest.fixture(scope="module")
def digits():
    return load_arrays("digits", "train"), load_arrays("digits", "test")


def tiny_classifier():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten(name="flatten")(inputs)
    features = keras.layers.Dense(16, activation="relu", name="pre_logits")(x)
    logits = keras.layers.Dense(10, name="logits")(features)
    model = keras.Model(inputs, logits)
    model.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def expected_metrics(model, train, test, name, l2s=L2S):
    """Features of the *whole* sets, then `fewshot_linear_accuracy` directly."""
    extractor = keras.Model(model.input, model.get_layer("pre_logits").output)
    f_train = extractor.predict(train[0], batch_size=256, verbose=0)
    f_test = extractor.predict(test[0], batch_size=256, verbose=0)
    result = fewshot_linear_accuracy(
        f_train, train[1], f_test, test[1], shots=SHOTS, l2_regs=l2s, seed=0
    )
    metrics = {}
    for shot, (l2, acc) in best_l2(result).items():
        metrics[f"fewshot/{name}/{shot}shot"] = acc
        if len(l2s) > 1:
            metrics[f"fewshot/{name}/{shot}shot_best_l2"] = l2
    return metrics


def test_values_reach_history_and_match_direct_computation(digits):
    train, test = digits
    keras.utils.set_random_seed(0)
    model = tiny_classifier()
    datasets = {
        "digits": (train, test),
        # Same data as a tf.data pipeline: unbatched train, batched test.
        "digits_ds": (
            tf.data.Dataset.from_tensor_slices(train),
            tf.data.Dataset.from_tensor_slices(test).batch(100),
        ),
        # One-hot labels in {"image", "label"} dicts, batched.
        "digits_onehot": (
            tf.data.Dataset.from_tensor_slices(
                {"image": train[0], "label": np.eye(10, dtype="float32")[train[1]]}
            ).batch(200),
            test,
        ),
    }
    evaluator = FewShotEvaluator(datasets, shots=SHOTS, l2_regs=L2S, batch_size=128)
    seen = []

    def check(epoch, logs):  # runs right after the evaluator, same weights
        for name in datasets:
            expected = expected_metrics(model, train, test, name)
            for key, value in expected.items():
                assert logs[key] == pytest.approx(value), (epoch, key)
        seen.append(epoch)

    history = model.fit(
        train[0][:256],
        train[1][:256],
        batch_size=64,
        epochs=2,
        verbose=0,
        callbacks=[evaluator, keras.callbacks.LambdaCallback(on_epoch_end=check)],
    )
    assert seen == [0, 1]
    for name in datasets:
        for shot in SHOTS:
            accs = history.history[f"fewshot/{name}/{shot}shot"]
            l2s = history.history[f"fewshot/{name}/{shot}shot_best_l2"]
            assert len(accs) == 2 and all(0.1 < a <= 1.0 for a in accs)
            assert all(v in L2S for v in l2s)
    for name in ("digits_ds", "digits_onehot"):
        for shot in SHOTS:
            key = f"fewshot/{{}}/{shot}shot"
            assert (
                history.history[key.format(name)]
                == history.history[key.format("digits")]
            )
    assert set(evaluator.last_results["digits"]) == set(SHOTS)
    assert set(evaluator.last_results["digits"][5]) == set(L2S)


def test_every_n_epochs_single_l2_and_feature_fn(digits):
    train, test = digits
    model = tiny_classifier()
    calls = []

    def feature_fn(m, images):
        calls.append(len(images))
        return keras.ops.reshape(keras.ops.convert_to_tensor(images), (len(images), -1))

    evaluator = FewShotEvaluator(
        {"raw": (train, test)}, shots=(5,), every_n_epochs=2, feature_fn=feature_fn
    )
    history = model.fit(
        train[0][:64],
        train[1][:64],
        batch_size=64,
        epochs=3,
        verbose=0,
        callbacks=[evaluator],
    )
    assert len(history.history["fewshot/raw/5shot"]) == 1  # after epoch 2 only
    assert "fewshot/raw/5shot_best_l2" not in history.history
    # Pixels as features: equal to the direct computation on raw pixels.
    direct = fewshot_linear_accuracy(
        train[0].reshape(len(train[0]), -1),
        train[1],
        test[0].reshape(len(test[0]), -1),
        test[1],
        shots=(5,),
    )
    assert history.history["fewshot/raw/5shot"][0] == pytest.approx(direct[5][1024.0])
    assert calls[0] == 50  # only the 5-shot x 10-class subset is featurised


def test_evaluate_now_and_errors(digits):
    train, test = digits
    model = tiny_classifier()
    metrics = FewShotEvaluator({"d": (train, test)}, shots=(1,)).evaluate_now(model)
    assert set(metrics) == {"fewshot/d/1shot"}
    expected = expected_metrics(model, train, test, "d", l2s=(1024.0,))
    assert metrics["fewshot/d/1shot"] == pytest.approx(expected["fewshot/d/1shot"])

    inputs = keras.Input((8, 8, 1))
    no_pre_logits = keras.Model(inputs, keras.layers.Flatten()(inputs))
    with pytest.raises(ValueError, match="pre_logits"):
        FewShotEvaluator({"d": (train, test)}, shots=(1,)).evaluate_now(no_pre_logits)
    with pytest.raises(ValueError, match=r"class \d+.*only"):
        FewShotEvaluator({"d": ((train[0][:30], train[1][:30]), test)}, shots=(25,))
    with pytest.raises(ValueError, match="`datasets`"):
        FewShotEvaluator({})
    with pytest.raises(ValueError, match="`datasets"):
        FewShotEvaluator({"d": (train,)})
    with pytest.raises(ValueError, match="`every_n_epochs`"):
        FewShotEvaluator({"d": (train, test)}, every_n_epochs=0)
    with pytest.raises(ValueError, match="`shots`"):
        FewShotEvaluator({"d": (train, test)}, shots=(0,))
    with pytest.raises(ValueError, match="`l2_regs`"):
        FewShotEvaluator({"d": (train, test)}, l2_regs=(-1.0,))
    with pytest.raises(ValueError, match="`feature_fn`"):
        FewShotEvaluator({"d": (train, test)}, feature_fn=3)
    with pytest.raises(ValueError, match="`batch_size`"):
        FewShotEvaluator({"d": (train, test)}, batch_size=0)


def test_pads_to_whole_routing_groups_and_drops_the_padding():
    """A Soft MoE routes groups of 4 images; 10 images are not whole groups.

    Soft MoE mixes every token of a group into its slots, so an image's
    features depend on its group mates: the reference runs the model on the
    first 8 images (a batch that divides evenly) and on the last 2 images
    padded with copies of themselves (`predict_in_groups`' padding rule).
    """
    from keras_vmoe.callbacks import model_group_size
    from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

    keras.utils.set_random_seed(0)
    backbone = VisionMoEBackbone(
        image_shape=(8, 8, 1),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        router="soft",
        router_config={"num_slots": 2},
        num_experts=2,
        group_size=4,
    )
    model = VisionMoEImageClassifier(backbone, num_classes=2, representation_size=8)
    assert model_group_size(model) == model_group_size(backbone) == 4
    assert model_group_size(tiny_classifier()) == 1
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 8, 8, 1)).astype("float32")
    labels = np.arange(10) % 2

    extractor = keras.Model(model.inputs[0], model.get_layer("pre_logits").output)
    whole = extractor.predict_on_batch(images[:8])
    last = extractor.predict_on_batch(np.concatenate([images[8:], images[8:]]))
    expected = np.concatenate([np.asarray(whole), np.asarray(last)[:2]])
    # Zeros instead of copies would give other features for the last group.
    zeros = extractor.predict_on_batch(
        np.concatenate([images[8:], np.zeros_like(images[:2])])
    )
    assert not np.allclose(np.asarray(zeros)[:2], expected[8:], atol=1e-4)

    # batch_size 6 is rounded down to one group of 4: batches 4, 4, 2 + 2 copies.
    evaluator = FewShotEvaluator(
        {"d": ((images, labels), (images, labels))}, shots=(1,), batch_size=6
    )
    for test in (
        (images, labels),
        tf.data.Dataset.from_tensor_slices((images, labels)),  # unbatched
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(4),  # 4, 4, 2
    ):
        features, got_labels = evaluator._test_features(model, test)
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_labels, labels)
    # No feature_fn needed: the evaluation runs on the 2-image probe set.
    metrics = evaluator.evaluate_now(model)
    assert set(metrics) == {"fewshot/d/1shot"}


def _arrays_of(dataset):
    """All `(images, int labels)` of a batched tf.data pipeline, in order."""
    images, labels = zip(*dataset.as_numpy_iterator(), strict=True)
    labels = np.concatenate(labels)
    return np.concatenate(images), labels.argmax(-1) if labels.ndim == 2 else labels


def _tensorboard_scalars(log_dir, tag):
    """Values of one scalar tag in the event files under `log_dir`."""
    values = []
    for root, _, files in os.walk(log_dir):
        for name in sorted(files):
            if not name.startswith("events.out.tfevents"):
                continue
            path = os.path.join(root, name)
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    if value.tag == tag:
                        values.append(float(tf.make_ndarray(value.tensor)))
    return values


def test_keras_vmoe_data_pipelines_and_the_standard_callbacks(tmp_path):
    """`keras_vmoe.data` pipelines as datasets; the keys drive ModelCheckpoint,
    EarlyStopping, CSVLogger and TensorBoard listed after the evaluator."""
    from keras_vmoe import data

    def pipeline(split, **kwargs):
        return data.eval_pipeline(
            data.load("digits", split), 8, 128, crop_fraction=None, **kwargs
        )

    train_ds = pipeline("train")  # int labels, TFDS order
    test_ds = pipeline("test", num_classes=10)  # one-hot labels
    train, test = _arrays_of(train_ds), _arrays_of(test_ds)
    assert train[0].shape == (1437, 8, 8, 1) and test[0].shape == (360, 8, 8, 1)
    keras.utils.set_random_seed(0)
    model = tiny_classifier()
    key = "fewshot/pipe/5shot"
    evaluator = FewShotEvaluator(
        {"pipe": (train_ds, test_ds)}, shots=SHOTS, l2_regs=L2S, batch_size=100
    )
    expected = []

    def record(epoch, logs):  # same weights the evaluator just used
        expected.append(expected_metrics(model, train, test, "pipe"))

    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.weights.h5"),
        monitor=key,
        mode="max",
        save_best_only=True,
        save_weights_only=True,
    )
    # min_delta 1.0 cannot be met after the first epoch: patience 0 stops
    # after epoch 2 of 4, but only if EarlyStopping reads the key (a missing
    # monitor only warns and training runs all 4 epochs).
    early = keras.callbacks.EarlyStopping(
        monitor=key, mode="max", min_delta=1.0, patience=0
    )
    callbacks = [
        evaluator,
        keras.callbacks.LambdaCallback(on_epoch_end=record),
        checkpoint,
        early,
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        # Needs the `tensorboard` package: a test dependency, not a keras_vmoe one.
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
    ]
    history = model.fit(
        train[0][:256],
        train[1][:256],
        batch_size=64,
        epochs=4,
        verbose=0,
        callbacks=callbacks,
    )
    assert len(expected) == 2 and early.stopped_epoch == 1
    for name in (key, "fewshot/pipe/1shot", "fewshot/pipe/5shot_best_l2"):
        got = history.history[name]
        assert got == pytest.approx([e[name] for e in expected]), name
    assert all(0.1 < a <= 1.0 for a in history.history[key])
    assert checkpoint.best == pytest.approx(max(history.history[key]))
    assert os.path.isfile(tmp_path / "best.weights.h5")
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r[key]) for r in rows] == pytest.approx(history.history[key])
    logged = _tensorboard_scalars(str(tmp_path / "tb" / "train"), "epoch_" + key)
    assert logged == pytest.approx(history.history[key], abs=1e-6)


def test_seeds_average_the_direct_calls(digits):
    """Raw pixels as features: no model dependence, exact comparison."""
    train, test = digits
    model = tiny_classifier()

    def pixels(m, images):
        return np.asarray(images).reshape(len(images), -1)

    seeds = (0, 1, 2)
    evaluator = FewShotEvaluator(
        {"raw": (train, test)},
        shots=SHOTS,
        l2_regs=L2S,
        seeds=seeds,
        feature_fn=pixels,
    )
    metrics = evaluator.evaluate_now(model)
    direct = {
        seed: fewshot_linear_accuracy(
            pixels(None, train[0]),
            train[1],
            pixels(None, test[0]),
            test[1],
            shots=SHOTS,
            l2_regs=L2S,
            seed=seed,
        )
        for seed in seeds
    }
    for shot in SHOTS:
        mean = {l2: np.mean([direct[s][shot][l2] for s in seeds]) for l2 in L2S}
        best = max(L2S, key=lambda l2: mean[l2])
        assert metrics[f"fewshot/raw/{shot}shot"] == pytest.approx(mean[best])
        assert metrics[f"fewshot/raw/{shot}shot_best_l2"] == best
        assert evaluator.last_results["raw"][shot] == pytest.approx(mean)
        for seed in seeds:
            assert (
                evaluator.last_results_per_seed[seed]["raw"][shot]
                == (direct[seed][shot])
            )
    # The seeds draw different 1-shot sets, so their accuracies differ.
    assert len({direct[s][1][1024.0] for s in seeds}) > 1
    # One seed given either way is the plain single-seed evaluation.
    single = FewShotEvaluator(
        {"raw": (train, test)}, shots=(1,), seeds=2, feature_fn=pixels
    ).evaluate_now(model)
    assert single["fewshot/raw/1shot"] == direct[2][1][1024.0]
    for bad in ((), (1, 1), (0.5,), "ab", True):
        with pytest.raises(ValueError, match="`seeds`"):
            FewShotEvaluator({"raw": (train, test)}, seeds=bad)
    with pytest.raises(ValueError, match="not both"):
        FewShotEvaluator({"raw": (train, test)}, seed=3, seeds=(1, 2))


def test_a_class_missing_from_the_training_split_is_reported(digits):
    train, test = digits
    no_nines = train[1] != 9
    evaluator = FewShotEvaluator(
        {"d": ((train[0][no_nines], train[1][no_nines]), test)}, shots=(1,)
    )
    with pytest.raises(ValueError, match=r"Classes \[9\] appear in `test_labels`"):
        evaluator.evaluate_now(tiny_classifier())


def test_from_dataset_names_images_are_the_model_preprocessing():
    # The evaluator's images (load_arrays, resized 8x8 -> 12x12, gray to
    # RGB) are what the classifier's own preprocessor makes of the raw
    # pixels: bit for bit in tf.data (as fit and predict run it), and to
    # float32 rounding in an eager call with this backend's resize kernel.
    from keras_vmoe.data import bundled_arrays
    from keras_vmoe.models import (
        VisionMoEImageClassifierPreprocessor,
        VisionMoEImageConverter,
    )

    evaluator = FewShotEvaluator.from_dataset_names(["digits"], (12, 12, 3))
    (x_train, y_train), _ = evaluator.datasets["digits"]
    raw, labels = bundled_arrays("digits", "train")
    raw = np.repeat(raw[:64], 3, axis=-1)
    preprocessor = VisionMoEImageClassifierPreprocessor(
        VisionMoEImageConverter(image_size=(12, 12))
    )
    ds = tf.data.Dataset.from_tensor_slices(raw).batch(64).map(preprocessor)
    np.testing.assert_array_equal(next(iter(ds)).numpy(), x_train[:64])
    eager = keras.ops.convert_to_numpy(preprocessor(raw))
    np.testing.assert_allclose(eager, x_train[:64], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(y_train[:64], labels[:64])
