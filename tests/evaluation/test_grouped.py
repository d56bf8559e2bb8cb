"""`predict_in_groups` and its padding rule, on real numbers.

A NumPy "model" that mixes the rows of each group gives outputs that depend
on every group mate, so any other grouping or padding shows. The rule is
re-implemented here independently (`np.resize` cycles through the last
group's real rows), and a tiny Soft MoE checks the same on a real V-MoE:
every image's output is its group's output run directly, and with the last
group's real images repeated evenly it equals those images routed alone.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vmoe.evaluation import (
    group_padded,
    group_padding_index,
    model_group_size,
    pad_to_groups,
    predict_in_groups,
)
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier


def group_mix(group_size):
    """`fn(batch)`: each row plus 10 x the mean of its group (NumPy)."""

    def fn(x):
        groups = x.reshape(-1, group_size, *x.shape[1:])  # (G, g, ...)
        mixed = groups + 10.0 * groups.mean(axis=1, keepdims=True)
        return mixed.reshape(x.shape)

    return fn


def reference(x, group_size):
    """The rule by hand: consecutive groups, the last one cycled, then mixed."""
    out = []
    for start in range(0, len(x), group_size):
        real = x[start : start + group_size]
        group = np.resize(real, (group_size,) + x.shape[1:])  # cycles `real`
        out.append((group + 10.0 * group.mean(axis=0))[: len(real)])
    return np.concatenate(out)


def test_padding_index_by_hand():
    assert group_padding_index(8, 4).tolist() == list(range(8))
    assert group_padding_index(9, 4).tolist() == [*range(9), 8, 8, 8]
    assert group_padding_index(10, 4).tolist() == [*range(10), 8, 9]
    assert group_padding_index(11, 4).tolist() == [*range(11), 8]
    assert group_padding_index(3, 1).tolist() == [0, 1, 2]
    # Whole padding groups repeat the filled last group.
    assert group_padding_index(5, 2, size=8).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert group_padding_index(6, 4, size=16).tolist() == (
        [0, 1, 2, 3, 4, 5, 4, 5] + [4, 5, 4, 5] * 2
    )
    for n, g, size, match in (
        (0, 2, None, "num_images"),
        (3, 0, None, "group_size"),
        (5, 2, 4, "size"),
        (5, 2, 7, "size"),
    ):
        with pytest.raises(ValueError, match=match):
            group_padding_index(n, g, size)
    x = np.arange(10)
    assert pad_to_groups(x, 4).tolist() == [*range(10), 8, 9]
    assert pad_to_groups(x, 5) is x  # whole groups: no copy


@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 6, 10, 100])
def test_matches_the_rule_by_hand_for_any_batch_size(group_size, batch_size):
    x = np.random.default_rng(0).normal(size=(11, 2)).astype("float32")
    got = predict_in_groups(group_mix(group_size), x, batch_size, group_size=group_size)
    np.testing.assert_allclose(got, reference(x, group_size), rtol=1e-6)
    assert got.shape == x.shape  # no padding row


def test_streams_are_regrouped():
    x = np.random.default_rng(1).normal(size=(13, 3)).astype("float32")
    expected = reference(x, 4)
    # Batches of sizes that are not whole groups (3, 5, 0, 5).
    batches = [x[:3], x[3:8], x[8:8], x[8:]]
    got = predict_in_groups(group_mix(4), iter(batches), 8, group_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(3)  # tf tensors, 3 a batch
    got = predict_in_groups(group_mix(4), ds, 4, group_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_batches_have_whole_groups_and_one_shape():
    shapes = []

    def fn(x):
        shapes.append(len(x))
        return x

    predict_in_groups(fn, np.arange(10.0), batch_size=7, group_size=3)
    assert shapes == [6, 6]  # 7 -> 6; the last 4 images -> 4 + 2 copies -> 6
    shapes.clear()
    predict_in_groups(fn, np.arange(5.0), batch_size=100, group_size=3)
    assert shapes == [6]  # a lone batch: whole groups only
    shapes.clear()
    predict_in_groups(fn, np.arange(2.0), batch_size=2, group_size=3)
    assert shapes == [3]  # batch_size below the group: one group


def test_structured_outputs_and_errors():
    x = np.arange(5.0)
    got = predict_in_groups(
        lambda b: {"a": b * 2, "b": (b[:, None], b + 1)}, x, 4, group_size=2
    )
    np.testing.assert_array_equal(got["a"], x * 2)
    np.testing.assert_array_equal(got["b"][0], x[:, None])
    np.testing.assert_array_equal(got["b"][1], x + 1)
    with pytest.raises(ValueError, match="no image"):
        predict_in_groups(lambda b: b, iter([]), 4, group_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        predict_in_groups(lambda b: b, x, 0, group_size=2)
    with pytest.raises(ValueError, match="callbacks"):
        predict_in_groups(lambda b: b, x, 4, group_size=2, callbacks=[object()])
    with pytest.raises(ValueError, match="model"):
        predict_in_groups(3, x, 4)


def test_group_padded_dataset_follows_the_same_rule():
    for n in range(1, 12):
        for g in (1, 2, 3, 4):
            ds = tf.data.Dataset.from_tensor_slices((np.arange(n), -np.arange(n)))
            images, labels, weight = next(iter(group_padded(ds.batch(n), g)))
            index = group_padding_index(n, g)
            np.testing.assert_array_equal(images.numpy(), index)
            np.testing.assert_array_equal(labels.numpy(), -index)
            np.testing.assert_array_equal(weight.numpy(), np.arange(len(index)) < n)


def _soft_moe(group_size):
    keras.utils.set_random_seed(0)
    backbone = VisionMoEBackbone(
        image_shape=(8, 8, 1),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        router="soft",
        router_config={"num_slots": 2},
        num_experts=2,
        group_size=group_size,
    )
    model = VisionMoEImageClassifier(backbone, num_classes=3, representation_size=8)
    kernel = model.get_layer("head").kernel  # a random head: logits vary
    kernel.assign(np.random.default_rng(1).normal(size=kernel.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def soft_moes():
    """The same Soft MoE weights, routing groups of 4, 2 and 1 images."""
    keras.utils.clear_session(free_memory=False)
    four = _soft_moe(4)
    two, one = _soft_moe(2), _soft_moe(1)
    two.set_weights(four.get_weights())
    one.set_weights(four.get_weights())
    return four, two, one


def test_a_soft_moe_gets_its_groups_outputs(soft_moes):
    model, by_two, alone = soft_moes
    assert model_group_size(model) == 4
    x = np.random.default_rng(0).normal(size=(10, 8, 8, 1)).astype("float32")
    run = model.predict_on_batch
    for batch_size in (4, 6, 8, 256):
        got = predict_in_groups(model, x, batch_size)
        assert got.shape == (10, 3)
        # Images 0..7 are two whole groups: their outputs are those groups'.
        np.testing.assert_allclose(got[:4], run(x[:4]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[4:8], run(x[4:8]), rtol=1e-5, atol=1e-5)
        # Images 8, 9 fill their group as 8, 9, 8, 9.
        last = run(np.concatenate([x[8:], x[8:]]))[:2]
        np.testing.assert_allclose(got[8:], last, rtol=1e-5, atol=1e-5)
    # Group mates matter: other groupings give other outputs ...
    assert not np.allclose(got[:4], by_two.predict_on_batch(x[:4]), atol=1e-3)
    assert not np.allclose(got[8:], alone.predict_on_batch(x[8:]), atol=1e-3)
    # ... but evenly repeated copies do not: 8, 9, 8, 9 in groups of 4 is
    # 8, 9 routed alone as a group of 2.
    np.testing.assert_allclose(
        got[8:], by_two.predict_on_batch(x[8:]), rtol=1e-5, atol=1e-5
    )


def test_callbacks_see_every_batch(soft_moes):
    model = soft_moes[0]

    class Count(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows, self.events = [], []

        def on_predict_begin(self, logs=None):
            self.events.append("begin")

        def on_predict_batch_end(self, batch, logs=None):
            self.rows.append(len(logs["outputs"]))
            assert self.model is model

        def on_predict_end(self, logs=None):
            self.events.append("end")

    count = Count()
    x = np.zeros((10, 8, 8, 1), "float32")
    predict_in_groups(model, x, 8, callbacks=[count])
    assert count.rows == [8, 8] and count.events == ["begin", "end"]
