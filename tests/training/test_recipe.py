import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe.models import ClassificationCrossEntropy
from keras_vmoe.training import (
    SOFT_MOE_WEIGHT_DECAY,
    DecoupledWeightDecayAdam,
    SigmoidCrossEntropy,
    SoftmaxCrossEntropy,
    WarmupLinearDecay,
    WarmupRsqrtCooldown,
    warmup_cosine,
)


def value(schedule, step):
    return float(ops.convert_to_numpy(schedule(step)))


def test_warmup_linear_decay_hand_values():
    s = WarmupLinearDecay(
        1e-3, total_steps=100, warmup_steps=10, end_learning_rate=1e-5
    )
    assert value(s, 0) == 0.0
    assert value(s, 5) == pytest.approx(5e-4)  # 1e-3 * 5 / 10
    assert value(s, 10) == pytest.approx(1e-3)  # peak
    # progress (55 - 10) / 90 = 0.5: 1e-5 + (1e-3 - 1e-5) * 0.5 = 5.05e-4.
    assert value(s, 55) == pytest.approx(5.05e-4)
    assert value(s, 100) == pytest.approx(1e-5)
    assert value(s, 250) == pytest.approx(1e-5)  # stays at the end value


def test_warmup_rsqrt_cooldown_hand_values():
    s = WarmupRsqrtCooldown(
        1.0, 400, warmup_steps=100, timescale=100, cooldown_steps=100
    )
    assert value(s, 50) == pytest.approx(0.5)  # warmup
    assert value(s, 100) == pytest.approx(1.0)
    assert value(s, 200) == pytest.approx(np.sqrt(100 / 200))  # 0.7071
    assert value(s, 300) == pytest.approx(np.sqrt(100 / 300))  # cooldown factor 1
    # sqrt(100 / 350) * (400 - 350) / 100 = 0.5345 * 0.5 = 0.2673.
    assert value(s, 350) == pytest.approx(np.sqrt(100 / 350) * 0.5, rel=1e-5)
    assert value(s, 400) == 0.0


def test_warmup_cosine_hand_values():
    s = warmup_cosine(1e-3, total_steps=110, warmup_steps=10)
    assert value(s, 5) == pytest.approx(5e-4)
    assert value(s, 10) == pytest.approx(1e-3)
    assert value(s, 60) == pytest.approx(5e-4, rel=1e-4)  # cos(pi/2): half
    assert value(s, 110) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: WarmupLinearDecay(1e-3, total_steps=10, warmup_steps=10),
            "warmup_steps",
        ),
        (lambda: WarmupLinearDecay(1e-3, total_steps=0), "total_steps"),
        (lambda: WarmupRsqrtCooldown(1.0, 100, 60, 10, 60), "cooldown_steps"),
        (lambda: WarmupRsqrtCooldown(1.0, 100, 10, 0, 10), "timescale"),
        (
            lambda: DecoupledWeightDecayAdam(weight_decay_rules=[("kernel", -1)]),
            "weight_decay_rules",
        ),
        (lambda: DecoupledWeightDecayAdam(weight_decay_rules=[("(", 0.1)]), "regex"),
        (lambda: SigmoidCrossEntropy(label_smoothing=1.0), "label_smoothing"),
    ],
)
def test_bad_recipe_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedules_serialize():
    for s in [
        WarmupLinearDecay(1e-3, 100, 10),
        WarmupRsqrtCooldown(1.0, 400, 100, 100, 100),
    ]:
        clone = keras.optimizers.schedules.deserialize(
            keras.optimizers.schedules.serialize(s)
        )
        assert value(clone, 77) == pytest.approx(value(s, 77))


def test_weight_decay_touches_exactly_the_intended_variables():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, name="body")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    lr = 0.01
    opt = DecoupledWeightDecayAdam(lr, weight_decay_rules=SOFT_MOE_WEIGHT_DECAY)
    variables = model.trainable_variables
    for v in variables:
        v.assign(np.ones(v.shape, "float32"))
    before = {v.path: ops.convert_to_numpy(v).copy() for v in variables}
    # Zero gradients: the Adam step is exactly 0, only the decay acts.
    opt.apply([ops.zeros(v.shape) for v in variables], variables)
    expected_rate = {"head/kernel": 3.0, "body/kernel": 0.03}
    for v in variables:
        rate = expected_rate.get(v.path, 0.0)
        np.testing.assert_allclose(
            ops.convert_to_numpy(v),
            before[v.path] * (1 - lr * rate),
            rtol=1e-6,
            err_msg=v.path,
        )
    assert opt.weight_decay_rate_for("moe/router/scale") == 0.03
    config = opt.get_config()
    clone = DecoupledWeightDecayAdam.from_config(config)
    assert clone.weight_decay_rate_for("head/kernel") == 3.0


def test_global_norm_clipping():
    opt = DecoupledWeightDecayAdam(1.0, weight_decay_rules=[], global_clipnorm=1.0)
    assert opt.global_clipnorm == 1.0


def test_sigmoid_cross_entropy_hand_values():
    loss = SigmoidCrossEntropy()
    # Zero logits, 2 classes: log 2 per class, summed: 1.3863.
    assert float(loss(np.array([1]), np.zeros((1, 2), "float32"))) == pytest.approx(
        2 * np.log(2), rel=1e-5
    )
    # One-hot (1, 0) smoothed by 0.2 over 2 classes -> targets (0.9, 0.1).
    # bce(t, z) = max(z, 0) - z t + log(1 + exp(-|z|)):
    # z=2, t=.9: 0.2 + 0.126928 = 0.326928; z=-1, t=.1: 0.1 + 0.313262.
    smoothed = SigmoidCrossEntropy(label_smoothing=0.2)
    got = float(smoothed(np.array([[1.0, 0.0]]), np.array([[2.0, -1.0]], "float32")))
    assert got == pytest.approx(0.326928 + 0.413262, rel=1e-5)


@pytest.mark.parametrize(
    "cls, loss_type",
    [(SigmoidCrossEntropy, "sigmoid"), (SoftmaxCrossEntropy, "softmax")],
)
def test_recipe_losses_are_the_classifier_loss_with_a_fixed_type(cls, loss_type):
    """One implementation: same values, own registered name and config."""
    loss = cls(label_smoothing=0.2, reduction=None)
    assert isinstance(loss, ClassificationCrossEntropy)
    assert (loss.loss_type, loss.name) == (loss_type, f"{loss_type}_cross_entropy")
    same = ClassificationCrossEntropy(loss_type, label_smoothing=0.2, reduction=None)
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]], "float32")
    for labels in (np.array([0, 2]), np.eye(3, dtype="float32")[[0, 2]]):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(loss(labels, logits)),
            ops.convert_to_numpy(same(labels, logits)),
        )
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"] == f"keras_vmoe>{cls.__name__}"
    assert "loss_type" not in config["config"]
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is cls and clone.get_config() == loss.get_config()
