"""VisionMoEImageClassifier: head, default compile, fit, auxiliary losses."""

import math

import keras
import numpy as np
import pytest

from keras_vmoe.models import (
    ClassificationCrossEntropy,
    Top1Accuracy,
    VisionMoEBackbone,
    VisionMoEImageClassifier,
)
from tests.models.tiny import TINY, tiny_moe

LABELS = np.array([0, 1, 2, 1])


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_head_layers_and_initialisation(images):
    model = VisionMoEImageClassifier(
        VisionMoEBackbone(**TINY),
        num_classes=3,
        representation_size=8,
        loss_type="sigmoid",
    )
    pre_logits = model.get_layer("pre_logits")
    assert isinstance(pre_logits, keras.layers.Dense) and pre_logits.units == 8
    head = model.get_layer("head")
    np.testing.assert_array_equal(head.kernel.numpy(), 0.0)
    np.testing.assert_allclose(head.bias.numpy(), -math.log(3), rtol=1e-6)
    # Zero kernel: every image starts at the bias, p = 1/3 per class.
    np.testing.assert_allclose(_np(model(images)), -math.log(3), rtol=1e-6)
    # The pre-logits output is readable for few-shot evaluation (d -> 8, tanh).
    features = keras.Model(model.input, pre_logits.output)(images)
    assert features.shape == (4, 8) and np.abs(_np(features)).max() <= 1.0


def test_identity_pre_logits_and_softmax_head(images):
    backbone = VisionMoEBackbone(**TINY)
    model = VisionMoEImageClassifier(backbone, num_classes=5, activation="softmax")
    assert isinstance(model.get_layer("pre_logits"), keras.layers.Identity)
    np.testing.assert_array_equal(model.get_layer("head").bias.numpy(), 0.0)
    probs = _np(model(images))
    np.testing.assert_allclose(probs, 0.2, rtol=1e-6)  # uniform at init
    features = keras.Model(model.input, model.get_layer("pre_logits").output)(images)
    np.testing.assert_allclose(
        _np(features), _np(backbone(images)["pooled_output"]), atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="relu"), "activation"),
        (dict(loss_type="hinge"), "loss_type"),
        (dict(activation="softmax", loss_type="sigmoid"), "does not match"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_head_arguments(kwargs, message):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        VisionMoEImageClassifier(VisionMoEBackbone(**TINY), **kwargs)


def test_losses_by_hand():
    logits = np.array([[0.0, 0.0], [2.0, -1.0]], "float32")
    sig = ClassificationCrossEntropy("sigmoid", reduction=None)

    # Sum over classes of binary cross-entropies.
    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = [bce(0, 0) + bce(0, 1), bce(2, 1) + bce(-1, 0)]
    np.testing.assert_allclose(_np(sig(np.array([1, 0]), logits)), expected, rtol=1e-5)
    one_hot = np.array([[0, 1], [1, 0]], "float32")
    np.testing.assert_allclose(_np(sig(one_hot, logits)), expected, rtol=1e-5)
    soft = ClassificationCrossEntropy("softmax", reduction=None)
    expected = [math.log(2), math.log(1 + math.exp(-3))]
    np.testing.assert_allclose(
        _np(soft(np.array([[1], [0]]), logits)), expected, rtol=1e-5
    )
    np.testing.assert_allclose(_np(soft(one_hot, logits)), expected, rtol=1e-5)
    acc = Top1Accuracy()
    acc.update_state(np.array([1, 0]), logits)  # predicted 0, 0 (tie -> 0)
    assert float(acc.result()) == 0.5
    acc = Top1Accuracy()
    acc.update_state(one_hot, logits)
    assert float(acc.result()) == 0.5


# Token Choice is fitted in test_trained_loss_is_data_loss_plus_auxiliary_loss.
@pytest.mark.parametrize("router, loss_type", [(None, "softmax"), ("soft", "sigmoid")])
def test_fit_and_predict(images, router, loss_type):
    config = TINY if router is None else tiny_moe(router)
    model = VisionMoEImageClassifier(
        VisionMoEBackbone(**config),
        num_classes=3,
        representation_size=16,
        loss_type=loss_type,
    )
    before = model.get_layer("head").kernel.numpy().copy()
    history = model.fit(images, LABELS, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and "accuracy" in history.history
    assert np.abs(model.get_layer("head").kernel.numpy() - before).max() > 0  # trained
    if router is None:
        assert model.predict(images, batch_size=4, verbose=0).shape == (4, 3)
    else:
        assert model(images).shape == (4, 3)


def test_trained_loss_is_data_loss_plus_auxiliary_loss(images):
    """fit() minimises the task loss plus every MoE layer's auxiliary loss."""
    config = tiny_moe(
        "softmax_token_choice",
        moe_layers="all",
        router_config={
            "noise_std": 0.0,
            "importance_loss_weight": 1.0,
            "capacity_factor": 1.0,
        },
    )
    model = VisionMoEImageClassifier(
        VisionMoEBackbone(**config), num_classes=3, loss_type="sigmoid"
    )
    rng = np.random.RandomState(0)
    model.get_layer("head").kernel.assign(rng.normal(size=(16, 3)).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # loss of the initial weights
    predictions = model(images, training=True)
    aux = [float(_np(loss)) for loss in model.losses]
    assert len(aux) == 2 and all(a > 0 for a in aux)  # one per MoE layer
    data = float(_np(ClassificationCrossEntropy("sigmoid")(LABELS, predictions)))
    history = model.fit(images, LABELS, batch_size=4, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], data + sum(aux), rtol=1e-5)
    assert history.history["loss"][0] > data + 1e-3


def test_saved_preset_names_its_task_as_keras_hub_expects(tmp_path):
    # keras-hub lists a preset's compatible tasks by each task class's first
    # base class: ImageClassifier, not a helper of this package.
    import json

    import keras_hub

    model = VisionMoEImageClassifier(VisionMoEBackbone(**TINY), num_classes=3)
    model.save_to_preset(str(tmp_path / "preset"))
    with open(tmp_path / "preset" / "metadata.json") as f:
        assert json.load(f)["tasks"] == ["ImageClassifier"]
    loaded = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "preset"))
    assert type(loaded) is VisionMoEImageClassifier
