"""`compile_with_recipe` and `keras-vmoe train` on tiny models and bundled data."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import cli, data
from keras_vmoe.cli import train as train_command
from keras_vmoe.models import VisionMoEImageClassifierPreprocessor, from_preset
from keras_vmoe.models.vision_moe import cost
from keras_vmoe.training import (
    SigmoidCrossEntropy,
    SoftmaxCrossEntropy,
    WarmupLinearDecay,
    WarmupRsqrtCooldown,
    compile_with_recipe,
    make_schedule,
)

PRESET = "vmoe_softmax_tc_s32_e32_224"
# A tiny V-MoE: 16x16 images, 4x4 = 16 patches of 4 pixels + class token,
# 2 blocks of width 16, MoE (4 experts, top-2) in block 1, groups of 2.
TINY = dict(
    image_size=16,
    patch_size=4,
    num_layers=2,
    hidden_dim=16,
    mlp_dim=32,
    num_heads=2,
    num_experts=4,
    group_size=2,
    representation_size=16,
)
# One device: the mesh path (the tests' 8 simulated JAX devices) is
# tests/cli/test_train_distributed.py's.
TINY_FLAGS = ["--image-size", "16", "--num-experts", "4", "--no-distribution"] + [
    arg
    for key in ("patch_size", "num_layers", "hidden_dim", "mlp_dim", "num_heads")
    + ("group_size", "representation_size")
    for arg in ("--override", f"{key}={TINY[key]}")
]
# Zero head, bias -log(10): every class has probability 1/10, so the sigmoid
# loss is -log(0.1) - 9 log(0.9) = 2.302585 + 0.948245 whatever the input.
INITIAL_SIGMOID_LOSS = -math.log(0.1) - 9 * math.log(0.9)


def test_recipe_trains_a_tiny_vmoe_on_animal_mnist():
    keras.utils.set_random_seed(0)
    # The pipeline and load_arrays preprocess: no preprocessor on the model.
    model = from_preset(PRESET, num_classes=10, preprocessor=None, **TINY)
    compile_with_recipe(model, "vmoe", total_steps=30, peak_learning_rate=1e-2)
    train = data.train_pipeline(
        data.load("animal_mnist", "train"),
        image_size=16,
        batch_size=32,
        channels=3,
        random_crop=False,
        flip=False,
        repeat=True,
        seed=0,
    )
    x_test, y_test = data.load_arrays("animal_mnist", "test", image_size=16, channels=3)
    x_test, y_test = x_test[:128], y_test[:128]
    before = model.evaluate(x_test, y_test, batch_size=64, verbose=0, return_dict=True)
    # The auxiliary load-balancing loss adds about 1e-3 to the hand value.
    assert before["loss"] == pytest.approx(INITIAL_SIGMOID_LOSS, abs=0.02)
    history = model.fit(
        train, steps_per_epoch=10, epochs=3, shuffle=False, verbose=0
    ).history
    after = model.evaluate(x_test, y_test, batch_size=64, verbose=0, return_dict=True)
    assert history["loss"][-1] < history["loss"][0] - 0.15
    assert after["loss"] < before["loss"] - 0.2
    assert after["accuracy"] > 0.18  # chance is 0.1 (std 0.027 on 128 images)
    # The schedule ended: warmup 3 steps (a tenth), linear decay to 1e-5.
    assert int(model.optimizer.iterations) == 30
    assert float(ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(
        1e-5
    )


def test_compile_with_recipe_settings():
    model = from_preset(PRESET, num_classes=10, **TINY)
    compile_with_recipe(model, "vmoe", total_steps=1000, warmup_steps=100)
    opt = model.optimizer
    assert isinstance(opt, keras.optimizers.Adam)
    assert (opt.beta_1, opt.beta_2, opt.global_clipnorm) == (0.9, 0.999, 1.0)
    assert isinstance(opt._learning_rate, WarmupLinearDecay)
    # 0.1 on every kernel, including the experts' and the router's.
    kernels = [v.path for v in model.trainable_variables if v.path.endswith("kernel")]
    assert any("experts" in p for p in kernels) and any("router" in p for p in kernels)
    assert {opt.weight_decay_rate_for(p) for p in kernels} == {0.1}
    assert opt.weight_decay_rate_for("head/bias") == 0.0
    schedule = opt._learning_rate
    assert float(schedule(50)) == pytest.approx(5e-4)
    assert float(schedule(550)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert isinstance(model.loss, SigmoidCrossEntropy)

    compile_with_recipe(
        model,
        "soft_moe",
        total_steps=400,
        peak_learning_rate=1.0,
        warmup_steps=100,
        timescale=100,
        cooldown_steps=100,
        loss="softmax",
        label_smoothing=0.1,
    )
    opt = model.optimizer
    assert isinstance(opt._learning_rate, WarmupRsqrtCooldown)
    # Inverse square root after the warmup, halved halfway through cooldown.
    assert float(opt._learning_rate(200)) == pytest.approx(math.sqrt(0.5))
    assert float(opt._learning_rate(350)) == pytest.approx(math.sqrt(100 / 350) / 2)
    assert opt.weight_decay_rate_for("head/kernel") == 3.0
    assert opt.weight_decay_rate_for("encoder_block_1/mlp/dense_1/kernel") == 0.03
    assert isinstance(model.loss, SoftmaxCrossEntropy)
    # Smoothed targets over 4 classes: 0.925 on the label, 0.025 elsewhere;
    # with zero logits the loss is log 4 whatever the targets.
    loss = SoftmaxCrossEntropy(label_smoothing=0.1)
    assert float(loss(np.array([2]), np.zeros((1, 4), "float32"))) == pytest.approx(
        math.log(4), rel=1e-6
    )
    logits = np.array([[2.0, 0.0, 0.0, 0.0]], "float32")
    log_p = logits[0] - np.log(np.exp(logits[0]).sum())
    expected = -(0.925 * log_p[0] + 0.025 * log_p[1:].sum())
    got = float(loss(np.array([[1.0, 0.0, 0.0, 0.0]]), logits))
    assert got == pytest.approx(expected, rel=1e-6)
    assert float(loss(np.array([0]), logits)) == pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(recipe="nope", total_steps=10), "recipe"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, warmup_steps=10), "warmup_steps"),
        (dict(total_steps=10, loss="hinge"), "loss"),
        (dict(total_steps=10, weight_decay=-1.0), "weight_decay"),
        (dict(total_steps=10, schedule="step"), "schedule"),
    ],
)
def test_compile_with_recipe_rejects_bad_arguments(kwargs, match):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=match):
        compile_with_recipe(model, **kwargs)


def test_constant_schedule():
    s = make_schedule("constant", 0.1, total_steps=100, warmup_steps=10)
    assert [round(float(s(t)), 6) for t in (5, 10, 60, 100)] == [0.05, 0.1, 0.1, 0.1]


class Capture(keras.callbacks.Callback):
    """Keeps the trained model's predictions on fixed images."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def on_train_end(self, logs=None):
        self.predictions = keras.ops.convert_to_numpy(
            self.model.predict_on_batch(self.images)
        )


def test_train_command_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = [
        "train",
        "--preset",
        PRESET,
        "--dataset",
        "animal_mnist",
        *TINY_FLAGS,
        "--batch-size",
        "32",
        "--steps",
        "20",
        "--steps-per-epoch",
        "10",
        "--learning-rate",
        "1e-2",
        "--eval-split",
        "test[:64]",
        "--fewshot",
        "digits",
        "--shots",
        "1,5",
        "--tensorboard",
        "--output",
        out,
    ]
    images, _ = data.load_arrays("animal_mnist", "test", image_size=16, channels=3)
    capture = Capture(images[:8])
    args = cli.build_parser().parse_args(argv)
    assert train_command.run(args, callbacks=[capture]) == 0
    printed = capsys.readouterr().out
    assert "20 steps of 32 = 2 epochs of 10 steps" in printed
    assert "Epoch 2/2" in printed  # the progress bar
    assert sorted(os.listdir(out)) == [
        "checkpoints",
        "history.json",
        "log.csv",
        "preset",
        "run.json",
        "tensorboard",
    ]

    # The trained preset loads with from_preset and predicts the same (on
    # the pipeline's preprocessed images: without the saved preprocessor).
    loaded = from_preset(os.path.join(out, "preset"), preprocessor=None)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.predict_on_batch(images[:8])),
        capture.predictions,
        rtol=1e-6,
        atol=1e-6,
    )
    # It trained without a preprocessor and was saved with one, for its size.
    assert "preprocessor.json" in os.listdir(os.path.join(out, "preset"))
    with open(os.path.join(out, "preset", "metadata.json")) as f:
        assert json.load(f)["tasks"] == ["ImageClassifier"]
    preprocessor = from_preset(os.path.join(out, "preset")).preprocessor
    assert isinstance(preprocessor, VisionMoEImageClassifierPreprocessor)
    assert preprocessor.image_size == (16, 16)
    assert loaded.num_classes == 10 and loaded.backbone.image_shape == (16, 16, 3)
    with open(os.path.join(out, "preset", "metadata.json")) as f:
        meta = json.load(f)
    config = loaded.backbone.get_config()
    assert meta["parameter_count"] == loaded.backbone.count_params()
    assert meta["flops_per_image"] == cost.backbone_flops(config)
    assert meta["training"]["dataset"] == "animal_mnist"
    assert meta["training"]["steps"] == 20

    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    assert history["epoch"] == [1, 2]
    assert history["loss"][1] < history["loss"][0]
    assert history["learning_rate"][-1] == pytest.approx(1e-5)  # end of decay
    # One series per MoE layer, keyed by the layer path.
    per_token = [k for k in history if k.endswith("/experts_per_token")]
    assert per_token and all(k.startswith("routing/") for k in per_token)
    assert all(history[k][-1] > 1.0 for k in per_token)  # top-2, few drops
    for shot in (1, 5):
        assert 0.1 <= history[f"fewshot/digits/{shot}shot"][-1] <= 1.0
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # --tensorboard: the same numbers as TensorBoard scalars, epochs 0 and 1.
    from tests.callbacks.test_routing_statistics import tensorboard_scalars

    scalars = tensorboard_scalars(os.path.join(out, "tensorboard"))
    for key in ("loss", "accuracy", "val_accuracy", "learning_rate", *per_token):
        assert scalars[key] == pytest.approx(history[key], rel=1e-6), key
    assert float(rows[-1]["loss"]) == pytest.approx(history["loss"][-1], rel=1e-6)

    # `eval` on the output reproduces the last epoch's validation accuracy
    # and few-shot numbers (same weights, same padding, same sampling seed).
    preset = os.path.join(out, "preset")
    assert (
        cli.main(
            ["eval", "--preset", preset, "--split", "test[:64]", "--batch-size", "32"]
            + ["--fewshot", "digits", "--shots", "1,5", "--json"]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert results["test/animal_mnist/test[:64]_accuracy"] == pytest.approx(
        history["val_accuracy"][-1], abs=1e-6
    )
    assert results["test/animal_mnist/num_examples"] == 64
    for shot in (1, 5):
        key = f"fewshot/digits/{shot}shot"
        assert results[key] == pytest.approx(history[key][-1], abs=1e-9)


def _one_line_error(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("keras-vmoe train: error: ")
    return lines[0]


BASE = ["train", "--preset", PRESET, "--dataset", "digits"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0."),
        (["--steps", "-5"], "--steps must be >= 1, got -5."),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--epochs", "2", "--steps", "3"], "give --epochs or --steps, not both."),
        (["--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--router", "bogus"], "unknown --router 'bogus'"),
        (["--override", "num_layers"], "--override must be KEY=VALUE"),
        (["--override", "num_classes=3"], "num_classes comes from --dataset"),
        (["--shots", "1,x"], "--shots must be comma-separated integers"),
        (["--resume", "--overwrite"], "give --resume or --overwrite, not both."),
        (["--resume"], "nothing to resume"),
        (["--train-split", "nosplit"], "Unknown split 'nosplit'"),
        (["--fewshot", "nope"], "dataset 'nope'"),
        (["--batch-size", "5000"], "larger than the training split (1437"),
        (["--image-size", "15", "--override", "patch_size=8"], "divisible"),
        (["--override", "bogus_key=1"], "Unknown preset override 'bogus_key'"),
    ],
)
def test_train_bad_arguments_exit_2_with_one_line(tmp_path, capsys, extra, message):
    out = str(tmp_path / "out")
    assert cli.main([*BASE, "--output", out, *extra]) == 2
    assert message in _one_line_error(capsys)
    assert not os.path.exists(os.path.join(out, "run.json"))


def test_train_unknown_preset_dataset_and_unwritable_output(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["train", "--preset", "vmoe_nope", "--dataset", "digits"]) == 2
    assert "Unknown preset 'vmoe_nope'" in _one_line_error(capsys)
    assert (
        cli.main(["train", "--preset", PRESET, "--dataset", "nope", "--output", out])
        == 2
    )
    assert "is neither a bundled dataset" in _one_line_error(capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main([*BASE, "--output", str(blocker / "run")]) == 2
    assert "is not writable" in _one_line_error(capsys)
    assert cli.main([*BASE, "--output", str(blocker)]) == 2
    assert "is not a folder" in _one_line_error(capsys)
    assert cli.main(["train", "--dataset", "digits", "--output", out]) == 2
    assert "--preset is required" in _one_line_error(capsys)


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"arguments": {}}))
    assert cli.main([*BASE, "--output", str(out)]) == 2
    assert "already holds a run" in _one_line_error(capsys)


def test_group_size_must_divide_the_batch(tmp_path, capsys):
    flags = [f if f != "group_size=2" else "group_size=3" for f in TINY_FLAGS]
    out = str(tmp_path / "out")
    assert cli.main([*BASE, *flags, "--batch-size", "16", "--output", out]) == 2
    assert "multiple of the model's routing group of 3 images" in _one_line_error(
        capsys
    )


@pytest.mark.parametrize(
    "preset, overrides, expected",
    [
        # Soft MoE router (its routing is a SoftRouting) and average pooling.
        ("soft_moe_s16_e128_224", dict(num_experts=4, group_size=2), "soft_moe"),
        # Soft MoE router, class-token pooling: the V-MoE recipe.
        ("vmoe_soft_s32_e32_224", dict(num_experts=4, group_size=2), "vmoe"),
        # A sparse router (SparseRouting), and no router at all.
        ("vmoe_softmax_tc_s32_e32_224", dict(num_experts=4, group_size=2), "vmoe"),
        ("vit_dense_s32_224", {}, "vmoe"),
    ],
)
def test_auto_recipe_follows_the_routing_class(preset, overrides, expected):
    from keras_vmoe.cli import train_setup

    small = dict(image_size=16, patch_size=4, num_layers=2, hidden_dim=16)
    small.update(mlp_dim=32, num_heads=2, **overrides)
    model = from_preset(preset, num_classes=10, **small)
    cfg = {
        "recipe": "auto",
        "learning_rate": 1e-3,
        "warmup_steps": None,
        "weight_decay": None,
        "loss": "sigmoid",
        "label_smoothing": 0.0,
    }
    assert train_setup.compile_for_run(model, cfg, total_steps=100) == expected
    schedule = WarmupRsqrtCooldown if expected == "soft_moe" else WarmupLinearDecay
    assert isinstance(model.optimizer._learning_rate, schedule)
