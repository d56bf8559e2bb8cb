import keras
import numpy as np
import pytest

from keras_vmoe.callbacks.routing import (
    RoutingStatistics,
    moe_layers,
    tracking_statistics,
)
from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.routers import SoftmaxExpertChoiceRouter


def make_model(track_statistics="training"):
    # E=4, groups of 12 tokens. Training capacity ceil(12 * 1.0 / 4) = 3,
    # rounded up to 4 slots; evaluation capacity ceil(12 * 2.0 / 4) = 6 -> 8.
    router = SoftmaxExpertChoiceRouter(4, capacity_factor=1.0, eval_capacity_factor=2.0)
    inputs = keras.Input((6, 8))
    h = MoE(
        router,
        MlpExperts(4, 16),
        group_size=12,
        track_statistics=track_statistics,
        name="moe_a",
    )(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("track_statistics", ["training", "always"])
def test_logs_training_statistics_even_with_validation(track_statistics):
    model = make_model(track_statistics)
    assert [layer.name for layer in moe_layers(model)] == ["moe_a"]
    x = np.random.default_rng(0).normal(size=(24, 6, 8)).astype("float32")
    y = np.arange(24) % 2
    history = model.fit(
        x,
        y,
        batch_size=12,
        epochs=2,
        validation_data=(x, y),
        callbacks=[RoutingStatistics()],
        verbose=0,
    )
    logs = history.history
    # Expert Choice in training: E * C / S = 4 * 4 / 12 experts per token.
    # (Validation runs at 4 * 8 / 12 = 2.67 and must not leak in.)
    assert logs["routing/moe_a/experts_per_token"] == pytest.approx([4 * 4 / 12] * 2)
    assert logs["routing/moe_a/load_imbalance"] == pytest.approx([1.0, 1.0])
    assert logs["routing/moe_a/auxiliary_loss"] == [0.0, 0.0]
    assert "routing/moe_a/fraction_tokens_dropped" in logs


def test_unknown_statistic():
    with pytest.raises(ValueError, match="statistics"):
        RoutingStatistics(statistics=["nope"])


def test_layers_with_the_same_name_stay_apart():
    from keras_vmoe.models import VisionMoEBackbone

    backbone = VisionMoEBackbone(
        image_shape=(8, 8, 1),
        patch_size=4,
        num_layers=2,
        num_heads=1,
        hidden_dim=8,
        mlp_dim=16,
        moe_layers="all",
        router="softmax_expert_choice",
        num_experts=2,
        group_size=1,
    )
    backbone(np.zeros((2, 8, 8, 1), "float32"))
    callback = RoutingStatistics(statistics=["experts_per_token"])
    callback.set_model(backbone)
    keys = sorted(callback._read())
    assert len(keys) == 2  # one per MoE block, although both are named "moe"
    assert keys[0] != keys[1]


def tensorboard_scalars(log_dir):
    """{tag: [values by step]} of the scalar summaries under `log_dir`."""
    import glob

    import tensorflow as tf

    scalars = {}
    for path in sorted(
        glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)
    ):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                number = float(tf.make_ndarray(value.tensor))
                scalars.setdefault(value.tag, {})[event.step] = number
    return {tag: [v[s] for s in sorted(v)] for tag, v in scalars.items()}


def test_statistics_reach_tensorboard(tmp_path):
    model = make_model()
    x = np.random.default_rng(0).normal(size=(24, 6, 8)).astype("float32")
    y = np.arange(24) % 2
    log_dir = tmp_path / "tb"
    history = model.fit(
        x,
        y,
        batch_size=12,
        epochs=2,
        validation_data=(x, y),
        callbacks=[RoutingStatistics(log_dir=log_dir)],
        verbose=0,
    ).history
    scalars = tensorboard_scalars(str(log_dir))
    names = ("auxiliary_loss", "experts_per_token", "fraction_tokens_dropped")
    assert sorted(scalars) == sorted(
        f"routing/moe_a/{name}" for name in names + ("load_imbalance",)
    )
    for key, values in scalars.items():
        assert values == pytest.approx(history[key]), key
    # E * C / S = 4 * 4 / 12 experts per token in training at both epochs
    # (steps 0 and 1), not the validation's 4 * 8 / 12.
    assert scalars["routing/moe_a/experts_per_token"] == pytest.approx([4 / 3] * 2)
    with pytest.raises(ValueError, match="log_dir"):
        RoutingStatistics(log_dir=3)


def test_layers_that_never_track_are_left_out_with_a_warning():
    model = make_model("never")
    x = np.random.default_rng(0).normal(size=(24, 6, 8)).astype("float32")
    with pytest.warns(UserWarning, match="never"):
        history = model.fit(
            x,
            np.arange(24) % 2,
            batch_size=12,
            callbacks=[RoutingStatistics()],
            verbose=0,
        )
    assert not any(key.startswith("routing/") for key in history.history)


def test_tracking_statistics_makes_predict_update_them():
    model = make_model()
    moe = moe_layers(model)[0]
    x = np.random.default_rng(0).normal(size=(24, 6, 8)).astype("float32")
    model.predict(x, batch_size=12, verbose=0)  # compiled without statistics
    assert moe.routing_statistics()["experts_per_token"] == 0.0
    seen = []

    class Reader(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            # On JAX, reading `self.model` syncs the variables first.
            layer = moe_layers(self.model)[0]
            seen.append(layer.routing_statistics()["experts_per_token"])

    with tracking_statistics(model):
        assert moe.track_statistics == "always"
        model.predict(x, batch_size=12, verbose=0, callbacks=[Reader()])
    # Evaluation capacity: E * C / S = 4 * 8 / 12 experts per token, per batch.
    assert seen == pytest.approx([4 * 8 / 12] * 2)
    assert moe.track_statistics == "training"
    # Back to the layer's own setting, also in the compiled predict step.
    moe.experts_per_token.assign(0.0)
    model.predict(x, batch_size=12, verbose=0)
    assert moe.routing_statistics()["experts_per_token"] == 0.0
    with pytest.raises(ValueError, match="mode"):
        with tracking_statistics(model, mode="sometimes"):
            pass
    assert moe.track_statistics == "training"
