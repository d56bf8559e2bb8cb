"""Output shapes (symbolic and concrete) and the channels_first data format."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.models import (
    VisionMoEBackbone,
    VisionMoEImageClassifier,
    VisionMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vision_moe.encoder_block import EncoderBlock
from keras_vmoe.models.vision_moe.vit_layers import (
    ClassToken,
    MlpBlock,
    PatchEmbedding,
    PositionEmbedding,
    SequencePooling,
)
from keras_vmoe.routers import SoftmaxTokenChoiceRouter
from tests.models.tiny import TINY, tiny_moe


def _np(x):
    return keras.ops.convert_to_numpy(x)


LAYERS = {
    "patch_embedding": (lambda: PatchEmbedding(8, 4), (2, 16, 12, 3)),
    "patch_embedding_channels_first": (
        lambda: PatchEmbedding(8, 4, data_format="channels_first"),
        (2, 3, 16, 12),
    ),
    "class_token": (ClassToken, (2, 5, 8)),
    "position_embedding": (PositionEmbedding, (2, 5, 8)),
    "pooling": (lambda: SequencePooling("gap"), (2, 5, 8)),
    "mlp_block": (lambda: MlpBlock(16), (2, 5, 8)),
    "encoder_block": (lambda: EncoderBlock(num_heads=2, mlp_dim=16), (2, 5, 8)),
    "moe_block": (
        lambda: EncoderBlock(
            num_heads=2,
            mlp_dim=16,
            moe_config=dict(
                router="softmax_token_choice",
                num_experts=4,
                expert_hidden_dim=16,
                group_size=5,
            ),
        ),
        (2, 5, 8),
    ),
    "moe": (
        lambda: MoE(
            SoftmaxTokenChoiceRouter(num_experts=4),
            MlpExperts(num_experts=4, hidden_dim=16),
            group_size=5,
        ),
        (2, 5, 8),
    ),
    "experts": (lambda: MlpExperts(num_experts=4, hidden_dim=16), (4, 2, 3, 8)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_output_shapes_symbolic_and_concrete(name):
    make, shape = LAYERS[name]
    x = np.random.RandomState(0).rand(*shape).astype("float32")
    layer = make()
    actual = tuple(layer(x).shape)
    assert tuple(layer.compute_output_shape(shape)) == actual
    spec = layer.compute_output_spec(keras.KerasTensor(shape))
    assert tuple(spec.shape) == actual
    # A fresh layer called on a symbolic tensor with an unknown batch (for
    # the experts, an unknown number of groups: the first axis is `E`).
    unknown = 1 if name == "experts" else 0
    symbolic_shape = list(shape)
    symbolic_shape[unknown] = None
    symbolic = make()(keras.KerasTensor(tuple(symbolic_shape)))
    expected = list(actual)
    expected[unknown] = None
    assert list(symbolic.shape) == expected


def test_model_output_specs_on_arrays_and_symbolic_inputs():
    images = np.random.RandomState(0).rand(4, 16, 16, 3).astype("float32")
    backbone = VisionMoEBackbone(**tiny_moe("softmax_token_choice"))
    # NumPy inputs of another batch size than the Input's None (on JAX,
    # Keras used to hand PatchEmbedding.compute_output_shape `None`).
    spec = backbone.compute_output_spec(images)
    out = backbone(images)
    for key in ("sequence_output", "pooled_output"):
        assert tuple(spec[key].shape) == tuple(out[key].shape)
    assert tuple(spec["sequence_output"].shape) == (4, 17, 16)
    shapes = backbone.compute_output_shape((None, 16, 16, 3))
    assert tuple(shapes["sequence_output"]) == (None, 17, 16)
    model = VisionMoEImageClassifier(backbone, num_classes=3)
    assert tuple(model.compute_output_spec(images).shape) == (4, 3)
    assert tuple(model(keras.KerasTensor((None, 16, 16, 3))).shape) == (None, 3)


def test_image_shape_follows_the_data_format():
    backbone = VisionMoEBackbone(
        **{**tiny_moe("soft"), "image_shape": (3, 16, 12)}, data_format="channels_first"
    )
    assert backbone.image_shape == (3, 16, 12)
    assert tuple(backbone.input.shape) == (None, 3, 16, 12)
    # The layout is channels-last whatever the format: 4 x 3 patches + 1.
    assert backbone.layout.image_shape == (16, 12, 3)
    assert backbone.sequence_length == 13
    assert backbone.get_config()["data_format"] == "channels_first"
    # Its preprocessor resizes channels-first raw images to (16, 12) and
    # scales them: pixel 255 -> 255 / 127.5 - 1 = 1.
    converter = VisionMoEImageClassifierPreprocessor.for_backbone(
        backbone
    ).image_converter
    assert converter.image_size == (16, 12)
    raw = np.full((2, 3, 20, 24), 255, dtype="uint8")
    out = keras.ops.convert_to_numpy(converter(raw))
    assert out.shape == (2, 3, 16, 12)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    # (16, 16, 3) channels-first: 16 channels of 16 x 3 images.
    with pytest.raises(ValueError, match=r"Image size \(16, 3\)"):
        VisionMoEBackbone(**tiny_moe("soft"), data_format="channels_first")
    with pytest.raises(ValueError, match="channels, height, width"):
        VisionMoEBackbone(
            **{**tiny_moe("soft"), "image_shape": (3, 16)},
            data_format="channels_first",
        )
    with pytest.raises(ValueError, match="data_format"):
        VisionMoEBackbone(**tiny_moe("soft"), data_format="nchw")


@pytest.mark.parametrize("router", [None, "softmax_token_choice"])
def test_channels_first_gives_the_same_outputs_on_transposed_images(router):
    images = np.random.RandomState(0).rand(4, 16, 12, 3).astype("float32")
    config = {**(tiny_moe(router) if router else TINY), "image_shape": (16, 12, 3)}
    last = VisionMoEBackbone(**config, data_format="channels_last")
    first = VisionMoEBackbone(
        **{**config, "image_shape": (3, 16, 12)}, data_format="channels_first"
    )
    rng = np.random.RandomState(1)
    for v in last.weights:  # non-trivial weights everywhere
        v.assign(v + rng.normal(0, 0.05, v.shape).astype("float32"))
    first.set_weights(last.get_weights())
    expected = last(images)
    got = first(np.transpose(images, (0, 3, 1, 2)))
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(_np(got[key]), _np(expected[key]), atol=1e-5)
    assert np.abs(_np(expected["pooled_output"])).max() > 0.1
    # The global default applies when data_format is not given.
    keras.config.set_image_data_format("channels_first")
    try:
        default = VisionMoEBackbone(**{**config, "image_shape": (3, 16, 12)})
    finally:
        keras.config.set_image_data_format("channels_last")
    assert default.data_format == "channels_first"
