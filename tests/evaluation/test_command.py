"""`keras-vmoe eval`: test accuracy and few-shot accuracy of a preset folder.

The numbers are checked against an independent computation: predictions
and pre-logits features of every image, then NumPy accuracy and
`fewshot_linear_accuracy`. The tiny V-MoE routes groups of 2 images with
capacity to spare (no token is dropped), so an image's outputs do not depend
on which image shares its group, and the command's group padding must not
change them.
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_vmoe import cli, data
from keras_vmoe.evaluation import L2_SWEEP, best_l2, fewshot_linear_accuracy
from keras_vmoe.models import from_preset

TINY = dict(
    image_size=8,
    patch_size=4,
    num_layers=2,
    hidden_dim=16,
    mlp_dim=32,
    num_heads=2,
    num_experts=4,
    group_size=2,
    representation_size=16,
    # Top-2 of 4 experts; capacity 2 * 10 tokens * 4 / 4 = 20 slots each.
    router_config={"num_selected_experts": 2, "capacity_factor": 4.0},
)


def _save_preset(folder, num_classes=10, dataset="digits"):
    keras.utils.set_random_seed(1)
    model = from_preset("vmoe_softmax_tc_s32_e32_224", num_classes=num_classes, **TINY)
    # A random head (the preset's is zero): predictions vary per image.
    kernel = model.get_layer("head").kernel
    kernel.assign(np.random.default_rng(0).normal(size=kernel.shape).astype("float32"))
    model.save_to_preset(str(folder))
    if dataset:
        path = os.path.join(str(folder), "metadata.json")
        with open(path) as f:
            meta = json.load(f)
        meta["training"] = {"dataset": dataset}
        with open(path, "w") as f:
            json.dump(meta, f)
    return str(folder)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    keras.utils.clear_session(free_memory=False)
    return _save_preset(tmp_path_factory.mktemp("preset"))


def _features_and_logits(model, images):
    """Every image's features and logits, computed in groups of 2 images.

    An odd last image is paired with a copy of itself. The logits are the
    head applied to the features in NumPy.
    """
    features = keras.Model(model.inputs[0], model.get_layer("pre_logits").output)
    odd = len(images) % 2
    batch = np.concatenate([images, images[-1:]]) if odd else images
    feats = keras.ops.convert_to_numpy(
        features.predict(batch, batch_size=256, verbose=0)
    )
    feats = feats[: len(images)]
    kernel, bias = (
        keras.ops.convert_to_numpy(w) for w in model.get_layer("head").weights
    )
    return feats, feats @ kernel + bias


def test_eval_json_matches_an_independent_computation(preset, capsys):
    # No --dataset: the preset's training dataset (digits) is used.
    argv = ["eval", "--preset", preset, "--fewshot", "digits", "--shots", "1,5,10"]
    assert cli.main([*argv, "--batch-size", "100", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)

    # load_arrays preprocesses: the model without its preprocessor.
    model = from_preset(preset, preprocessor=None)
    x_train, y_train = data.load_arrays("digits", "train", image_size=8, channels=3)
    x_test, y_test = data.load_arrays("digits", "test", image_size=8, channels=3)
    f_test, logits = _features_and_logits(model, x_test)
    np.testing.assert_allclose(  # the head in NumPy is the model's head
        logits[:8],
        keras.ops.convert_to_numpy(model.predict_on_batch(x_test[:8])),
        rtol=1e-5,
        atol=1e-5,
    )
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
    assert results["test/digits/test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert results["test/digits/num_examples"] == 360
    assert 0.0 < accuracy < 0.5  # a random head is no classifier

    f_train, _ = _features_and_logits(model, x_train)  # 1437 images: odd
    expected = fewshot_linear_accuracy(
        f_train, y_train, f_test, y_test, shots=(1, 5, 10), seed=0
    )
    for shot in (1, 5, 10):
        (acc,) = expected[shot].values()
        assert results[f"fewshot/digits/{shot}shot"] == pytest.approx(acc, abs=1e-9)
    # Frozen random features still carry information: better than chance.
    assert results["fewshot/digits/10shot"] > 0.3
    assert sorted(results) == [
        "fewshot/digits/10shot",
        "fewshot/digits/1shot",
        "fewshot/digits/5shot",
        "test/digits/num_examples",
        "test/digits/test_accuracy",
    ]


def test_eval_prints_a_table(preset, capsys):
    argv = ["eval", "--preset", preset, "--dataset", "digits", "--split", "test[:10]"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"preset: {preset}"
    assert lines[1].split() == ["metric", "value"]
    assert lines[3].split() == ["test/digits/num_examples", "10"]
    name, value = lines[2].split()
    assert name == "test/digits/test[:10]_accuracy"
    assert float(value) * 10 == pytest.approx(round(float(value) * 10), abs=1e-3)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-vmoe eval: error: "), err
    return err[0]


def test_eval_bad_arguments_exit_2(preset, tmp_path, capsys):
    assert cli.main(["eval", "--preset", "no_such_preset"]) == 2
    assert "Unknown preset 'no_such_preset'" in _one_line_error(capsys)
    assert cli.main(["eval", "--preset", preset, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in _one_line_error(capsys)
    assert cli.main(["eval", "--preset", preset, "--shots", "0,5"]) == 2
    assert "--shots must be comma-separated integers >= 1" in _one_line_error(capsys)
    assert cli.main(["eval", "--preset", preset, "--dataset", "nope"]) == 2
    assert "dataset 'nope'" in _one_line_error(capsys)
    # A built-in architecture preset records no training dataset.
    assert cli.main(["eval", "--preset", "vit_dense_s32_224"]) == 2
    assert "nothing to evaluate" in _one_line_error(capsys)
    # digits has at most 183 training images per class.
    argv = ["eval", "--preset", preset, "--fewshot", "digits", "--shots", "500"]
    assert cli.main(argv) == 2
    assert "500" in _one_line_error(capsys)
    three = _save_preset(tmp_path / "three", num_classes=3, dataset=None)
    assert cli.main(["eval", "--preset", three, "--dataset", "digits"]) == 2
    assert "the model has 3 classes but 'digits' has 10" in _one_line_error(capsys)


def test_eval_l2_sweep_reports_the_best_l2(preset, capsys):
    argv = ["eval", "--preset", preset, "--fewshot", "digits", "--shots", "1,5"]
    assert cli.main([*argv, "--l2-sweep", "--seed", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)

    model = from_preset(preset)
    x_train, y_train = data.load_arrays("digits", "train", image_size=8, channels=3)
    x_test, y_test = data.load_arrays("digits", "test", image_size=8, channels=3)
    f_train, _ = _features_and_logits(model, x_train)
    f_test, _ = _features_and_logits(model, x_test)
    expected = best_l2(
        fewshot_linear_accuracy(
            f_train, y_train, f_test, y_test, shots=(1, 5), l2_regs=L2_SWEEP, seed=3
        )
    )
    for shot in (1, 5):
        l2, acc = expected[shot]
        assert results[f"fewshot/digits/{shot}shot"] == pytest.approx(acc, abs=1e-9)
        assert results[f"fewshot/digits/{shot}shot_best_l2"] == l2
        assert l2 in L2_SWEEP
