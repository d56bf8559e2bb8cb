"""from_vmoe_checkpoint on synthetic checkpoints: options, weights, errors.

The checkpoints are written by the tests' own writer (`vmoe_writer.py`),
with parameter shapes worked out from the vmoe config independently of the
converter (`vmoe_param_shapes`).
"""

import copy
import json
import sys

import keras
import numpy as np
import pytest

from keras_vmoe import convert
from keras_vmoe.convert import (
    CheckpointMismatch,
    UnsupportedVmoeOption,
    from_vmoe_checkpoint,
    load_vmoe_config,
    vmoe_config_to_keras,
)
from keras_vmoe.convert.vmoe import keras_weight_path, vmoe_parameter_path
from tests.convert.vmoe_writer import (
    flatten,
    random_params,
    vmoe_param_shapes,
    write_vmoe_checkpoint,
)

IMAGE = 16  # 16x16 images, 4x4 patches: 16 patches (+ class token)


def _config(router=None, **encoder_overrides):
    moe = {
        "layers": [1],
        "num_experts": 4,
        "group_size": 34,  # 2 images of 17 tokens
        "dropout_rate": 0.0,
        "split_rngs": False,
        "router": router
        or {
            "num_selected_experts": 2,
            "noise_std": 1.0,
            "importance_loss_weight": 0.005,
            "load_loss_weight": 0.005,
            "dispatcher": {
                "name": "einsum",
                "bfloat16": True,
                "capacity_factor": 1.05,
                "partition_spec": [["expert", "replica"]],
                "batch_priority": False,
            },
        },
    }
    encoder = {
        "num_layers": 2,
        "mlp_dim": 16,
        "num_heads": 2,
        "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0,
        "moe": moe,
        **encoder_overrides,
    }
    return {
        "name": "VisionTransformerMoe",
        "num_classes": 3,
        "patch_size": [4, 4],
        "hidden_size": 8,
        "classifier": "token",
        "representation_size": 8,
        "head_bias_init": -1.0986,
        "encoder": encoder,
    }


def _write(tmp_path, config, params=None, **writer_kwargs):
    shapes = vmoe_param_shapes(config, IMAGE)
    params = params or random_params(shapes, seed=1)
    prefix = str(tmp_path / "ckpt")
    write_vmoe_checkpoint(prefix, params, **writer_kwargs)
    return prefix, params


def _weights_by_vmoe_path(model):
    return {
        vmoe_parameter_path(v.path): keras.ops.convert_to_numpy(v)
        for v in model.weights
        if v.trainable
    }


def test_synthetic_checkpoint_loads_every_parameter_once(tmp_path):
    config = _config()
    prefix, params = _write(
        tmp_path, config, num_shards=3, max_chunk_bytes=100, max_piece_bytes=48
    )
    model = from_vmoe_checkpoint(prefix, config)
    loaded = _weights_by_vmoe_path(model)
    expected = {"/".join(p): a for p, a in flatten(params)}
    assert sorted(loaded) == sorted(expected)  # each parameter, each weight
    for path, array in expected.items():
        np.testing.assert_array_equal(loaded[path], array, err_msg=path)
    logits = keras.ops.convert_to_numpy(
        model(np.zeros((2, IMAGE, IMAGE, 3), "float32"))
    )
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    import ml_dtypes

    config = _config()
    shapes = vmoe_param_shapes(config, IMAGE)
    params = random_params(shapes, seed=2, dtype=ml_dtypes.bfloat16)
    prefix, _ = _write(tmp_path, config, params)
    model = from_vmoe_checkpoint(prefix, config)
    kernel = model.get_layer("head").kernel
    assert kernel.dtype == "float32"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(kernel), params["head"]["kernel"].astype("float32")
    )


@pytest.mark.parametrize(
    "router, name, expected",
    [
        (
            {  # vmoe's defaults: K=1, losses 1.0, capacity multiple of 4
                "dispatcher": {
                    "name": "indices",
                    "capacity_factor": 1.5,
                    "batch_priority": True,
                },
            },
            "softmax_token_choice",
            dict(
                num_selected_experts=1,
                importance_loss_weight=1.0,
                load_loss_weight=1.0,
                gshard_loss_weight=0.0,
                noise_std=1.0,
                batch_priority=True,
                capacity_factor=1.5,
                capacity_multiple_of=4,
                capacity_ceil_or_round="ceil",
                slots=16,
            ),  # ceil(34*1.5/4)=13 -> 16
        ),
        (
            {
                "name": "NoisyTopExpertsPerItemRouter",
                "num_selected_experts": 2,
                "gshard_loss_weight": 0.01,
                "noise_std": 0.5,
                "dispatcher": {
                    "name": "einsum",
                    "capacity_factor": 1.0,
                    "capacity_ceil_or_round": "round",
                    "capacity_multiple_of": None,
                    "batch_priority": False,
                },
            },
            "softmax_token_choice",
            dict(
                num_selected_experts=2,
                gshard_loss_weight=0.01,
                noise_std=0.5,
                capacity_multiple_of=1,
                capacity_ceil_or_round="round",
                slots=17,
            ),  # round(34*2*1.0/4) = 17, no multiple
        ),
        (
            {
                "name": "vmoe.projects.sparsity_constrained_ot.kl_projection_routing."
                "KLProjectionNoisyTopExpertsPerItemRouter",
                "num_selected_experts": 2,
                "maxiter": 7,
                "use_implicit_differentiation": False,
                "dispatcher": {"name": "einsum", "capacity": 9, "batch_priority": True},
            },
            "sinkhorn_token_choice",
            dict(
                num_iters=7,
                capacity=9,
                importance_loss_weight=0.0,
                load_loss_weight=0.0,
                batch_priority=True,
                epsilon=1.0,
                slots=9,
            ),
        ),
        (
            {
                "name": "NoisyTopItemsPerExpertRouter",
                "noise_std": 1.0,
                "dispatcher": {
                    "name": "einsum",
                    "capacity_factor": 2.0,
                    "capacity_multiple_of": 0,
                },
            },
            "softmax_expert_choice",
            dict(capacity_factor=2.0, capacity_multiple_of=1, slots=17),
        ),
        (
            {
                "name": "KLProjectionNoisyTopItemsPerExpertRouter",
                "maxiter": 11,
                "use_softmax_combine_weights": True,
                "dispatcher": {"name": "einsum", "capacity_factor": 2.0},
            },
            "sinkhorn_expert_choice",
            dict(num_iters=11, noise_std=1.0, slots=20),  # ceil(17) -> 20
        ),
        (
            {
                "name": "KSparseProjectionTransportTopItemsPerExpertRouter",
                "maxiter": 5,
                "adam_lr": 0.05,
                "noise_std": 1.0,
                "dispatcher": {
                    "name": "einsum",
                    "capacity_factor": 2.0,
                    "bfloat16": False,
                },
            },
            "sparsity_constrained_expert_choice",
            # vmoe's k-sparse router never adds noise.
            dict(num_steps=5, learning_rate=0.05, noise_std=0.0, slots=20),
        ),
        (
            {
                "name": "vmoe.projects.soft_moe.router.SoftRouter",
                "capacity_factor": None,
                "num_slots": 3,
                "compute_similarity_metrics": True,
            },
            "soft",
            dict(num_slots=3, slots=3),
        ),
        (
            {"name": "SoftRouter"},  # vmoe's default capacity_factor 1.0
            "soft",
            dict(num_slots=None, capacity_factor=1.0, slots=8),  # round(34/4)
        ),
    ],
)
def test_router_options(tmp_path, router, name, expected):
    config = _config(router)
    prefix, _ = _write(tmp_path, config)
    model = from_vmoe_checkpoint(prefix, config)
    moe = model.backbone.get_layer("encoder_block_1").mlp
    assert moe.router.router_name == name
    expected = dict(expected)
    assert moe.router.slots_per_expert(34, training=False) == expected.pop("slots")
    for key, value in expected.items():
        assert getattr(moe.router, key) == value, key
    dispatcher = router.get("dispatcher", {})
    assert moe.bfloat16_dispatch == (
        name == "soft" or dispatcher.get("bfloat16", False)
    )
    assert model.backbone.mlp_activation == "gelu_approximate"
    logits = keras.ops.convert_to_numpy(
        model(np.random.RandomState(0).rand(2, IMAGE, IMAGE, 3).astype("float32"))
    )
    assert np.isfinite(logits).all()


@pytest.mark.parametrize(
    "classifier, group_size, images, tokens",
    [
        ("token", 34, 2, 17),  # two whole images of 17 tokens
        ("gap", 8, 1, 16),  # half an image: 2 groups per image
        ("gap", 24, 3, 16),  # one and a half images: 3 images fill 2 groups
    ],
)
def test_group_size_counts_tokens(tmp_path, classifier, group_size, images, tokens):
    config = _config()
    config["classifier"] = classifier
    config["encoder"]["moe"]["group_size"] = group_size
    prefix, _ = _write(tmp_path, config)
    model = from_vmoe_checkpoint(prefix, config)
    backbone = model.backbone
    assert backbone.sequence_length == tokens
    assert backbone.tokens_per_group == group_size == backbone.layout.tokens_per_group
    assert backbone.group_size == images  # images whose tokens fill whole groups
    moe = backbone.get_layer("encoder_block_1").mlp
    assert moe.group_size == group_size
    x = np.random.RandomState(0).rand(images * 2, IMAGE, IMAGE, 3).astype("float32")
    with moe.capture_routing() as routings:
        model(x)
    assert routings[-1].num_tokens == group_size
    assert routings[-1].dispatch_tensor().shape[0] == images * 2 * tokens // group_size


def test_released_name_and_json_path(tmp_path, monkeypatch):
    config = _config()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert load_vmoe_config(str(path)) == (config, None)

    class Record:
        supported = True
        evaluation_overrides = {
            "encoder": {"moe": {"router": {"dispatcher": {"capacity_factor": 4.0}}}}
        }

        def vmoe_config(self):
            return copy.deepcopy(config)

    class Released:
        RELEASED_CHECKPOINTS = {"tiny_released": Record()}

    monkeypatch.setitem(sys.modules, "keras_vmoe.convert.released", Released)
    monkeypatch.setattr(convert, "released", Released, raising=False)
    prefix, _ = _write(tmp_path, config)
    model = from_vmoe_checkpoint(prefix, "tiny_released")
    router = model.backbone.get_layer("encoder_block_1").mlp.router
    assert router.eval_capacity_factor == 4.0 and router.capacity_factor == 1.05
    assert router.slots_per_expert(34, training=False) == 68  # 34 * 2 * 4 / 4
    with pytest.raises(
        ValueError, match=r"'tiny_releasd'.*Did you mean \['tiny_released'\]"
    ):
        from_vmoe_checkpoint(prefix, "tiny_releasd")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_vmoe_config(str(tmp_path / "nothing.json"))


def test_released_name_without_a_table(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_vmoe.convert.released", None)
    monkeypatch.delattr(convert, "released", raising=False)
    with pytest.raises(ValueError, match="no table of released vmoe checkpoints"):
        load_vmoe_config("vmoe_b16_imagenet21k_randaug_strong")


def test_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    config = _config()
    prefix, _ = _write(tmp_path, config)
    wrong = copy.deepcopy(config)
    wrong["encoder"]["mlp_dim"] = 12
    with pytest.raises(
        CheckpointMismatch,
        match=r"'Encoder/encoderblock_0/Mlp/Dense_0/bias' has shape \(16,\), but the "
        r"model of the config expects \(12,\)",
    ):
        from_vmoe_checkpoint(prefix, wrong)
    wrong = copy.deepcopy(config)
    wrong["encoder"]["moe"]["num_experts"] = 2
    with pytest.raises(
        CheckpointMismatch, match=r"Moe/Mlp/Dense_0/bias' has shape \(4, 16\)"
    ):
        from_vmoe_checkpoint(prefix, wrong)


def test_missing_and_extra_parameters_are_named(tmp_path):
    config = _config()
    shapes = vmoe_param_shapes(config, IMAGE)
    params = random_params(shapes)
    del params["head"]["bias"]
    prefix, _ = _write(tmp_path / "missing", config, params)
    with pytest.raises(
        CheckpointMismatch, match=r"Missing checkpoint parameter 'head/bias'"
    ):
        from_vmoe_checkpoint(prefix, config)

    params = random_params(shapes)
    params["Encoder"]["encoderblock_0"]["Extra"] = {
        "kernel": np.zeros((2, 2), "float32")
    }
    prefix, _ = _write(tmp_path / "extra", config, params)
    with pytest.raises(
        CheckpointMismatch,
        match=r"Extra checkpoint parameter 'Encoder/encoderblock_0/Extra/kernel'",
    ):
        from_vmoe_checkpoint(prefix, config)

    # The config puts an MoE in block 0, the checkpoint has its dense MLP.
    wrong = copy.deepcopy(config)
    wrong["encoder"]["moe"]["layers"] = [0, 1]
    prefix, _ = _write(tmp_path / "moe", config)
    with pytest.raises(
        CheckpointMismatch,
        match=r"Extra checkpoint parameter 'Encoder/encoderblock_0/Mlp/",
    ):
        from_vmoe_checkpoint(prefix, wrong)


def _set(config, dotted, value):
    node = config
    *parents, key = dotted.split(".")
    for name in parents:
        node = node[name]
    node[key] = value


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("classifier", "map", r"classifier='map'"),
        (
            "name",
            "VisionTransformerMoeEnsemble",
            r"name='VisionTransformerMoeEnsemble'",
        ),
        ("encoder.position_emb", {"name": "sincos2d"}, r"encoder\.position_emb="),
        (
            "encoder.moe.router.name",
            "TopKRouter",
            r"encoder\.moe\.router\.name='TopKRouter'",
        ),
        (
            "encoder.moe.router.deterministic",
            False,
            r"encoder\.moe\.router\.deterministic=False",
        ),
        ("encoder.moe.router.dispatcher.name", "dense", r"dispatcher\.name='dense'"),
        (
            "encoder.moe.router.dispatcher.fancy",
            1,
            r"'encoder\.moe\.router\.dispatcher\.fancy'",
        ),
        ("encoder.moe.ensemble_size", 2, r"'encoder\.moe\.ensemble_size'"),
        ("encoder.stochastic_depth", 0.1, r"'encoder\.stochastic_depth'"),
        ("encoder.dtype", "bfloat16", r"encoder\.dtype='bfloat16'"),
        ("num_classes", None, r"num_classes=None"),
    ],
)
def test_unsupported_options_are_named(option, value, message):
    config = _config()
    _set(config, option, value)
    with pytest.raises(UnsupportedVmoeOption, match=message):
        vmoe_config_to_keras(config, (IMAGE, IMAGE, 3))


@pytest.mark.parametrize(
    "router, message",
    [
        (
            {
                "name": "KLProjectionNoisyTopExpertsPerItemRouter",
                "use_lbfgs": True,
                "dispatcher": {"name": "einsum", "capacity_factor": 1.0},
            },
            r"use_lbfgs=True",
        ),
        (
            {
                "name": "KLProjectionNoisyTopItemsPerExpertRouter",
                "use_softmax_combine_weights": False,
                "dispatcher": {"name": "einsum", "capacity_factor": 1.0},
            },
            r"use_softmax_combine_weights=False",
        ),
        (
            {"name": "SoftRouter", "noise_std": 0.5},
            r"encoder\.moe\.router\.noise_std=0\.5",
        ),
        ({"dispatcher": {"name": "einsum"}}, r"capacity_factor"),
        (
            {"name": "KSparseProjectionTransportTopExpertsPerItemRouter"},
            r"KSparseProjectionTransportTopExpertsPerItemRouter",
        ),
    ],
)
def test_unsupported_router_options_are_named(router, message):
    with pytest.raises(UnsupportedVmoeOption, match=message):
        vmoe_config_to_keras(_config(router), (IMAGE, IMAGE, 3))


def test_config_mapping_of_a_released_style_config():
    """The V-MoE paper's S/32 settings (vmoe_paper/common.py) map one to one."""
    config = _config()
    config.update(hidden_size=512, representation_size=512, patch_size=[32, 32])
    config["encoder"].update(num_layers=8, mlp_dim=2048, num_heads=8)
    config["encoder"]["moe"].update(
        layers=[5, 7], num_experts=8, group_size=400, dropout_rate=0.2
    )
    backbone, classifier, ignored = vmoe_config_to_keras(config, (224, 224, 3))
    assert backbone["moe_layers"] == [5, 7] and backbone["num_experts"] == 8
    assert backbone["tokens_per_group"] == 400 and backbone["group_size"] == 8
    assert backbone["expert_dropout_rate"] == 0.2 and backbone["dropout_rate"] == 0.0
    assert backbone["bfloat16_dispatch"] and backbone["identical_expert_init"]
    assert backbone["router_config"] == dict(
        capacity_factor=1.05,
        capacity_ceil_or_round="ceil",
        capacity_multiple_of=4,
        batch_priority=False,
        noise_std=1.0,
        num_selected_experts=2,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        gshard_loss_weight=0.0,
    )
    assert classifier == dict(
        num_classes=3, representation_size=512, head_bias_init=-1.0986
    )
    assert "encoder.moe.router.dispatcher.partition_spec" in ignored


def test_non_square_position_embedding_needs_image_shape(tmp_path):
    config = _config()
    config["encoder"]["moe"]["group_size"] = 3 * 8 + 1  # one 12x32 image per group
    shapes = vmoe_param_shapes(config, IMAGE)
    shapes["Encoder/posembed_input/pos_embedding"] = (1, 3 * 8 + 1, 8)
    prefix, _ = _write(tmp_path, config, random_params(shapes))
    with pytest.raises(CheckpointMismatch, match="image_shape="):
        from_vmoe_checkpoint(prefix, config)
    model = from_vmoe_checkpoint(prefix, config, image_shape=(12, 32, 3))
    assert model.backbone.sequence_length == 25


def test_weight_path_rules_are_inverse():
    for vmoe_path in (
        "cls",
        "Encoder/encoderblock_11/SelfAttention/query_ln/scale",
        "Encoder/encoderblock_2/Moe/Router/mu",
        "Encoder/encoderblock_3/LayerNorm_1/bias",
    ):
        assert vmoe_parameter_path(keras_weight_path(vmoe_path)) == vmoe_path
    assert keras_weight_path("Encoder/encoderblock_2/Moe/Router/mu") == (
        "encoder_block_2/moe/router/slot_embeddings"
    )
    assert keras_weight_path("MapHead/probe") is None
