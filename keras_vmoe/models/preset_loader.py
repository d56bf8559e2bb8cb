"""Preset loading: find a preset folder, read it, apply overrides, build.

A preset is a folder in the keras-hub format (`config.json`, optional
`task.json`, `metadata.json`, `model.weights.h5` or the sharded
`model.weights.json` with its `model_*.weights.h5` shards,
`task.weights.h5`). This module finds built-in presets by name, reports a
missing or unreadable file by name, and lets callers override any
constructor argument. Weights are required unless `metadata.json` says
`"weights": null` (the built-in architecture presets) or the caller passes
`load_weights=False`.
"""

import difflib
import json
import os
import pathlib

import keras

from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.image_classifier import VisionMoEImageClassifier

PRESETS_ENV_VAR = "KERAS_VMOE_PRESETS_DIR"
_DEFAULT_IMAGE_SHAPE = (224, 224, 3)
# Serialized objects that carry Python code: a Keras `Lambda` layer and a
# Python `lambda` (marshalled bytecode), which Keras' safe mode refuses.
_CODE_CLASS_NAMES = {"Lambda": "a `Lambda` layer", "__lambda__": "a Python `lambda`"}


class PresetFileError(ValueError):
    """A preset file that exists but cannot be used (unreadable, corrupt).

    Args:
        message: str. What is wrong, naming the file.
        path: str or os.PathLike. The file.
    """

    def __init__(self, message, path):
        super().__init__(message)
        self.path = str(path)


class UnsafePresetError(PresetFileError):
    """A preset whose config asks for arbitrary Python code.

    Keras' safe mode refuses to deserialize Python lambdas (marshalled
    bytecode): loading them could run any code. Preset configs here hold
    only constructor arguments, so such a preset is refused, whatever
    `keras.config.enable_unsafe_deserialization()` says.
    """


def presets_dir():
    """The folder holding the built-in presets.

    Looked up in order: `$KERAS_VMOE_PRESETS_DIR`; `keras_vmoe/presets`
    (installed as package data); `presets/` next to the package (a source
    checkout); `<sys.prefix>/share/keras_vmoe/presets` (installed as data
    files). Returns the first that exists, else the checkout location.
    """
    import sys

    here = pathlib.Path(__file__).resolve().parent  # keras_vmoe/models
    candidates = []
    if os.environ.get(PRESETS_ENV_VAR):
        candidates.append(pathlib.Path(os.environ[PRESETS_ENV_VAR]))
    candidates += [
        here.parent / "presets",
        here.parent.parent / "presets",
        pathlib.Path(sys.prefix) / "share" / "keras_vmoe" / "presets",
    ]
    for path in candidates:
        if path.is_dir():
            return path
    return here.parent.parent / "presets"


def builtin_names():
    """Names of the preset folders in `presets_dir()`.

    Hidden folders (`.tmp-*`, `.old-*` left by an interrupted atomic save)
    are not presets.
    """
    root = presets_dir()
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and (p / "config.json").is_file()
    )


def read_json(folder, filename, required=True):
    path = pathlib.Path(folder) / filename
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"Preset folder '{folder}' has no `{filename}` (expected {path})."
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PresetFileError(
            f"Preset file {path} is not valid JSON (truncated or corrupt?): {e}",
            path,
        ) from e


def _find_code(node, where):
    """`(location, description)` of the first code-carrying object, or None."""
    if isinstance(node, dict):
        kind = _CODE_CLASS_NAMES.get(node.get("class_name"))
        if kind is not None:
            return where, kind
        items = node.items()
    elif isinstance(node, list):
        items = ((f"[{i}]", v) for i, v in enumerate(node))
    else:
        return None
    for key, value in items:
        found = _find_code(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _refuse_code(doc, folder, filename):
    """Raises `UnsafePresetError` if `doc` asks for a Lambda or a lambda."""
    found = _find_code(doc, "")
    if found is None:
        return
    where, kind = found
    path = pathlib.Path(folder) / filename
    raise UnsafePresetError(
        f"Refusing to load preset '{folder}': {filename} contains {kind} at "
        f"`{where or '(top level)'}`, i.e. arbitrary Python code, which Keras "
        "safe mode does not deserialize (loading it could run any code). "
        "keras_vmoe presets hold constructor arguments only; load presets "
        "from sources you trust, and build custom layers in code.",
        path,
    )


def resolve_preset(name_or_dir):
    """The folder of a preset given by built-in name or directory path.

    Raises:
        ValueError: unknown name (the message lists close matches).
    """
    if not isinstance(name_or_dir, (str, os.PathLike)):
        raise ValueError(f"A preset must be a name or a folder, got {name_or_dir!r}.")
    path = pathlib.Path(name_or_dir)
    if path.is_dir():
        return path
    names = builtin_names()
    if str(name_or_dir) in names:
        return presets_dir() / str(name_or_dir)
    close = difflib.get_close_matches(str(name_or_dir), names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown preset {str(name_or_dir)!r}: not a built-in preset name and "
        f"not a folder.{hint} See keras_vmoe.models.list_presets()."
    )


def _serialized(obj_config, cls):
    if not isinstance(obj_config, dict) or "config" not in obj_config:
        raise ValueError(f"expected a serialized {cls.__name__} with a 'config' entry")
    registered = obj_config.get("registered_name") or obj_config.get("class_name")
    found = keras.saving.get_registered_object(registered)
    if found is None or not issubclass(found, cls):
        raise ValueError(f"it holds {registered!r}, not a {cls.__name__}")
    return found, dict(obj_config["config"])


def _load_configs(folder):
    """(backbone class and config, classifier class and config, metadata)."""
    raw = read_json(folder, "config.json")
    _refuse_code(raw, folder, "config.json")
    try:
        backbone_cls, backbone_config = _serialized(raw, VisionMoEBackbone)
    except ValueError as e:
        raise ValueError(
            f"Preset file {pathlib.Path(folder) / 'config.json'}: {e}."
        ) from e
    metadata = read_json(folder, "metadata.json", required=False)
    task = read_json(folder, "task.json", required=False)
    task_cls, task_config = VisionMoEImageClassifier, {}
    if task is not None:
        _refuse_code(task, folder, "task.json")
        try:
            task_cls, task_config = _serialized(task, VisionMoEImageClassifier)
        except ValueError as e:
            raise ValueError(
                f"Preset file {pathlib.Path(folder) / 'task.json'}: {e}."
            ) from e
        task_config.pop("backbone", None)
        task_config.pop("preprocessor", None)
    return backbone_cls, backbone_config, task_cls, task_config, metadata


def _names(cls, skip=("self", "args", "kwargs")):
    import inspect

    return [n for n in inspect.signature(cls.__init__).parameters if n not in skip]


def _apply_backbone_overrides(config, overrides):
    config = dict(config)
    overrides = dict(overrides)
    if "image_size" in overrides:
        size = overrides.pop("image_size")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        channels = config.get("image_shape", _DEFAULT_IMAGE_SHAPE)[-1]
        overrides.setdefault("image_shape", (*hw, channels))
    if "router" in overrides and overrides["router"] != config.get("router"):
        # Another router's kwargs rarely fit: fall back to its own defaults.
        overrides.setdefault("router_config", None)
        if overrides["router"] is None:
            overrides.setdefault("moe_layers", None)
            overrides.setdefault("num_experts", None)
    config.update(overrides)
    return config


def _split_overrides(overrides, for_classifier):
    backbone_names = set(_names(VisionMoEBackbone)) | {"image_size", "dtype"}
    classifier_names = set(_names(VisionMoEImageClassifier)) - {"backbone"}
    classifier_names |= {"name", "compile"} if for_classifier else set()
    if not for_classifier:
        backbone_names |= {"name", "trainable"}
    backbone_kw, classifier_kw = {}, {}
    for key, value in overrides.items():
        if key in classifier_names and for_classifier:
            classifier_kw[key] = value
        elif key in backbone_names:
            backbone_kw[key] = value
        else:
            valid = sorted(
                backbone_names | (classifier_names if for_classifier else set())
            )
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"Unknown preset override {key!r}.{hint} Valid overrides: "
                f"{', '.join(valid)}."
            )
    return backbone_kw, classifier_kw


def _check_weights_file(path):
    """Raises `PresetFileError` naming `path` unless it opens as HDF5."""
    import h5py

    try:
        with h5py.File(path, "r"):
            pass
    except OSError as e:
        reason = " ".join(str(e).split())
        raise PresetFileError(
            f"Weights file {path} cannot be read: it is truncated, corrupt or "
            f"not an HDF5 file ({reason}). Save or copy the preset again, or "
            "pass load_weights=False to build the model without it.",
            path,
        ) from e


def _load_weights(model, path, method):
    if path.suffix == ".h5":  # (A sharded index's shards are checked already.)
        _check_weights_file(path)
    try:
        getattr(model, method)(str(path))
    except OSError as e:  # A read error past the file header.
        raise PresetFileError(
            f"Weights file {path} cannot be read: {e}. Save or copy the preset "
            "again, or pass load_weights=False.",
            path,
        ) from e
    except Exception as e:  # noqa: BLE001 - re-raised with the file named.
        raise ValueError(
            f"Could not load weights from {path}: {e}. If you overrode the "
            "architecture, pass load_weights=False."
        ) from e


def _backbone_weights_file(folder, metadata):
    """The backbone weights to load: `model.weights.h5`, or the sharded
    `model.weights.json` (its shards checked), or None for an architecture
    preset (`metadata.json` says `"weights": null`).

    Raises:
        FileNotFoundError: a weights file the preset needs is missing (named).
        PresetFileError: `model.weights.json` or a shard is unreadable (named).
    """
    single = folder / "model.weights.h5"
    if single.is_file():
        return single
    index = folder / "model.weights.json"
    if index.is_file():
        weight_map = read_json(folder, "model.weights.json").get("weight_map")
        if not isinstance(weight_map, dict):
            raise PresetFileError(
                f"Sharded weights index {index} has no `weight_map`: it is not "
                "a Keras sharded weights file. Save the preset again.",
                index,
            )
        shards = set()
        for files in weight_map.values():
            shards.update(files if isinstance(files, list) else [files])
        for shard in sorted(shards):
            path = folder / shard
            if not path.is_file():
                raise FileNotFoundError(
                    f"Preset folder '{folder}' has no `{shard}`, a weights shard "
                    f"listed in {index}. Copy the whole preset folder, or pass "
                    "load_weights=False."
                )
            _check_weights_file(path)
        return index
    if isinstance(metadata, dict) and "weights" in metadata:
        if metadata["weights"] is None:  # An architecture preset: no weights.
            return None
    raise FileNotFoundError(
        f"Preset folder '{folder}' has no `model.weights.h5` (expected "
        f"{single}, or a sharded `model.weights.json`). Copy the whole preset "
        "folder, or pass load_weights=False for random weights."
    )


def load_backbone(preset, load_weights=True, **overrides):
    """A `VisionMoEBackbone` from a preset name or folder; see `from_preset`."""
    folder = resolve_preset(preset)
    backbone_cls, config, _, _, metadata = _load_configs(folder)
    backbone_kw, _ = _split_overrides(overrides, for_classifier=False)
    backbone = backbone_cls.from_config(_apply_backbone_overrides(config, backbone_kw))
    weights = _backbone_weights_file(folder, metadata) if load_weights else None
    if weights is not None:
        _load_weights(backbone, weights, "load_weights")
    return backbone


def load_classifier(preset, load_weights=True, **overrides):
    """A `VisionMoEImageClassifier` from a preset; see `from_preset`."""
    folder = resolve_preset(preset)
    backbone_cls, config, task_cls, task_config, metadata = _load_configs(folder)
    backbone_kw, classifier_kw = _split_overrides(overrides, for_classifier=True)
    if "backbone" in overrides:
        raise ValueError("Pass overrides, not a `backbone`, to from_preset().")
    backbone = backbone_cls.from_config(_apply_backbone_overrides(config, backbone_kw))
    task_config = {**task_config, **classifier_kw}
    if "num_classes" not in task_config:
        raise ValueError(
            f"Preset folder '{folder}' has no `task.json`; pass `num_classes=`."
        )
    model = task_cls(backbone=backbone, **task_config)
    if load_weights:
        weights = _backbone_weights_file(folder, metadata)
        if weights is not None:
            _load_weights(backbone, weights, "load_weights")
        task_weights = folder / "task.weights.h5"
        if task_weights.is_file() and "num_classes" not in classifier_kw:
            _load_weights(model, task_weights, "load_task_weights")
    return model


def from_preset(name_or_dir, load_weights=True, **overrides):
    """A `VisionMoEImageClassifier` from a built-in preset or a preset folder.

    Args:
        name_or_dir: str. A name from `list_presets()` or a folder written by
            `save_to_preset()`.
        load_weights: bool. Load the saved weights (`model.weights.h5` or
            sharded `model.weights.json`, and `task.weights.h5` unless
            `num_classes` is overridden). Built-in architecture presets have
            none and build with random weights. Defaults to `True`.
        **overrides: Backbone or classifier arguments replacing the
            preset's: `num_classes`, `image_size` (int or (h, w)), `router`
            (its `router_config` then resets to the router's defaults unless
            also given), `num_experts`, `num_layers`, `hidden_dim`, ...

    Returns:
        `VisionMoEImageClassifier`.

    Raises:
        ValueError: unknown preset (close matches listed) or unknown
            override.
        PresetFileError: a preset file (named) is not valid JSON, or a
            weights file is truncated or not HDF5 (a `ValueError`).
        UnsafePresetError: the preset's config asks for Python code (a
            `Lambda` layer or a `lambda`), which Keras safe mode refuses (a
            `PresetFileError`).
        FileNotFoundError: a required preset file is missing (named):
            `config.json`, or with `load_weights=True` the weights of a
            preset whose `metadata.json` does not say `"weights": null`.

    Example:
    >>> model = from_preset("vmoe_softmax_ec_b16_e32_224", num_classes=10,
    ...     image_size=32, num_layers=2, hidden_dim=16, mlp_dim=32,
    ...     num_heads=2, num_experts=4, group_size=1)
    >>> model.backbone.moe_layer_indices
    (1,)
    """
    return load_classifier(name_or_dir, load_weights=load_weights, **overrides)
