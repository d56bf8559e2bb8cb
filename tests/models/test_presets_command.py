"""`keras-vmoe presets`: every built-in preset with its size and cost."""

import json

import pytest

from keras_vmoe import cli
from keras_vmoe.cli import presets as presets_command
from keras_vmoe.models import list_presets


def test_lists_every_preset_with_params_and_flops(capsys):
    assert cli.main(["presets"]) == 0
    # The presets' section; the released vmoe checkpoints follow after a
    # blank line (tests/convert/test_released.py).
    lines = capsys.readouterr().out.split("\n\n")[0].strip().splitlines()
    presets = list_presets()
    assert len(presets) == 37
    assert lines[0].split() == ["name", "params", "GFLOPs/image", "router", "experts"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert sorted(rows) == sorted(presets)
    assert lines[-1].startswith("37 presets.")
    for name, meta in presets.items():
        _, params, gflops, router, experts = rows[name]
        assert params == presets_command.human(meta["parameter_count"])
        assert float(gflops) == pytest.approx(meta["flops_per_image"] / 1e9, abs=0.005)
        assert router == (meta["router"] or "dense")
        assert experts == str(meta["num_experts"] or "-")
    # ViT-B/16 by hand: 85.8M backbone parameters (86.6M with a 1000-class
    # head) and 17.56 G multiply-accumulates per 224x224 image.
    assert rows["vit_dense_b16_224"][1:] == ["85.8M", "35.13", "dense", "-"]
    # V-MoE S/32, 32 experts in 2 of 8 blocks: the dense S/32, plus in each
    # MoE block 31 more expert MLPs (2 x 512 x 2048 + 2048 + 512 each), a
    # 512 x 32 router and 4 scalar routing statistics.
    moe, dense = presets["vmoe_softmax_tc_s32_e32_224"], presets["vit_dense_s32_224"]
    extra = 2 * (31 * (2 * 512 * 2048 + 2048 + 512) + 512 * 32 + 4)
    assert moe["parameter_count"] == dense["parameter_count"] + extra
    assert rows["vmoe_softmax_tc_s32_e32_224"][1:4] == [
        "157.0M",
        "3.24",
        "softmax_token_choice",
    ]


def test_json_and_filter(capsys):
    assert cli.main(["presets", "--filter", "vit_dense", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    presets = list_presets()
    assert sorted(listed) == [
        "vit_dense_b16_224",
        "vit_dense_b32_224",
        "vit_dense_h14_224",
        "vit_dense_l16_224",
        "vit_dense_s32_224",
    ]
    for name, entry in listed.items():
        for key in ("parameter_count", "flops_per_image", "classifier_parameter_count"):
            assert entry[key] == presets[name][key]
        assert entry["router"] is None and entry["num_experts"] is None


def test_filter_without_match_is_a_one_line_error(capsys):
    assert cli.main(["presets", "--filter", "resnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "keras-vmoe presets: error: --filter: no preset name contains 'resnet'."
    ]
