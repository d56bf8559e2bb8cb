"""The router contract: what every router declares, and a router added here.

`CosineExpertChoiceRouter` below is defined and registered in this file
only. The tests run it through everything that asks a router for its
settings (backbone, cost model, presets, a preset override, the study's
equal-compute settings and a quick study run, the layout map) without any
other file knowing about it.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe import routers
from keras_vmoe.routers import (
    ComputeBudget,
    DenseGatingRouter,
    PresetRecipe,
    Router,
    SoftRouting,
    SparseRouting,
    expert_choice,
    register_router,
)
from keras_vmoe.routers.sparse_router import EXPERT_CHOICE_CAPACITY_FACTOR
from tests.numpy_reference import expert_choice as np_expert_choice

BUILT_IN = (
    "softmax_token_choice",
    "sinkhorn_token_choice",
    "softmax_expert_choice",
    "sinkhorn_expert_choice",
    "sparsity_constrained_expert_choice",
    "soft",
)
NEW = "cosine_expert_choice"


class CosineExpertChoiceRouter(DenseGatingRouter):
    """Expert Choice on the softmax of scaled cosine similarities.

    `gates = softmax(8 * cos(x_s, w_e))` over experts; each expert takes its
    top-C tokens by gate. Capacity counts `S` tokens.
    """

    label = "Cosine Expert Choice"

    # A `DefaultCapacityFactor` default (2.0) gives way to an explicit
    # `capacity`, as `equal_compute_config` sets.
    def __init__(
        self, num_experts, capacity_factor=EXPERT_CHOICE_CAPACITY_FACTOR, **kwargs
    ):
        super().__init__(num_experts, capacity_factor=capacity_factor, **kwargs)

    def call(self, x, training=False):
        x = self.check_groups(x)
        x_n = x / ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True) + 1e-6)
        w = ops.cast(self.gating_kernel, "float32")  # (d, E)
        w_n = w / ops.sqrt(ops.sum(w * w, axis=0, keepdims=True) + 1e-6)
        gates = ops.softmax(8.0 * ops.matmul(x_n, w_n), axis=-1)  # (G, S, E)
        return expert_choice(gates, self.slots_per_expert(x.shape[1], training))

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="cosine_ec",
            router_config={"capacity_factor": 2.0},
            images_per_group=8,
            description="Cosine Expert Choice (capacity factor 2)",
        )


@pytest.fixture(scope="module")
def new_router():
    """Registers the router for this module's tests, then removes it."""
    cls = register_router(NEW, package="keras_vmoe_tests")(CosineExpertChoiceRouter)
    yield cls
    routers.unregister_router(NEW)


def _np_cosine_gates(x, w):
    x_n = x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    w_n = w / np.sqrt((w * w).sum(0, keepdims=True) + 1e-6)
    logits = 8.0 * x_n @ w_n
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------
# What every built-in router declares.
# --------------------------------------------------------------------------
def test_the_six_routers_are_registered_in_the_papers_order():
    assert tuple(routers.ROUTER_NAMES)[: len(BUILT_IN)] == BUILT_IN
    for name in BUILT_IN:
        cls = routers.get_class(name)
        assert issubclass(cls, Router) and cls.router_name == name
        assert isinstance(cls.label, str) and cls.label


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize(
    "budget",
    [
        ComputeBudget(
            tokens_per_group=34,
            num_experts=4,
            slots_per_expert=17,
            num_selected_experts=2,
        ),
        ComputeBudget(tokens_per_group=12, num_experts=3, slots_per_expert=5),
    ],
    ids=["S34-E4-C17-K2", "S12-E3-C5-K1"],
)
def test_equal_compute_config_fills_the_budget(name, budget):
    cls = routers.get_class(name)
    router = cls(num_experts=budget.num_experts, **cls.equal_compute_config(budget))
    s = budget.tokens_per_group
    assert router.slots_per_expert(s, training=True) == budget.slots_per_expert
    assert router.slots_per_expert(s, training=False) == budget.slots_per_expert
    assert router.expert_slots(s) == budget.expert_slots
    # The routing the router actually returns has that capacity.
    x = np.random.default_rng(0).normal(size=(2, s, 8)).astype("float32")
    routing = router(x)
    assert routing.capacity == budget.slots_per_expert
    assert isinstance(routing, cls.routing_class)


@pytest.mark.parametrize("name", BUILT_IN)
def test_weight_count_and_names_match_the_built_router(name):
    cls = routers.get_class(name)
    config = cls.preset_recipe().router_config
    router = cls(num_experts=4, **config)
    s, d = 24, 8
    router.build((None, s, d))
    assert router.weight_count(d, s) == router.count_params()
    assert {w.name for w in router.weights} - {"seed_generator_state"} == set(
        cls.weight_names
    )


def test_routing_macs_by_hand():
    # Dense gating: S * d * E = 24 * 8 * 4 = 768.
    assert (
        routers.get("softmax_expert_choice", num_experts=4).routing_macs(24, 8) == 768
    )
    # Soft MoE, 3 slots per expert: logits, dispatch and combine over
    # E * P = 12 slots, 3 * 24 * 8 * 12 = 6912.
    assert routers.get("soft", num_experts=4, num_slots=3).routing_macs(24, 8) == 6912


def test_routing_classes():
    assert routers.get_class("soft").routing_class is SoftRouting
    for name in BUILT_IN[:-1]:
        assert routers.get_class(name).routing_class is SparseRouting


def test_compute_budget_from_capacity_factor_by_hand():
    # ceil(68 * 2 * 1.05 / 8) = ceil(17.85) = 18.
    budget = ComputeBudget.from_capacity_factor(68, 8, 2, 1.05)
    assert (budget.slots_per_expert, budget.expert_slots) == (18, 144)
    with pytest.raises(ValueError, match="num_selected_experts"):
        ComputeBudget(10, 2, 5, num_selected_experts=3)


def test_register_router_refuses_non_routers_and_taken_names():
    with pytest.raises(TypeError, match="subclasses of keras_vmoe.routers.Router"):
        register_router("not_a_router")(keras.layers.Dense)
    with pytest.raises(ValueError, match="already registered"):

        @register_router("soft")
        class AnotherSoftRouter(routers.SoftRouter):
            pass

    with pytest.raises(ValueError, match="identifier"):
        register_router("two words")


# --------------------------------------------------------------------------
# A router defined in this file, through the whole package.
# --------------------------------------------------------------------------
def test_new_router_routes_like_numpy(new_router):
    router = routers.get(NEW, num_experts=4)
    x = np.random.default_rng(1).normal(size=(2, 12, 8)).astype("float32")
    routing = router(x)
    # C = ceil(12 * 2.0 / 4) = 6 -> rounded up to a multiple of 4: 8.
    assert routing.capacity == 8
    gates = _np_cosine_gates(x, ops.convert_to_numpy(router.gating_kernel))
    expected_combine = np_expert_choice(gates, 8)  # (G, S, E, C)
    expected_dispatch = (expected_combine > 0).astype("float32")  # gates > 0
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.dispatch_tensor()), expected_dispatch, atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing.combine_tensor()), expected_combine, atol=1e-6
    )


def _tiny_backbone_config(router, router_config=None):
    return dict(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        router=router,
        router_config=router_config or {},
        num_experts=4,
        group_size=2,
        moe_layers=[1],
    )


def test_new_router_in_the_backbone_and_the_cost_model(new_router):
    from keras_vmoe.models import (
        VisionMoEBackbone,
        backbone_flops,
        count_backbone_params,
    )

    config = _tiny_backbone_config(NEW)
    backbone = VisionMoEBackbone(**config)
    images = np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 3))
    outputs = backbone(images.astype("float32"))
    features = ops.convert_to_numpy(outputs["sequence_output"])
    assert features.shape == (4, 17, 16) and np.isfinite(features).all()
    moe = backbone.get_layer("encoder_block_1").mlp
    assert isinstance(moe.router, CosineExpertChoiceRouter)
    assert count_backbone_params(config) == backbone.count_params()
    # FLOPs by hand: block 1's dense MLP (2 * t * d * h = 2 * 17 * 16 * 32
    # MACs per image) is replaced by the experts and the router, per group
    # of S = 2 * 17 = 34 tokens: E * C = 4 * 20 slots (C = ceil(34 * 2 / 4)
    # = 17 -> 20, a multiple of 4), each 2 * d * h = 2 * 16 * 32 MACs, plus
    # the gating S * d * E = 34 * 16 * 4 MACs; per image, divided by the 2
    # images of a group; 2 FLOPs per MAC.
    dense = backbone_flops(dict(config, router=None, moe_layers=None))
    expected = dense - 2 * (2 * 17 * 16 * 32)
    expected += round(2 * (4 * 20 * 2 * 16 * 32 + 34 * 16 * 4) / 2)
    assert backbone_flops(config) == expected


def test_new_router_in_presets_and_a_preset_override(new_router, tmp_path):
    from keras_vmoe.models import from_preset
    from keras_vmoe.models.vision_moe import presets

    definitions = presets.preset_definitions()
    assert "vmoe_cosine_ec_b16_e32_224" in definitions
    _, backbone_kwargs, _ = definitions["vmoe_cosine_ec_b16_e32_224"]
    assert backbone_kwargs["router"] == NEW
    assert backbone_kwargs["router_config"] == {"capacity_factor": 2.0}
    assert backbone_kwargs["group_size"] == 8

    # A saved tiny preset, loaded with the new router as an override.
    from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

    backbone = VisionMoEBackbone(**_tiny_backbone_config("softmax_expert_choice"))
    VisionMoEImageClassifier(backbone, num_classes=3).save_to_preset(tmp_path / "p")
    model = from_preset(str(tmp_path / "p"), router=NEW)
    moe = model.backbone.get_layer("encoder_block_1").mlp
    assert isinstance(moe.router, CosineExpertChoiceRouter)
    logits = ops.convert_to_numpy(model(np.zeros((2, 16, 16, 3), "float32")))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_new_router_in_the_layout_map(new_router):
    from keras_vmoe.distribution import get_layout_map

    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "expert"), ["cpu:0"])
    layout_map = get_layout_map(mesh, data_axis="batch", expert_axis="expert")
    # The router's weights are matched (replicated), not left to Keras'
    # silent default.
    assert tuple(layout_map["encoder_block_1/moe/router/gating_kernel"].axes) == ()


def test_new_router_in_the_study(new_router, tmp_path):
    from keras_vmoe.cli.study import parse_models
    from keras_vmoe.study import QUICK
    from keras_vmoe.study import config as study_config

    assert NEW in study_config.model_names()
    assert NEW in parse_models("all")
    plan = study_config.equal_compute(QUICK)
    # QUICK: S = 2 * 16 = 32, E = 4, K = 2: C = ceil(32 * 2 / 4) = 16.
    assert plan["router_configs"][NEW] == {"capacity": 16, "capacity_multiple_of": 1}
    backbone_kwargs = study_config.backbone_config(QUICK, NEW)
    assert backbone_kwargs["router"] == NEW

    from keras_vmoe.study.data import load_study_data
    from keras_vmoe.study.runner import train_and_evaluate

    config = QUICK.replace(
        train_size=64,
        test_size=32,
        batch_size=16,
        eval_batch_size=16,
        fewshot_train_size=100,
        fewshot_test_size=40,
        shots=(1,),
    )
    result = train_and_evaluate(config, NEW, seed=0, data=load_study_data(config))
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["slots_per_group"] == 4 * 16
