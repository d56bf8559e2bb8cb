import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe.models import ClassificationCrossEntropy
from keras_vmoe.training import (
    SOFT_MOE_WEIGHT_DECAY,
    DecoupledWeightDecayAdam,
    PerUpdate,
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


def test_per_update_schedule_hand_values():
    # Warmup over 10 updates to 1e-3, 4 batches per update: batch b is in
    # update b // 4, so batches 0-3 get 0, batches 4-7 get 1e-3 * 1/10 and
    # batch 41 (update 10, the end of the warmup) gets the peak.
    schedule = PerUpdate(WarmupLinearDecay(1e-3, 100, 10), 4)
    for batch, expected in ((0, 0.0), (3, 0.0), (4, 1e-4), (7, 1e-4), (41, 1e-3)):
        assert value(schedule, batch) == pytest.approx(expected, abs=1e-9), batch
    with pytest.raises(ValueError, match="LearningRateSchedule"):
        PerUpdate(1e-3, 4)
    with pytest.raises(ValueError, match="accumulation_steps"):
        PerUpdate(WarmupLinearDecay(1e-3, 100, 10), 0)


def _train_tiny(batch_size, accumulation):
    """Weights of a tiny classifier after 2 epochs of the V-MoE recipe."""
    from keras_vmoe.training import compile_with_recipe

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    compile_with_recipe(
        model,
        "vmoe",
        total_steps=8,  # updates: 16 images / 4 per update, 2 epochs
        warmup_steps=2,
        peak_learning_rate=0.05,
        loss="softmax",
        gradient_accumulation_steps=accumulation,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)
    model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    return model


def test_gradient_accumulation_makes_the_updates_of_the_whole_batch():
    # Batches of 4 images, one update each (8 updates), against the same
    # 16 images in batches of 2 with 2 accumulated per update, and of 1 with
    # 4: the mean gradient of a batch is the mean of its parts' mean
    # gradients, and the schedule, Adam's step count, the clipping and the
    # weight decay all count updates, so the weights agree to float32
    # rounding. An update per batch of 2 (16 updates) ends elsewhere.
    reference = _train_tiny(4, None)
    assert int(reference.optimizer.iterations) == 8
    expected = [np.asarray(w) for w in reference.get_weights()]
    for batch_size, accumulation in ((2, 2), (1, 4)):
        model = _train_tiny(batch_size, accumulation)
        assert int(model.optimizer.iterations) == 8  # updates, not batches
        for got, want in zip(model.get_weights(), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    other = _train_tiny(2, None).get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(other, expected)) > 1e-2
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        _train_tiny(4, 0)


def test_schedules_serialize():
    for s in [
        WarmupLinearDecay(1e-3, 100, 10),
        WarmupRsqrtCooldown(1.0, 400, 100, 100, 100),
        PerUpdate(WarmupLinearDecay(1e-3, 100, 10), 4),
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


def _two_adam_steps(**kwargs):
    """Two Adam steps (lr 0.1, no decay) on two (1,) variables from 0.

    Gradients (3, 4) then (0.3, 0.4): global norms 5 and 0.5.
    """
    a, b = keras.Variable([0.0], name="a"), keras.Variable([0.0], name="b")
    opt = DecoupledWeightDecayAdam(0.1, weight_decay_rules=[], **kwargs)
    for ga, gb in ((3.0, 4.0), (0.3, 0.4)):
        opt.apply([ops.array([ga]), ops.array([gb])], [a, b])
    return float(ops.convert_to_numpy(a)[0]), float(ops.convert_to_numpy(b)[0])


def test_global_norm_clipping_hand_values():
    # Keras' Adam: m = .9 m + .1 g, v = .999 v + .001 g^2,
    # w -= lr * sqrt(1 - .999^t) / (1 - .9^t) * m / (sqrt(v) + eps).
    # Step 1 moves every variable by lr = 0.1 whatever the gradient's size.
    # Clipped to global norm 1: g1 = (0.6, 0.8), g2 = (0.3, 0.4) (norm 0.5,
    # kept). Variable a at step 2: m = .9 * .06 + .1 * .3 = .084,
    # v = .999 * .00036 + .001 * .09 = .00044964, sqrt(v) = .0212047,
    # lr * sqrt(.001999) / .19 = 0.1 * .235317, so the step is
    # .0235317 * .084 / .0212047 = .0932180; a = -(0.1 + .0932180) = -.193218.
    # Both gradients keep their 3:4 ratio, so b moves the same.
    clipped = _two_adam_steps(global_clipnorm=1.0)
    np.testing.assert_allclose(clipped, [-0.193218, -0.193218], rtol=1e-5)
    # Without clipping step 2 is .0235317 * .3 / .0952943 = .0740809.
    unclipped = _two_adam_steps(global_clipnorm=None)
    np.testing.assert_allclose(unclipped, [-0.174081, -0.174081], rtol=1e-5)
    # Per-variable clipping (Keras' clipnorm) would clip a to 1 and b to 1
    # at step 1 and move them apart: -0.185570, -0.189857. Global is not that.
    each = _two_adam_steps(global_clipnorm=None, clipnorm=1.0)
    np.testing.assert_allclose(each, [-0.185570, -0.189857], rtol=5e-5)
    assert DecoupledWeightDecayAdam().global_clipnorm == 1.0  # the recipe's


TINY_MODEL = dict(
    num_classes=4,
    image_size=8,
    patch_size=4,
    num_layers=2,
    hidden_dim=8,
    mlp_dim=16,
    num_heads=2,
    num_experts=4,
)


def _decay_after_one_step(model, recipe):
    """{path: rate} that one optimizer step with zero gradients applied.

    With zero gradients the Adam step is 0, so a variable of ones becomes
    1 - lr * rate: the rate is read back from the weights themselves.
    """
    from keras_vmoe.training import compile_with_recipe

    lr = 0.01
    compile_with_recipe(
        model,
        recipe,
        total_steps=10,
        schedule="constant",
        warmup_steps=0,
        peak_learning_rate=lr,
    )
    variables = model.trainable_variables
    for v in variables:
        v.assign(np.ones(v.shape, "float32"))
    model.optimizer.apply([ops.zeros(v.shape) for v in variables], variables)
    rates = {}
    for v in variables:
        after = ops.convert_to_numpy(v)
        rate = (1.0 - after) / lr
        np.testing.assert_allclose(rate, rate.flat[0], atol=1e-3, err_msg=v.path)
        rates[v.path] = round(float(rate.flat[0]), 4)
    return rates


def test_recipe_decay_touches_exactly_the_kernels_head_and_scale():
    from keras_vmoe.models import from_preset

    # Soft MoE (2 blocks, both MoE): 3.0 on the head kernel; 0.03 on the
    # patch-embedding kernel, per block on 4 attention kernels, 2 expert
    # kernels and the router's scalar `scale`; nothing else (biases, layer
    # norms, position embedding, slot embeddings).
    model = from_preset("soft_moe_s16_e128_224", **TINY_MODEL)
    rates = _decay_after_one_step(model, "soft_moe")
    decayed = {p: r for p, r in rates.items() if r != 0.0}
    attention = ("query", "key", "value", "attention_output")
    expected = {"head/kernel": 3.0, "patch_embedding/conv/kernel": 0.03}
    for block in ("encoder_block_0", "encoder_block_1"):
        expected[f"{block}/moe/router/scale"] = 0.03
        for name in ("intermediate_kernel", "output_kernel"):
            expected[f"{block}/moe/experts/{name}"] = 0.03
        for name in attention:
            expected[f"{block}/attention/{name}/kernel"] = 0.03
    assert decayed == expected
    assert len(rates) - len(decayed) == 27  # left alone, e.g.:
    for path in (
        "head/bias",
        "position_embedding/embeddings",
        "encoder_block_0/moe/router/slot_embeddings",
        "encoder_norm/gamma",
    ):
        assert rates[path] == 0.0

    # V-MoE (MoE in block 1): 0.1 on every kernel, head and router included.
    model = from_preset(
        "vmoe_softmax_tc_s32_e32_224",
        group_size=2,
        representation_size=8,
        **TINY_MODEL,
    )
    rates = _decay_after_one_step(model, "vmoe")
    decayed = {p: r for p, r in rates.items() if r != 0.0}
    assert set(decayed.values()) == {0.1}
    assert sorted(decayed) == sorted(
        [
            "head/kernel",
            "pre_logits/kernel",
            "patch_embedding/conv/kernel",
            "encoder_block_0/mlp/dense_1/kernel",
            "encoder_block_0/mlp/dense_2/kernel",
            "encoder_block_1/moe/router/gating_kernel",
            "encoder_block_1/moe/experts/intermediate_kernel",
            "encoder_block_1/moe/experts/output_kernel",
        ]
        + [f"encoder_block_{i}/attention/{n}/kernel" for i in (0, 1) for n in attention]
    )
    assert rates["class_token/token"] == 0.0 and rates["head/bias"] == 0.0


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
