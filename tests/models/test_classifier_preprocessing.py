"""`VisionMoEImageClassifier` with its preprocessor: keras-hub's harness,
raw images of any size, and presets that keep the preprocessor."""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_vmoe import models
from keras_vmoe.models import (
    UnsafePresetError,
    VisionMoEBackbone,
    VisionMoEImageClassifier,
    VisionMoEImageClassifierPreprocessor,
    VisionMoEImageConverter,
)
from tests.models.keras_hub_harness import TestCase
from tests.models.tiny import tiny_moe

# A tiny V-MoE (router in block 1, groups of 1 image) on 16x16 images.
BACKBONE_ARGS = dict(tiny_moe("softmax_token_choice"), group_size=1)


def _classifier(preprocessor=True, **kwargs):
    backbone = VisionMoEBackbone(**BACKBONE_ARGS)
    if preprocessor:
        kwargs["preprocessor"] = VisionMoEImageClassifierPreprocessor.for_backbone(
            backbone
        )
    model = VisionMoEImageClassifier(backbone, num_classes=3, **kwargs)
    # A random head, so the logits depend on the images (it starts at zero).
    rng = np.random.RandomState(0)
    model.get_layer("head").kernel.assign(rng.normal(size=(16, 3)).astype("float32"))
    return model


def _raw_images(n=4, size=(50, 60), seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(n, *size, 3)).astype("uint8")


def _by_hand(images, size=(16, 16)):
    """The manual preprocessing: antialiased bilinear resize, x / 127.5 - 1."""
    resized = tf.image.resize(images.astype("float32"), size, antialias=True)
    return resized.numpy() / 127.5 - 1.0


def _predict_without_preprocessor(model, x):
    preprocessor, model.preprocessor = model.preprocessor, None
    try:
        return model.predict(x, verbose=0)
    finally:
        model.preprocessor = preprocessor


class VisionMoEImageClassifierHarnessTest(TestCase):
    """keras-hub's task checks, as keras-hub runs them on ViTImageClassifier."""

    def setUp(self):
        super().setUp()
        self.images = _raw_images(2, (20, 24))
        self.labels = np.array([0, 2])
        backbone = VisionMoEBackbone(**BACKBONE_ARGS)
        self.init_kwargs = {
            "backbone": backbone,
            "num_classes": 3,
            "preprocessor": VisionMoEImageClassifierPreprocessor.for_backbone(backbone),
        }

    def test_classifier_basics(self):
        # predict and fit on arrays, a tf.data.Dataset, and a Dataset mapped
        # through the preprocessor with the task's own preprocessor off.
        self.run_task_test(
            cls=VisionMoEImageClassifier,
            init_kwargs=self.init_kwargs,
            train_data=(self.images, self.labels),
            expected_output_shape=(2, 3),
        )

    def test_saved_model(self):
        self.run_model_saving_test(
            cls=VisionMoEImageClassifier,
            init_kwargs=self.init_kwargs,
            input_data=_by_hand(self.images).astype("float32"),
        )

    def test_preset(self):
        # A saved preset, through our loader and keras-hub's (built-in
        # presets: test_builtin_presets_carry_the_preprocessor_sized_to_the_model).
        folder = os.path.join(self.get_temp_dir(), "preset")
        VisionMoEImageClassifier(**self.init_kwargs).save_to_preset(folder)
        inputs = _by_hand(self.images).astype("float32")
        for cls in (VisionMoEImageClassifier, keras_hub.models.ImageClassifier):
            self.run_preset_test(
                cls=cls,
                preset=folder,
                input_data=inputs,
                expected_output_shape=(2, 3),
            )
        for cls in (
            VisionMoEImageClassifierPreprocessor,
            keras_hub.models.ImageClassifierPreprocessor,
        ):
            self.run_preset_test(
                cls=cls,
                preset=folder,
                input_data=self.images,
                expected_output=_by_hand(self.images),
            )
        self.run_preset_test(
            cls=keras_hub.layers.ImageConverter,
            preset=folder,
            input_data=self.images,
            expected_output=_by_hand(self.images),
        )

    def test_serialization(self):
        self.run_serialization_test(VisionMoEImageClassifier(**self.init_kwargs))


def test_predict_raw_images_of_another_size_gives_the_manual_logits():
    model = _classifier()
    images = _raw_images()  # uint8, 50x60, the model takes 16x16
    logits = model.predict(images, verbose=0)
    expected = _predict_without_preprocessor(model, _by_hand(images))
    assert logits.shape == (4, 3)
    assert np.abs(expected).max() > 0.5  # the head is not zero
    # Logits up to about 10: TensorFlow's compiled predict differs from the
    # hand-preprocessed run by float32 rounding (3e-5 measured), so rtol 1e-5
    # and atol 1e-4.
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-5)
    # Eager calls (each backend's own resize kernel) agree too.
    x = model.preprocessor(images)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(x), _by_hand(images), atol=1e-5, rtol=0
    )


def test_fit_on_a_dataset_of_raw_images():
    model = _classifier()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    images, labels = _raw_images(8, (20, 30)), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    loss = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    # The same loss as the already preprocessed images without a preprocessor.
    preprocessor, model.preprocessor = model.preprocessor, None
    expected = model.evaluate(_by_hand(images, (16, 16)), labels, verbose=0)
    model.preprocessor = preprocessor
    np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
    before = model.get_layer("head").kernel.numpy().copy()
    history = model.fit(ds, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(model.get_layer("head").kernel.numpy(), before)


def test_saved_preset_keeps_the_preprocessor(tmp_path):
    model = _classifier()
    images = _raw_images(2)
    expected = model.predict(images, verbose=0)
    model.save_to_preset(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"preprocessor.json", "image_converter.json"} <= files
    with open(tmp_path / "metadata.json") as f:
        assert json.load(f)["tasks"] == ["ImageClassifier"]
    for loaded in (
        models.from_preset(str(tmp_path)),
        VisionMoEImageClassifier.from_preset(str(tmp_path)),
        keras_hub.models.ImageClassifier.from_preset(str(tmp_path)),
    ):
        assert isinstance(loaded, VisionMoEImageClassifier)
        assert isinstance(loaded.preprocessor, VisionMoEImageClassifierPreprocessor)
        assert isinstance(loaded.preprocessor.image_converter, VisionMoEImageConverter)
        np.testing.assert_allclose(
            loaded.predict(images, verbose=0), expected, atol=1e-6, rtol=1e-6
        )
    # preprocessor=None: for inputs already preprocessed.
    # (Logits up to ~11 here: the inputs' float32 rounding, which differs
    # by one step between x / 127.5 and the converter's x * (1 / 127.5),
    # moves them by up to ~5e-5.)
    bare = models.from_preset(str(tmp_path), preprocessor=None)
    assert bare.preprocessor is None
    np.testing.assert_allclose(
        bare.predict(_by_hand(images), verbose=0), expected, atol=1e-4, rtol=1e-4
    )


def test_builtin_presets_carry_the_preprocessor_sized_to_the_model():
    tiny = dict(num_layers=1, hidden_dim=16, mlp_dim=32, num_heads=2)
    model = models.from_preset(
        "vit_dense_s32_224", num_classes=3, image_size=(64, 32), **tiny
    )
    assert isinstance(model.preprocessor, VisionMoEImageClassifierPreprocessor)
    assert model.preprocessor.image_size == (64, 32)  # the override's size
    assert model.predict(_raw_images(2, (100, 80)), verbose=0).shape == (2, 3)
    full = models.presets_dir() / "vit_dense_s32_224"
    loaded = keras_hub.models.ImageClassifierPreprocessor.from_preset(str(full))
    assert isinstance(loaded, VisionMoEImageClassifierPreprocessor)
    assert loaded.image_size == (224, 224)
    for meta in models.list_presets().values():
        assert meta["tasks"] == ["ImageClassifier"]


def test_preprocessor_file_with_code_is_refused(tmp_path):
    _classifier().save_to_preset(str(tmp_path))
    path = tmp_path / "preprocessor.json"
    doc = json.loads(path.read_text())
    doc["config"]["image_converter"] = {
        "class_name": "Lambda",
        "config": {"function": "x"},
    }
    path.write_text(json.dumps(doc))
    with pytest.raises(UnsafePresetError, match="preprocessor.json"):
        models.from_preset(str(tmp_path))
    doc = json.loads(path.read_text())
    doc["registered_name"] = "other_package>Preprocessor"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="preprocessor.json"):
        models.from_preset(str(tmp_path))
