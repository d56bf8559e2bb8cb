"""The table of released V-MoE checkpoints (keras_vmoe.convert.released).

Every checkpoint that google-research/vmoe's README lists is in the table;
every convertible record's vmoe config maps, through the converter's config
map and without weights, onto a valid `VisionMoEBackbone` config with the
architecture of vmoe's config files (worked out by hand below); the E3
ensembles are listed and refused; the README shows the same table; and
`keras-vmoe presets` lists them.
"""

import math
import os

import pytest

from keras_vmoe import cli
from keras_vmoe.convert import (
    UnsupportedVmoeOption,
    load_vmoe_config,
    released,
    vmoe_config_to_keras,
)
from keras_vmoe.convert.released import RELEASED_CHECKPOINTS
from keras_vmoe.models import VisionMoEBackbone
from keras_vmoe.models.vision_moe import cost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The prefixes in the "Checkpoints" section of google-research/vmoe's README.
README_PREFIXES = (
    "gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1",
    "gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
    "gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_medium",
    "gs://vmoe_checkpoints/vmoe_b16_imagenet21k_randaug_strong",
    "gs://vmoe_checkpoints/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
    "gs://vmoe_checkpoints/eee_s32_last2_ilsvrc2012",
    "gs://vmoe_checkpoints/eee_s32_last2_ilsvrc2012_ft_cifar100",
)
SUPPORTED = [name for name, r in RELEASED_CHECKPOINTS.items() if r.supported]
ENSEMBLES = ("eee_s32_last2_ilsvrc2012", "eee_s32_last2_ilsvrc2012_ft_cifar100")

# By hand from vmoe's configs (vmoe_paper/common.py get_vmoe_config and the
# files named in each record): (hidden, blocks, mlp, heads, patch, image,
# MoE blocks, tokens per group, capacity factor, classes, pre-logits).
S32 = (512, 8, 2048, 8, 32)
B16 = (768, 12, 3072, 12, 16)
ARCHITECTURES = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": (
        *S32, 224, [5, 7], 8 * (7 * 7 + 1), 1.05, 1000, 512),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": (
        *S32, 384, [5, 7], 8 * (12 * 12 + 1), 1.5, 1000, None),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": (
        *S32, 224, [5, 7], 8 * (7 * 7 + 1), 1.05, 1000, 512),
    "vmoe_b16_imagenet21k_randaug_strong": (
        *B16, 224, [1, 3, 5, 7, 9, 11], 8 * (14 * 14 + 1), 1.05, 21843, None),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": (
        *B16, 384, [1, 3, 5, 7, 9, 11], 8 * (24 * 24 + 1), 1.5, 1000, None),
}  # fmt: skip


def test_every_readme_checkpoint_is_listed():
    assert sorted(r.prefix for r in RELEASED_CHECKPOINTS.values()) == sorted(
        README_PREFIXES
    )
    assert sorted(SUPPORTED) == sorted(ARCHITECTURES)
    for name, record in RELEASED_CHECKPOINTS.items():
        assert record.name == name
        assert record.files == (
            f"gs://vmoe_checkpoints/{name}.index",
            f"gs://vmoe_checkpoints/{name}.data-*",
        )
        assert record.download_command == (
            f"gsutil -m cp 'gs://vmoe_checkpoints/{name}.*' checkpoints/"
        )
        assert record.description and record.dataset and record.config_source
        # Every config names where it was read (or says there is none).
        assert "google-research/vmoe" in record.config_source


@pytest.mark.parametrize("name", SUPPORTED)
def test_config_maps_to_a_valid_backbone(name):
    record = RELEASED_CHECKPOINTS[name]
    size = record.image_size
    backbone, classifier, _ = vmoe_config_to_keras(
        record.vmoe_config(), (size, size, 3)
    )
    # Validated and laid out as the backbone would be, without building it.
    resolved = cost.resolve_backbone_config(backbone)
    arguments = VisionMoEBackbone.arguments_from_config(backbone)
    assert arguments["router"] == "softmax_token_choice"
    hidden, blocks, mlp, heads, patch, image, moe, tokens, factor, classes, rep = (
        ARCHITECTURES[name]
    )
    assert size == image
    assert resolved["hidden_dim"] == hidden and resolved["num_layers"] == blocks
    assert resolved["mlp_dim"] == mlp and resolved["num_heads"] == heads
    assert resolved["patch_size"] == (patch, patch)
    assert resolved["image_shape"] == (image, image, 3)
    assert list(resolved["moe_layer_indices"]) == moe
    assert resolved["num_experts"] == 8
    assert resolved["tokens_per_group"] == tokens
    assert resolved["sequence_length"] == (image // patch) ** 2 + 1
    assert resolved["use_class_token"] and resolved["pooling"] == "token"
    assert resolved["mlp_activation"] == "gelu_approximate"
    router = resolved["router_config"]
    assert router["num_selected_experts"] == 2
    assert router["capacity_factor"] == factor
    assert router["batch_priority"] is False
    assert resolved["bfloat16_dispatch"] is True
    assert classifier["num_classes"] == classes
    assert classifier["representation_size"] == rep
    # The MoE blocks add 7 expert MLPs each (and a d x 8 router) to the dense
    # model of the same config.
    dense = dict(backbone, router=None, moe_layers=None, num_experts=None)
    dense.pop("router_config"), dense.pop("tokens_per_group")
    extra = cost.count_backbone_params(backbone) - cost.count_backbone_params(dense)
    expert = 2 * hidden * mlp + mlp + hidden
    statistics = extra - len(moe) * (7 * expert + hidden * 8)
    assert 0 <= statistics <= 8 * len(moe)  # the MoE layers' statistic counters


def test_light1_evaluates_at_capacity_factor_4():
    config, overrides = load_vmoe_config("vmoe_s32_last2_ilsvrc2012_randaug_light1")
    assert (
        config
        == RELEASED_CHECKPOINTS["vmoe_s32_last2_ilsvrc2012_randaug_light1"].model_config
    )
    assert overrides == {
        "encoder": {"moe": {"router": {"dispatcher": {"capacity_factor": 4.0}}}}
    }
    assert config["head_bias_init"] == pytest.approx(-math.log(1000))
    assert config["encoder"]["moe"]["dropout_rate"] == 0.2


def test_medium_says_what_no_vmoe_file_states():
    record = RELEASED_CHECKPOINTS["vmoe_s32_last2_ilsvrc2012_randaug_medium"]
    assert record.config_source.startswith("no config file")
    assert any("num_selected_experts" in entry for entry in record.assumed)
    for name in ARCHITECTURES:
        if name != record.name:
            assert RELEASED_CHECKPOINTS[name].assumed == ()


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensembles_are_listed_but_refused(name):
    record = RELEASED_CHECKPOINTS[name]
    assert not record.supported and record.convert_command is None
    assert "not supported" in record.notes[0]
    with pytest.raises(ValueError, match="not supported"):
        record.vmoe_config()
    with pytest.raises(UnsupportedVmoeOption, match="does not convert"):
        load_vmoe_config(name)
    if record.model_config is not None:  # the fine-tuned one has a config
        with pytest.raises(UnsupportedVmoeOption, match="VisionTransformerMoeEnsemble"):
            vmoe_config_to_keras(record.model_config, (128, 128, 3))


def test_lookup_by_name_or_prefix_with_suggestions():
    record = released.released_checkpoint(
        "gs://vmoe_checkpoints/vmoe_b16_imagenet21k_randaug_strong"
    )
    assert record.name == "vmoe_b16_imagenet21k_randaug_strong"
    with pytest.raises(
        KeyError, match="Did you mean 'vmoe_s32_last2_ilsvrc2012_randaug_medium'"
    ):
        released.released_checkpoint("vmoe_s32_last2_ilsvrc2012_randaug_mediun")


def test_convert_commands():
    for name in SUPPORTED:
        assert RELEASED_CHECKPOINTS[name].convert_command == (
            f"keras-vmoe convert --checkpoint checkpoints/{name} --config {name} "
            f"--output converted/{name}"
        )


def test_readme_shows_the_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "## Official V-MoE checkpoints" in readme
    assert released.markdown_table() in readme


def test_presets_command_lists_them_as_convertible(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    section = out.split("Official V-MoE checkpoints", 1)[1].splitlines()
    rows = {line.split()[0]: line.split() for line in section[2:-1]}
    assert sorted(rows) == sorted(RELEASED_CHECKPOINTS)
    for name in SUPPORTED:
        assert rows[name][-1] == "yes", rows[name]
        assert rows[name][3:6] == [
            "softmax_token_choice",
            "8",
            str(ARCHITECTURES[name][5]),
        ]
    for name in ENSEMBLES:
        assert rows[name][-3:] == ["no", "(E3", "ensemble)"]
    assert section[-1].startswith("7 released checkpoints, 5 convertible.")


def test_presets_json_and_filter(capsys):
    import json

    assert cli.main(["presets", "--filter", "b16_imagenet21k", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(listed) == [
        "vmoe_b16_imagenet21k_randaug_strong",
        "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
    ]
    entry = listed["vmoe_b16_imagenet21k_randaug_strong"]
    assert entry["kind"] == "released_vmoe_checkpoint" and entry["convertible"]
    assert entry["num_classes"] == 21843 and entry["moe_layers"] == [1, 3, 5, 7, 9, 11]
    assert (
        entry["convert_command"]
        == RELEASED_CHECKPOINTS["vmoe_b16_imagenet21k_randaug_strong"].convert_command
    )
