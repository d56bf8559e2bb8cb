"""Converted vmoe checkpoints reproduce vmoe's own outputs, block by block.

The fixtures in tests/fixtures/vmoe_reference/ (README.md there) were built,
run and saved by google-research/vmoe itself: a Softmax Token Choice model
(K=2, batch priority, float32 dispatch, groups of 2 images) and a Soft MoE
model (qk-normalised attention, GAP, groups of one image, vmoe's bfloat16
dispatch). Each is converted with `from_vmoe_checkpoint` and compared with
the tensors vmoe computed: logits, pre-logits, encoder output, patch
embedding, every block's output, and the routing (dispatch and combine
tensors) of every MoE block. This runs on whichever backend the suite runs.
"""

import contextlib
import json
import pathlib

import keras
import numpy as np
import pytest

from keras_vmoe.convert import from_vmoe_checkpoint, read_vmoe_checkpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "vmoe_reference"
# Max abs differences allowed: float32 dispatch, and vmoe's bfloat16 dispatch
# (emulated by `bfloat16_dispatch=True`; an input that sits on a bfloat16
# rounding boundary may round the other way after float32 noise).
TOLERANCE = {"vmoe_tc_k2_bpr": 1e-4, "soft_moe": 1e-3}


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module", params=sorted(TOLERANCE))
def converted(request):
    """(name, vmoe's io.npz, converted model, our outputs, our routings)."""
    name = request.param
    folder = FIXTURES / name
    io = dict(np.load(folder / "io.npz"))
    model = from_vmoe_checkpoint(str(folder / "ckpt"), str(folder / "config.json"))
    backbone = model.backbone
    blocks = [
        layer for layer in backbone.layers if layer.name.startswith("encoder_block_")
    ]
    # A sub-model with every intermediate output, run eagerly so that the
    # MoE layers record their routings.
    features = keras.Model(
        backbone.input,
        {
            "embedding": backbone.get_layer("patch_embedding").output,
            "encoded": backbone.get_layer("encoder_norm").output,
            **{block.name: block.output for block in blocks},
        },
    )
    moe_blocks = [block for block in blocks if block.is_moe]
    with contextlib.ExitStack() as stack:
        routings = {
            block.name: stack.enter_context(block.mlp.capture_routing())
            for block in moe_blocks
        }
        outputs = {k: _np(v) for k, v in features(io["images"]).items()}
    head = keras.Model(
        model.input, [model.get_layer("pre_logits").output, model.output]
    )
    outputs["pre_logits"], outputs["logits"] = map(_np, head(io["images"]))
    model(io["images"])  # eager: fills model.losses
    outputs["auxiliary_loss"] = float(sum(_np(loss) for loss in model.losses))
    return name, io, model, outputs, {k: v[-1] for k, v in routings.items()}


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype("float64") - b.astype("float64")).max())


def test_logits_and_features_match_vmoe(converted):
    name, io, _, ours, _ = converted
    tolerance = TOLERANCE[name]
    embedding = io["embedding"]  # (B, h, w, d) conv output
    diffs = {
        "logits": _max_diff(ours["logits"], io["logits"]),
        "pre_logits": _max_diff(ours["pre_logits"], io["pre_logits"]),
        "encoded": _max_diff(ours["encoded"], io["encoded"]),
        "embedding": _max_diff(
            ours["embedding"],
            embedding.reshape(embedding.shape[0], -1, embedding.shape[-1]),
        ),
    }
    for key in io:
        if key.startswith("block_outputs/encoderblock_"):
            i = key.rsplit("_", 1)[1]
            diffs[f"block {i}"] = _max_diff(ours[f"encoder_block_{i}"], io[key])
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    assert not bad, (
        f"{name}: max abs differences above {tolerance}: {bad} (all: {diffs})"
    )
    # The class actually predicted agrees too.
    np.testing.assert_array_equal(ours["logits"].argmax(-1), io["logits"].argmax(-1))


def test_routing_matches_vmoe(converted):
    name, io, _, _, routings = converted
    assert routings, name
    for block, routing in routings.items():
        i = block.rsplit("_", 1)[1]
        dispatch = _np(routing.dispatch_tensor())  # (G, S, E, C)
        combine = _np(routing.combine_tensor())
        ref_dispatch = io[f"routing/encoderblock_{i}/dispatch_weights"].astype(
            "float32"
        )
        ref_combine = io[f"routing/encoderblock_{i}/combine_weights"].astype("float32")
        if name == "vmoe_tc_k2_bpr":
            # Token Choice: the same tokens in the same slots, exactly.
            np.testing.assert_array_equal(dispatch, ref_dispatch)
            # 28 tokens per layer reach no expert (meta.json): drops match.
            assert (ref_dispatch.sum((2, 3)) == 0).sum() == 28
        assert _max_diff(dispatch, ref_dispatch) <= 1e-6, (block, "dispatch")
        assert _max_diff(combine, ref_combine) <= 1e-6, (block, "combine")


def test_auxiliary_loss_matches_vmoe(converted):
    # vmoe's metric is per group; the MoE layers add the mean over groups.
    _, io, _, ours, _ = converted
    expected = float(np.mean(io["metrics/auxiliary_loss"]))
    assert ours["auxiliary_loss"] == pytest.approx(expected, abs=1e-6)


def test_converted_options(converted):
    name, _, model, _, _ = converted
    backbone = model.backbone
    assert backbone.mlp_activation == "gelu_approximate"
    if name == "vmoe_tc_k2_bpr":
        assert backbone.tokens_per_group == 74 and backbone.group_size == 2
        moe = backbone.get_layer("encoder_block_3").mlp
        router = moe.router
        assert (router.router_name, router.num_selected_experts) == (
            "softmax_token_choice",
            2,
        )
        assert router.batch_priority and router.slots_per_expert(74, False) == 20
        assert not moe.bfloat16_dispatch
        assert model.representation_size == 24 and backbone.pooling == "token"
    else:
        assert backbone.tokens_per_group == 16 and backbone.group_size == 1
        moe = backbone.get_layer("encoder_block_2").mlp
        assert moe.router.router_name == "soft" and moe.router.num_slots == 2
        assert moe.bfloat16_dispatch and backbone.attention_qk_norm
        assert backbone.pooling == "gap" and not backbone.use_class_token
        assert model.head_bias_init == pytest.approx(-np.log(5))


def test_legacy_layout_loads_the_same_weights():
    folder = FIXTURES / "vmoe_tc_k2_bpr"
    current = read_vmoe_checkpoint(str(folder / "ckpt"))
    legacy = read_vmoe_checkpoint(str(folder / "ckpt_legacy"))
    flat = {}

    def walk(a, b, path):
        assert sorted(a) == sorted(b), path
        for key in a:
            if isinstance(a[key], dict):
                walk(a[key], b[key], path + (key,))
            else:
                flat["/".join(path + (key,))] = (a[key], b[key])

    walk(current, legacy, ())
    # Every parameter vmoe listed (meta.json), with its shape.
    meta = json.loads((folder / "meta.json").read_text())["param_shapes"]
    assert {p: list(a.shape) for p, (a, _) in flat.items()} == {
        p: shape for p, (shape, _) in meta.items()
    }
    for path, (a, b) in flat.items():
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    # The converted models agree weight for weight.
    config = str(folder / "config.json")
    model = from_vmoe_checkpoint(str(folder / "ckpt_legacy"), config)
    reference = from_vmoe_checkpoint(str(folder / "ckpt"), config)
    for v, w in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(_np(v), _np(w), err_msg=v.path)
    # And they hold the checkpoint's values (one spot check per kind).
    np.testing.assert_array_equal(
        _np(model.get_layer("head").kernel), current["head"]["kernel"]
    )
    experts = model.backbone.get_layer("encoder_block_5").mlp.experts
    np.testing.assert_array_equal(
        _np(experts.output_kernel),
        current["Encoder"]["encoderblock_5"]["Moe"]["Mlp"]["Dense_1"]["kernel"],
    )


def test_bfloat16_dispatch_is_emulated_not_ignored(converted):
    """Without the bfloat16 rounding, Soft MoE logits move by about 1e-3
    (meta.json: max_abs_logit_change_if_dispatch_were_fp32), more than the
    emulated model's difference from vmoe."""
    name, io, model, ours, _ = converted
    if name != "soft_moe":
        pytest.skip("float32 dispatch")
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    moes = [layer.mlp for layer in model.backbone.layers if getattr(layer, "is_moe", 0)]
    assert moes and all(moe.bfloat16_dispatch for moe in moes)
    try:
        for moe in moes:
            moe.bfloat16_dispatch = False
        float32_logits = _np(model(io["images"]))  # eager: reads the attribute
    finally:
        for moe in moes:
            moe.bfloat16_dispatch = True
    without = _max_diff(float32_logits, io["logits"])
    with_rounding = _max_diff(ours["logits"], io["logits"])
    assert without > 5e-4 and without > 5 * with_rounding, (without, with_rounding)
    change = meta["max_abs_logit_change_if_dispatch_were_fp32"]
    assert _max_diff(float32_logits, ours["logits"]) == pytest.approx(change, rel=0.25)
