"""Loading untrusted or damaged files: refused or reported with the file named.

- A preset whose config asks for Python code (a `Lambda` layer, a marshalled
  `lambda`) is refused before anything is built (Keras safe mode).
- `.keras` files with our layers keep Keras' safe mode.
- A truncated weights or config file gives a `PresetFileError` naming it.
"""

import json
import os
import shutil

import keras
import pytest
from keras.src.backend.common import global_state

from keras_vmoe import models
from keras_vmoe.models import (
    PresetFileError,
    UnsafePresetError,
    VisionMoEBackbone,
    VisionMoEImageClassifier,
)
from tests.models.tiny import tiny_moe

MARKER = "payload_ran.txt"


def _serialized_lambda():
    """A marshalled initializer `lambda` that leaves `MARKER` when it runs.

    It stands for malicious code; it is self-contained (a literal file name,
    builtins only) because Keras loads lambdas without this module's globals.
    """
    with pytest.warns(UserWarning, match="lambda"):
        return keras.saving.serialize_keras_object(
            lambda shape, dtype=None: (
                open("payload_ran.txt", "w").close(),
                __import__("keras").ops.zeros(shape, dtype=dtype),
            )[1]
        )


def _write(folder, filename, doc):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / filename, "w", encoding="utf-8") as f:
        json.dump(doc, f)


@pytest.fixture
def saved_preset(tmp_path):
    """A saved tiny classifier preset (config, task, weights)."""
    keras.utils.set_random_seed(0)
    backbone = VisionMoEBackbone(**tiny_moe("softmax_token_choice"))
    folder = tmp_path / "trained"
    VisionMoEImageClassifier(backbone, num_classes=3).save_to_preset(str(folder))
    return folder


@pytest.fixture
def unsafe_mode():
    """Runs a test with Keras' safe mode switched off globally."""
    previous = global_state.get_global_attribute("safe_mode_saving")
    keras.config.enable_unsafe_deserialization()
    yield
    global_state.set_global_attribute("safe_mode_saving", previous)


def test_lambda_layer_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "lambda_preset"
    layer = keras.layers.Lambda(lambda x: x * 2, name="double")
    _write(folder, "config.json", keras.saving.serialize_keras_object(layer))
    with pytest.raises(UnsafePresetError) as info:
        models.from_preset(str(folder), num_classes=2)
    message = str(info.value)
    assert "lambda_preset" in message and "config.json" in message
    assert "`Lambda` layer" in message and "safe mode" in message
    assert info.value.path == str(folder / "config.json")
    with pytest.raises(UnsafePresetError, match="lambda_preset"):
        VisionMoEBackbone.from_preset(str(folder))


def _backbone_config_with_lambda():
    config = keras.saving.serialize_keras_object(
        VisionMoEBackbone(**tiny_moe("softmax_token_choice"))
    )
    config = json.loads(json.dumps(config))
    payload = json.loads(json.dumps(_serialized_lambda()))
    config["config"]["router_config"]["kernel_initializer"] = payload
    return config, payload


def test_lambda_inside_a_backbone_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, payload = _backbone_config_with_lambda()
    folder = tmp_path / "hidden_lambda"
    _write(folder, "config.json", config)
    with pytest.raises(
        UnsafePresetError,
        match=r"hidden_lambda.*config\.json.*Python `lambda` at "
        r"`config\.router_config\.kernel_initializer`.*safe mode",
    ):
        models.from_preset(str(folder), num_classes=2)
    assert not os.path.exists(MARKER)
    # The payload is live code: Keras refuses it in safe mode, and runs it
    # when deserialized unsafely and called.
    with pytest.raises(ValueError, match="lambda.*safe_mode=False"):
        keras.saving.deserialize_keras_object(payload)
    keras.saving.deserialize_keras_object(payload, safe_mode=False)((2,))
    assert os.path.exists(MARKER)


def test_refused_even_with_unsafe_deserialization(tmp_path, monkeypatch, unsafe_mode):
    monkeypatch.chdir(tmp_path)
    config, _ = _backbone_config_with_lambda()
    folder = tmp_path / "hidden_lambda"
    _write(folder, "config.json", config)
    with pytest.raises(UnsafePresetError, match="hidden_lambda"):
        VisionMoEBackbone.from_preset(str(folder))
    assert not os.path.exists(MARKER)


def test_lambda_in_task_json_is_refused(saved_preset):
    with open(saved_preset / "task.json") as f:
        task = json.load(f)
    task["config"]["preprocessor"] = keras.saving.serialize_keras_object(
        keras.layers.Lambda(lambda x: x / 255.0)
    )
    _write(saved_preset, "task.json", task)
    with pytest.raises(UnsafePresetError, match=r"trained.*task\.json.*Lambda"):
        models.from_preset(str(saved_preset))


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_keras_file_with_a_lambda_keeps_safe_mode(tmp_path):
    """Our `compile_from_config` deserializes under Keras' safe mode."""
    keras.utils.set_random_seed(0)
    backbone = VisionMoEBackbone(**tiny_moe("softmax_token_choice"))
    model = VisionMoEImageClassifier(backbone, num_classes=3)
    model.compile(loss=lambda y_true, y_pred: keras.ops.mean(y_pred))
    path = str(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="lambda"):
        model.save(path)
    with pytest.raises(ValueError, match="lambda.*safe_mode=False"):
        keras.saving.load_model(path)
    loaded = keras.saving.load_model(path, safe_mode=False)  # trusted: loads
    assert isinstance(loaded, VisionMoEImageClassifier)


@pytest.mark.parametrize("filename", ["model.weights.h5", "task.weights.h5"])
def test_truncated_weights_name_the_file(saved_preset, filename):
    path = saved_preset / filename
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PresetFileError, match="truncated") as info:
        models.from_preset(str(saved_preset))
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_backbone_weights_name_the_file(saved_preset):
    path = saved_preset / "model.weights.h5"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PresetFileError, match=r"model\.weights\.h5.*truncated"):
        VisionMoEBackbone.from_preset(str(saved_preset))
    # Without weights the architecture still loads.
    backbone = VisionMoEBackbone.from_preset(str(saved_preset), load_weights=False)
    assert backbone.num_experts == 4


def test_truncated_config_names_the_file(saved_preset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved_preset, copy)
    text = (copy / "config.json").read_text()
    (copy / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(PresetFileError, match=r"copy/config\.json.*not valid JSON"):
        models.from_preset(str(copy))
    assert models.from_preset(str(saved_preset)).num_classes == 3  # intact


def test_only_classes_registered_by_keras_vmoe_or_keras_hub_load(tmp_path):
    """A preset names its classes by registered name; the `module` entry is
    never imported, and a class registered by another package is refused."""

    @keras.saving.register_keras_serializable(package="elsewhere")
    class ElsewhereBackbone(VisionMoEBackbone):
        pass

    config = json.loads(
        json.dumps(
            keras.saving.serialize_keras_object(
                VisionMoEBackbone(**tiny_moe("softmax_token_choice"))
            )
        )
    )
    folder = tmp_path / "elsewhere"
    _write(
        folder,
        "config.json",
        dict(config, registered_name="elsewhere>ElsewhereBackbone"),
    )
    with pytest.raises(
        ValueError, match=r"config\.json.*'elsewhere>ElsewhereBackbone'"
    ):
        VisionMoEBackbone.from_preset(str(folder), load_weights=False)
    # No registered name: the module and class name are not used.
    doc = dict(config, module="this_module_does_not_exist", class_name="Anything")
    del doc["registered_name"]
    _write(folder, "config.json", doc)
    with pytest.raises(ValueError, match=r"config\.json.*without a registered name"):
        models.from_preset(str(folder), num_classes=2, load_weights=False)
