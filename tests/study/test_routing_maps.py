"""`routing_maps.last_routing`: the routing observed through `MoE.capture_routing`."""

import keras
import numpy as np
from keras import ops

from keras_vmoe import routers
from keras_vmoe.callbacks.routing import moe_layers
from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.study import routing_maps

X = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")


def _moe(name, router):
    return MoE(router, MlpExperts(4, 16, seed=0), group_size=12, name=name)


def test_last_routing_is_the_last_layers_routing_of_its_groups():
    inputs = keras.Input((6, 8))
    first = _moe("moe_a", routers.SoftmaxTokenChoiceRouter(4, seed=0))(inputs)
    second = _moe("moe_b", routers.SoftmaxExpertChoiceRouter(4))(first)
    pooled = keras.layers.GlobalAveragePooling1D()(second)
    model = keras.Model(inputs, keras.layers.Dense(3)(pooled))
    routing = routing_maps.last_routing(model, X)
    # The last layer's groups: the first layer's outputs, 12 tokens a group.
    groups = ops.reshape(keras.Model(inputs, first)(X), (2, 12, 8))
    expected = moe_layers(model)[-1].router(groups, training=False)
    for tensor in ("dispatch_tensor", "combine_tensor"):
        np.testing.assert_allclose(
            ops.convert_to_numpy(getattr(routing, tensor)()),
            ops.convert_to_numpy(getattr(expected, tensor)()),
            atol=1e-6,
        )
    np.testing.assert_array_equal(
        routing_maps.expert_per_token(routing), routing_maps.expert_per_token(expected)
    )
    assert all("route" not in vars(layer) for layer in moe_layers(model))


def test_last_routing_of_a_model_without_moe_layers_is_none():
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert routing_maps.last_routing(model, X) is None


def test_patch_expert_maps_of_a_backbone():
    from keras_vmoe.models import VisionMoEBackbone

    backbone = VisionMoEBackbone(
        image_shape=(8, 8, 1),
        patch_size=4,
        num_layers=2,
        num_heads=1,
        hidden_dim=8,
        mlp_dim=16,
        moe_layers="all",
        router="softmax_token_choice",
        num_experts=2,
        group_size=1,
    )
    images = np.random.default_rng(1).random((2, 8, 8, 1)).astype("float32")
    routing = routing_maps.last_routing(backbone, images)
    # 2 images of 1 class token + 2 x 2 patches, one routing group each.
    assert tuple(routing.combine_tensor().shape)[:3] == (2, 5, 2)
    maps = routing_maps.patch_expert_maps(routing, tokens_per_image=5, grid=2)
    experts = routing_maps.expert_per_token(routing)  # (G, S) = (2, 5)
    np.testing.assert_array_equal(maps, experts[:, 1:].reshape(2, 2, 2))
    assert set(np.unique(maps)) <= {-1, 0, 1}
