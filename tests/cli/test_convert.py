"""`keras-vmoe convert`: vmoe checkpoints into presets, atomically.

The fixtures (tests/fixtures/vmoe_reference/, see its README) are models
built, run and saved by google-research/vmoe itself; `io.npz` holds the
logits vmoe computed. A converted preset must reproduce them after a round
trip through `from_preset`: to 1e-4 with vmoe's float32 einsum dispatch,
1e-3 for Soft MoE, whose dispatcher always rounds to bfloat16.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest

from keras_vmoe import cli, models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "vmoe_reference")
TOLERANCE = {"vmoe_tc_k2_bpr": 1e-4, "soft_moe": 1e-3}
EXPECTED = {  # from each fixture's README row and config.json
    "vmoe_tc_k2_bpr": dict(router="softmax_token_choice", experts=8, moe=[3, 5]),
    "soft_moe": dict(router="soft", experts=4, moe=[2, 3]),
}


def convert(prefix, config, output, *extra):
    return cli.main(
        ["convert", "--checkpoint", str(prefix), "--config", str(config)]
        + ["--output", str(output), *extra]
    )


def fixture(name):
    folder = os.path.join(FIXTURES, name)
    return os.path.join(folder, "ckpt"), os.path.join(folder, "config.json")


def logits(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_converted_preset_matches_vmoe_logits(name, tmp_path, capsys):
    prefix, config = fixture(name)
    output = tmp_path / "converted"
    assert convert(prefix, config, output) == 0
    out = capsys.readouterr().out
    assert f"into {output}" in out and "from_preset" in out
    assert listing(output) == [
        "config.json",
        "image_converter.json",
        "metadata.json",
        "model.weights.h5",
        "preprocessor.json",
        "task.json",
        "task.weights.h5",
    ]
    assert listing(tmp_path) == ["converted"]  # no temporary left beside it

    model = models.from_preset(str(output))
    # The preset carries vmoe's preprocessing (resize, scale to [-1, 1]); a
    # direct call, as here, skips it: the fixture's images are in [-1, 1].
    assert isinstance(model.preprocessor, models.VisionMoEImageClassifierPreprocessor)
    assert model.preprocessor.image_size == model.backbone.image_shape[:2]
    reference = np.load(os.path.join(FIXTURES, name, "io.npz"))
    got = logits(model, reference["images"])
    assert got.shape == reference["logits"].shape
    np.testing.assert_allclose(got, reference["logits"], atol=TOLERANCE[name], rtol=0)


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_metadata_says_where_the_preset_came_from(name, tmp_path):
    prefix, config = fixture(name)
    output = tmp_path / "my_preset"
    assert convert(prefix, config, output) == 0
    with open(output / "metadata.json") as f:
        meta = json.load(f)
    with open(config) as f:
        vmoe_config = json.load(f)
    expected = EXPECTED[name]
    assert meta["name"] == "my_preset"
    assert meta["weights"] == "converted"
    assert meta["tasks"] == ["ImageClassifier"]
    assert os.path.abspath(prefix) in meta["description"]
    assert meta["router"] == expected["router"]
    assert meta["num_experts"] == expected["experts"]
    assert meta["moe_layers"] == expected["moe"]
    source = meta["source"]
    assert source["converted_by"] == "keras-vmoe convert"
    assert source["checkpoint"] == os.path.abspath(prefix)
    assert source["config"] == os.path.abspath(config)
    assert source["vmoe_config"] == vmoe_config
    folder = os.path.dirname(prefix)
    files = sorted(f for f in os.listdir(folder) if f.startswith("ckpt."))
    assert source["checkpoint_files"] == {
        f: os.path.getsize(os.path.join(folder, f)) for f in files
    }
    assert isinstance(source["ignored_vmoe_options"], list)
    # The sizes are the family's (preset_metadata): the classifier's count
    # is the built model's.
    model = models.from_preset(str(output))
    assert meta["classifier_parameter_count"] == model.count_params()
    assert meta["parameter_count"] == model.backbone.count_params()


def test_name_option_and_checkpoint_given_as_its_index(tmp_path):
    prefix, config = fixture("soft_moe")
    output = tmp_path / "out"
    assert convert(prefix + ".index", config, output, "--name", "soft_tiny") == 0
    with open(output / "metadata.json") as f:
        meta = json.load(f)
    assert meta["name"] == "soft_tiny"
    assert meta["source"]["checkpoint"] == os.path.abspath(prefix)


def copy_fixture(name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    return folder / "ckpt", folder / "config.json"


def test_missing_shard_exits_2_and_leaves_nothing(tmp_path, capsys):
    prefix, config = copy_fixture("vmoe_tc_k2_bpr", tmp_path)
    os.remove(f"{prefix}.data-00001-of-00002")
    output = tmp_path / "out" / "preset"
    assert convert(prefix, config, output) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"keras-vmoe convert: error: cannot convert {prefix}: ")
    assert "ckpt.data-00001-of-00002" in err[0]
    assert not output.exists()
    # Nothing else either: no temporary folder beside where DIR would be.
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_failed_conversion_keeps_the_previous_preset(tmp_path, capsys):
    prefix, config = copy_fixture("vmoe_tc_k2_bpr", tmp_path)
    output = tmp_path / "preset"
    assert convert(prefix, config, output) == 0
    before = {f: (output / f).read_bytes() for f in listing(output)}
    # A truncated shard this time.
    shard = f"{prefix}.data-00000-of-00002"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    capsys.readouterr()
    assert convert(prefix, config, output) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert {f: (output / f).read_bytes() for f in listing(output)} == before
    assert listing(tmp_path) == ["preset", "vmoe_tc_k2_bpr"]


def test_config_that_does_not_match_the_checkpoint_exits_2(tmp_path, capsys):
    prefix, _ = fixture("vmoe_tc_k2_bpr")
    _, other = fixture("soft_moe")
    output = tmp_path / "preset"
    assert convert(prefix, other, output) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot convert" in err[0], err
    assert not output.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--checkpoint", "{tmp}/nothing", "--config", "{config}"],
            "--checkpoint: no checkpoint index {tmp}/nothing.index",
        ),
        (
            [
                "--checkpoint",
                "{prefix}",
                "--config",
                "vmoe_b16_imagenet21k_randaug_strongg",
            ],
            "did you mean 'vmoe_b16_imagenet21k_randaug_strong'?",
        ),
        (
            ["--checkpoint", "{prefix}", "--config", "eee_s32_last2_ilsvrc2012"],
            "--config eee_s32_last2_ilsvrc2012: E3 ensembles are not supported",
        ),
        (
            ["--checkpoint", "{prefix}", "--config", "{tmp}/bad.json"],
            "--config: cannot read {tmp}/bad.json as JSON",
        ),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(argv, message, tmp_path, capsys):
    prefix, config = fixture("vmoe_tc_k2_bpr")
    (tmp_path / "bad.json").write_text("{not json")
    values = dict(tmp=tmp_path, prefix=prefix, config=config)
    argv = [a.format(**values) for a in argv] + ["--output", str(tmp_path / "out")]
    assert cli.main(["convert", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("keras-vmoe convert: error: ")
    assert message.format(**values) in err[0]
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_preset(tmp_path, capsys):
    prefix, config = fixture("vmoe_tc_k2_bpr")
    output = tmp_path / "data"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    assert convert(prefix, config, output) == 2
    err = capsys.readouterr().err
    assert "holds files but no config.json" in err
    assert listing(output) == ["notes.txt"]


def test_convert_is_a_registered_command():
    from keras_vmoe.cli import _COMMANDS

    assert _COMMANDS["convert"] == "keras_vmoe.cli.convert"
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--checkpoint", "x"])  # --config, --output missing
    assert info.value.code == 2


def test_released_name_as_config(tmp_path, monkeypatch):
    """`--config NAME` takes the released record's config and records it."""
    from keras_vmoe.convert import released

    prefix, config = fixture("vmoe_tc_k2_bpr")
    with open(config) as f:
        vmoe_config = json.load(f)
    record = released.ReleasedCheckpoint(
        name="tiny_release",
        description="A tiny released V-MoE.",
        dataset="none",
        image_size=24,
        model_config=vmoe_config,
        config_source="tests/fixtures/vmoe_reference/vmoe_tc_k2_bpr/config.json",
        assumed=("K: 2",),
    )
    monkeypatch.setitem(released.RELEASED_CHECKPOINTS, "tiny_release", record)
    output = tmp_path / "tiny"
    assert convert(prefix, "tiny_release", output) == 0
    with open(output / "metadata.json") as f:
        meta = json.load(f)
    assert meta["description"].startswith("A tiny released V-MoE. V-MoE converted")
    assert "gs://vmoe_checkpoints/tiny_release" in meta["description"]
    source = meta["source"]
    assert source["config"] == "tiny_release"
    assert source["released_checkpoint"] == "gs://vmoe_checkpoints/tiny_release"
    assert source["config_source"] == record.config_source
    assert source["vmoe_config"] == vmoe_config
    assert source["assumed"] == ["K: 2"] and source["image_size"] == 24
    reference = np.load(os.path.join(FIXTURES, "vmoe_tc_k2_bpr", "io.npz"))
    got = logits(models.from_preset(str(output)), reference["images"])
    np.testing.assert_allclose(got, reference["logits"], atol=1e-4, rtol=0)
