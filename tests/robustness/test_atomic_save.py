"""Presets and files are saved atomically: an interrupted save changes nothing.

Each test saves a preset, then interrupts a second save after some of its
files are written (a patched step raises), and checks that the first
preset is byte-identical, still loads with the same outputs, and that no
temporary folder is left next to it.
"""

import json
import os

import keras
import numpy as np
import pytest
from keras_hub.src.utils import preset_utils

from keras_vmoe import models
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier
from keras_vmoe.models.vision_moe import presets as presets_module
from keras_vmoe.utils import atomic
from tests.models.tiny import TINY, tiny_moe

IMAGES = np.random.RandomState(0).rand(2, 16, 16, 3).astype("float32")


class Interrupted(Exception):
    """Stands for a crash in the middle of a save."""


def _classifier(seed):
    keras.utils.set_random_seed(seed)
    backbone = VisionMoEBackbone(**tiny_moe("softmax_expert_choice"))
    model = VisionMoEImageClassifier(backbone, num_classes=3, representation_size=8)
    head = model.get_layer("head")
    head.kernel.assign(np.random.RandomState(seed).normal(size=(8, 3)))
    return model


def _predict(model):
    return keras.ops.convert_to_numpy(model(IMAGES, training=False))


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _leftovers(parent):
    return [
        n
        for n in os.listdir(parent)
        if n.startswith((atomic.TMP_PREFIX, atomic.OLD_PREFIX))
    ]


def _fail_after_some_files(monkeypatch, seen):
    """Makes keras-hub's metadata step raise; records the files written by then."""

    def failing_save_metadata(saver, layer):
        seen.extend(sorted(os.listdir(saver.preset_dir)))
        raise Interrupted("disk full")

    monkeypatch.setattr(
        preset_utils.KerasPresetSaver, "_save_metadata", failing_save_metadata
    )


@pytest.mark.parametrize("interruption", [Interrupted, KeyboardInterrupt])
def test_interrupted_classifier_save_keeps_the_previous_preset(
    tmp_path, monkeypatch, interruption
):
    folder = tmp_path / "preset"
    first = _classifier(seed=1)
    first.save_to_preset(str(folder))
    before = _snapshot(folder)
    expected = _predict(models.from_preset(str(folder)))
    np.testing.assert_allclose(expected, _predict(first), atol=1e-6)

    seen = []

    def failing_save_metadata(saver, layer):
        seen.extend(sorted(os.listdir(saver.preset_dir)))
        raise interruption("disk full")

    monkeypatch.setattr(
        preset_utils.KerasPresetSaver, "_save_metadata", failing_save_metadata
    )
    second = _classifier(seed=2)
    assert not np.allclose(_predict(second), expected)
    with pytest.raises(interruption, match="disk full"):
        second.save_to_preset(str(folder))
    # The failure came after files were written (into the staging folder).
    assert {"task.json", "config.json"} <= set(seen)
    monkeypatch.undo()

    assert _snapshot(folder) == before
    np.testing.assert_array_equal(_predict(models.from_preset(str(folder))), expected)
    assert _leftovers(tmp_path) == []


def test_interrupted_backbone_save_keeps_the_previous_preset(tmp_path, monkeypatch):
    folder = tmp_path / "backbone"
    keras.utils.set_random_seed(3)
    VisionMoEBackbone(**TINY).save_to_preset(str(folder))
    before = _snapshot(folder)
    seen = []
    _fail_after_some_files(monkeypatch, seen)
    keras.utils.set_random_seed(4)
    with pytest.raises(Interrupted):
        VisionMoEBackbone(**TINY).save_to_preset(str(folder))
    assert seen == ["config.json"]
    monkeypatch.undo()
    assert _snapshot(folder) == before
    loaded = VisionMoEBackbone.from_preset(str(folder))
    assert loaded.count_params() == VisionMoEBackbone(**TINY).count_params()
    assert _leftovers(tmp_path) == []


def test_a_new_save_replaces_the_whole_folder(tmp_path):
    """No stale file of the previous preset survives (no mixed presets)."""
    folder = tmp_path / "preset"
    model = _classifier(seed=1)
    model.save_to_preset(str(folder))
    assert "task.json" in os.listdir(folder)
    model.backbone.save_to_preset(str(folder))
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "metadata.json",
        "model.weights.h5",
    ]
    assert _leftovers(tmp_path) == []


def test_failed_swap_puts_the_previous_preset_back(tmp_path, monkeypatch):
    """The rename of the new folder into place fails: the old one returns."""
    folder = tmp_path / "preset"
    model = _classifier(seed=1)
    model.save_to_preset(str(folder))
    before = _snapshot(folder)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(atomic.TMP_PREFIX):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _classifier(seed=2).save_to_preset(str(folder))
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert _leftovers(tmp_path) == []


def test_refuses_to_replace_a_folder_that_is_not_a_preset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="config.json"):
        VisionMoEBackbone(**TINY).save_to_preset(str(folder))
    assert os.listdir(folder) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        VisionMoEBackbone(**TINY).save_to_preset(str(tmp_path / "file"))
    assert _leftovers(tmp_path) == []


def test_interrupted_generate_presets_keeps_the_folder(tmp_path, monkeypatch):
    name = "vit_dense_s32_224"
    presets_module.generate_presets(tmp_path, names=[name])
    (tmp_path / name / "model.weights.h5").write_bytes(b"weights")  # kept
    before = _snapshot(tmp_path / name)
    real_dump = json.dump
    calls = []

    def dump(doc, f, **kwargs):
        calls.append(f.name)
        if len(calls) == 2:
            raise Interrupted("killed")
        return real_dump(doc, f, **kwargs)

    monkeypatch.setattr(presets_module.json, "dump", dump)
    with pytest.raises(Interrupted):
        presets_module.generate_presets(tmp_path, names=[name])
    monkeypatch.undo()
    assert os.path.basename(calls[0]) == "config.json"
    assert _snapshot(tmp_path / name) == before
    assert _leftovers(tmp_path) == []
    # A complete run rewrites the JSON files and keeps the other files.
    (tmp_path / name / "config.json").write_text("{}")
    presets_module.generate_presets(tmp_path, names=[name])
    assert _snapshot(tmp_path / name) == before


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "best.weights.h5"
    target.write_bytes(b"old")
    with pytest.raises(Interrupted):
        with atomic.atomic_file(target) as tmp:
            assert tmp.endswith("best.weights.h5")  # Keras checks the suffix
            with open(tmp, "wb") as f:
                f.write(b"ne")
            raise Interrupted
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["best.weights.h5"]
    with atomic.atomic_file(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["best.weights.h5"]


def test_interrupted_train_command_leaves_no_partial_preset(tmp_path, monkeypatch):
    """`keras-vmoe train`: a crash while saving the preset leaves no half
    preset, keeps the backup, and `--resume` then writes the preset."""
    from keras_vmoe import cli
    from keras_vmoe.cli import train_outputs as run_outputs

    out = tmp_path / "run"
    argv = ["train", "--preset", "vit_dense_s32_224", "--dataset", "digits"]
    argv += ["--image-size", "16", "--batch-size", "32", "--steps", "2"]
    argv += ["--eval-split", "none", "--verbose", "0", "--output", str(out)]
    argv += ["--no-distribution"]  # one device, not the 8 simulated ones
    for key, value in dict(
        patch_size=4, num_layers=1, hidden_dim=8, mlp_dim=16, num_heads=2
    ).items():
        argv += ["--override", f"{key}={value}"]

    def crash(preset_dir, *args):
        assert "model.weights.h5" in os.listdir(preset_dir)  # weights written
        raise Interrupted("killed while writing metadata.json")

    monkeypatch.setattr(run_outputs, "write_metadata", crash)
    with pytest.raises(Interrupted):
        cli.main(argv)
    monkeypatch.undo()
    assert "preset" not in os.listdir(out)
    assert "backup" in os.listdir(out)
    assert _leftovers(out) == []
    assert cli.main(argv + ["--resume"]) == 0
    with open(out / "preset" / "metadata.json") as f:
        assert json.load(f)["weights"] == "trained"
    assert models.from_preset(str(out / "preset")).num_classes == 10
    assert "backup" not in os.listdir(out) and _leftovers(out) == []


def test_interrupted_backup_keeps_the_previous_backup(tmp_path, monkeypatch):
    from keras_vmoe.training import BackupAndRestoreWithRNG

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    backup_dir = tmp_path / "backup"
    backup = BackupAndRestoreWithRNG(str(backup_dir), delete_checkpoint=False)
    model.fit(x, y, epochs=1, callbacks=[backup], verbose=0)
    assert BackupAndRestoreWithRNG.resume_epoch(str(backup_dir)) == 1
    before = _snapshot(backup_dir)
    assert sorted(before) == [
        "latest.weights.h5",
        "seed_generator_states.npz",
        "training_metadata.json",
    ]

    def partial_save_weights(filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF\r\n")  # a truncated file
        raise Interrupted("preempted")

    monkeypatch.setattr(model, "save_weights", partial_save_weights)
    with pytest.raises(Interrupted):
        model.fit(x, y, epochs=2, callbacks=[backup], verbose=0)
    monkeypatch.undo()
    assert _snapshot(backup_dir) == before
    assert _leftovers(tmp_path) == []
    history = model.fit(x, y, epochs=2, callbacks=[backup], verbose=0)
    assert len(history.history["loss"]) == 1  # resumed at epoch 2 of 2
    assert BackupAndRestoreWithRNG.resume_epoch(str(backup_dir)) == 2
