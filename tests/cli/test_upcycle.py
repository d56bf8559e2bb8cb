"""`keras-vmoe upcycle` writes a preset that `keras-vmoe train` continues."""

import json

import keras
import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier, from_preset
from keras_vmoe.training import compile_with_recipe
from keras_vmoe.training.upcycling import (
    apply_upcycling_options,
    freeze_non_expert_weights,
)

TINY = dict(
    image_shape=(16, 16, 3),
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
    group_size=2,
)
pytestmark = pytest.mark.filterwarnings("ignore:You are using a softmax over axis")


def _dense_preset(folder):
    model = VisionMoEImageClassifier(VisionMoEBackbone(**TINY), num_classes=10)
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype(v.dtype))
    model.save_to_preset(str(folder))
    return model


def _weights(model):
    return {v.path: np.asarray(v) for v in model.weights}


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="slow: one backend")
def test_upcycle_then_train_with_frozen_non_experts(tmp_path):
    dense = _dense_preset(tmp_path / "dense")
    out = tmp_path / "moe"
    argv = ["upcycle", "--from", str(tmp_path / "dense"), "--router"]
    argv += ["softmax_expert_choice", "--num-experts", "1", "--moe-layers", "0,1"]
    argv += ["--router-config", '{"capacity_factor": 1.0}', "--output", str(out)]
    assert cli.main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["weights"] == "upcycled" and meta["moe_layers"] == [0, 1]
    assert meta["source"]["upcycled_from"] == str(tmp_path / "dense")
    upcycled = from_preset(str(out))
    x = np.random.default_rng(1).random((4, 16, 16, 3)).astype("float32")
    # One expert that keeps every token: the dense classifier's logits.
    np.testing.assert_allclose(
        upcycled.predict(x, batch_size=4, verbose=0),
        dense.predict(x, batch_size=4, verbose=0),
        atol=1e-5,
    )
    before = _weights(upcycled)
    run = tmp_path / "run"
    status = cli.main(
        ["train", "--preset", str(out), "--dataset", "animal_mnist", "--steps"]
        + ["3", "--batch-size", "8", "--eval-split", "none", "--verbose", "0"]
        + ["--lr-schedule", "continue", "--freeze-non-experts"]
        + ["--learning-rate", "0.01", "--output", str(run), "--no-distribution"]
    )
    assert status == 0
    saved = json.loads((run / "run.json").read_text())["arguments"]
    assert saved["lr_schedule"] == "continue" and saved["freeze_non_experts"]
    after = _weights(from_preset(str(run / "preset")))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    # Only the experts, routers and head moved; everything else is frozen.
    assert changed, "nothing trained"
    for path in changed:
        assert "/moe/" in path or path.startswith("head/"), path
    assert any("/moe/experts/" in p for p in changed)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    dense_dir = tmp_path / "dense"
    _dense_preset(dense_dir)
    for flags, message in (
        (["--router", "nope", "--num-experts", "2"], "unknown --router"),
        (["--router", "soft", "--num-experts", "0"], "--num-experts must be >= 1"),
        (
            ["--router", "soft", "--num-experts", "2", "--router-config", "[1]"],
            "JSON object",
        ),
        (
            ["--router", "soft", "--num-experts", "2", "--moe-layers", "none"],
            "no block",
        ),
    ):
        argv = ["upcycle", "--from", str(dense_dir), "--output", str(tmp_path / "o")]
        assert cli.main(argv + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_continue_schedule_starts_at_the_peak_without_warmup():
    model = VisionMoEImageClassifier(
        VisionMoEBackbone(**TINY, router="soft", num_experts=2), num_classes=3
    )
    warmup = apply_upcycling_options(model, "continue", warmup_steps=None)
    compile_with_recipe(
        model, total_steps=100, peak_learning_rate=0.01, warmup_steps=warmup
    )
    # Step 0 of a linear decay from 0.01 (no warmup); a restart starts at 0.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="without a warmup"):
        apply_upcycling_options(model, "continue", warmup_steps=5)
    with pytest.raises(ValueError, match="lr_schedule"):
        apply_upcycling_options(model, "later")


def test_freezing_needs_an_moe_layer():
    with pytest.raises(ValueError, match="no MoE layer"):
        freeze_non_expert_weights(VisionMoEBackbone(**TINY))
