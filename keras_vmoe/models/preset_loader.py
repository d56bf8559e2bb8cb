"""Preset loading: find a preset folder, read it, apply overrides, build.

A preset is a folder in the keras-hub format (`config.json`, optional
`task.json`, optional `preprocessor.json`, `metadata.json`,
`model.weights.h5` or the sharded `model.weights.json` with its
`model_*.weights.h5` shards, `task.weights.h5`). This module finds built-in presets by name, reports a
missing or unreadable file by name, and lets callers override any
constructor argument. Weights are required unless `metadata.json` says
`"weights": null` (the built-in architecture presets) or the caller passes
`load_weights=False`.

The loader knows no model family: the backbone, task and preprocessor
classes come from the `registered_name` of `config.json`, `task.json` and
`preprocessor.json` (e.g.
`"keras_vmoe>VisionMoEBackbone"`), looked up in Keras' serialization
registry; only classes that keras_vmoe or keras-hub registered, and that
are keras-hub backbones, tasks and preprocessors, are accepted. A
classifier gets the preset's preprocessor (from `preprocessor.json`, else
the one inside `task.json`), its image converter resizing to the built
backbone's image size. The overrides a preset
takes are the resolved classes' constructor arguments; a backbone class may
define `apply_preset_overrides(config, overrides)` to adjust a config when
some change (the V-MoE backbone resets `router_config` with a new router).
"""

import difflib
import inspect
import os
import pathlib

import keras
from keras_hub.models import Backbone, ImageClassifier, Preprocessor

from keras_vmoe.utils import preset_files
from keras_vmoe.utils.preset_files import (  # noqa: F401 (re-exported)
    PRESETS_ENV_VAR,
    PresetFileError,
    read_json,
)

# Packages whose registered classes a preset may name (keras-hub registers
# its classes under "keras_hub" and, for older files, "keras_nlp").
TRUSTED_PACKAGES = ("keras_vmoe", "keras_hub", "keras_nlp")
# Serialized objects that carry Python code: a Keras `Lambda` layer and a
# Python `lambda` (marshalled bytecode), which Keras' safe mode refuses.
_CODE_CLASS_NAMES = {"Lambda": "a `Lambda` layer", "__lambda__": "a Python `lambda`"}


class UnsafePresetError(PresetFileError):
    """A preset whose config asks for arbitrary Python code.

    Keras' safe mode refuses to deserialize Python lambdas (marshalled
    bytecode): loading them could run any code. Preset configs here hold
    only constructor arguments, so such a preset is refused, whatever
    `keras.config.enable_unsafe_deserialization()` says.
    """


def presets_dir():
    """The folder holding the built-in presets (`preset_files.presets_dir`).

    Looked up in order: `$KERAS_VMOE_PRESETS_DIR`; `keras_vmoe/presets`
    (installed as package data); `presets/` next to the package (a source
    checkout); `<sys.prefix>/share/keras_vmoe/presets` (installed as data
    files). Returns the first that exists, else the checkout location.
    """
    return preset_files.presets_dir(__file__)


def builtin_names():
    """Names of the preset folders in `presets_dir()`.

    Hidden folders (`.tmp-*`, `.old-*` left by an interrupted atomic save)
    are not presets.
    """
    return preset_files.builtin_names(presets_dir())


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


def _registered_class(obj_config, base):
    """The class a serialized object names, if registered and a `base`.

    Only the `registered_name` is used (`"package>ClassName"`, looked up in
    Keras' registry of serializable classes); the `module` entry is never
    imported.
    """
    if not isinstance(obj_config, dict) or "config" not in obj_config:
        raise ValueError(f"expected a serialized {base.__name__} with a 'config' entry")
    registered = obj_config.get("registered_name")
    if not isinstance(registered, str) or ">" not in registered:
        raise ValueError(
            f"it holds {obj_config.get('class_name')!r} without a registered "
            f"name, not a registered {base.__name__}"
        )
    package = registered.partition(">")[0]
    found = keras.saving.get_registered_object(registered)
    if (
        package not in TRUSTED_PACKAGES
        or not inspect.isclass(found)
        or not issubclass(found, base)
    ):
        raise ValueError(
            f"it holds {registered!r}, not a {base.__name__} registered by "
            f"{' or '.join(TRUSTED_PACKAGES[:2])}"
        )
    return found, dict(obj_config["config"])


def _read_serialized(folder, filename, base, required=True):
    """`(class, config)` of `filename`, or None when absent and optional."""
    doc = read_json(folder, filename, required=required)
    if doc is None:
        return None
    _refuse_code(doc, folder, filename)
    try:
        return _registered_class(doc, base)
    except ValueError as e:
        raise ValueError(f"Preset file {pathlib.Path(folder) / filename}: {e}.") from e


def _task_class_for(backbone_cls, base, folder):
    """The registered `base` subclass whose `backbone_cls` is `backbone_cls`."""
    if getattr(base, "backbone_cls", None) is backbone_cls:
        return base
    found = {
        obj
        for obj in keras.saving.get_custom_objects().values()
        if inspect.isclass(obj)
        and issubclass(obj, base)
        and getattr(obj, "backbone_cls", None) is backbone_cls
    }
    if len(found) != 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        which = f"several do ({names})" if found else "none does"
        raise ValueError(
            f"Preset folder '{folder}' has no `task.json`, and no single "
            f"registered {base.__name__} takes a {backbone_cls.__name__}: "
            f"{which}. Load it with the task class's `from_preset`."
        )
    return found.pop()


def _load_configs(folder, backbone_base=Backbone, task_base=None):
    """(backbone class and config, task class and config, metadata).

    The task is read only when `task_base` is given; without `task.json`,
    the registered `task_base` subclass made for the backbone class is used.
    """
    backbone_cls, backbone_config = _read_serialized(
        folder, "config.json", backbone_base
    )
    metadata = read_json(folder, "metadata.json", required=False)
    task_cls, task_config = None, {}
    if task_base is not None:
        task = _read_serialized(folder, "task.json", task_base, required=False)
        if task is None:
            task_cls = _task_class_for(backbone_cls, task_base, folder)
        else:
            task_cls, task_config = task
            expected = getattr(task_cls, "backbone_cls", None) or Backbone
            if not issubclass(backbone_cls, expected):
                raise ValueError(
                    f"Preset file {pathlib.Path(folder) / 'task.json'}: "
                    f"{task_cls.__name__} takes a {expected.__name__}, but "
                    f"config.json holds a {backbone_cls.__name__}."
                )
            task_config.pop("backbone", None)
    return backbone_cls, backbone_config, task_cls, task_config, metadata


def _load_preprocessor(folder, task_config):
    """The preset's preprocessor, or None; pops it from `task_config`.

    `preprocessor.json` (what keras-hub's `from_preset` reads) comes first;
    a preset without it may hold the preprocessor inside `task.json`.
    """
    inline = task_config.pop("preprocessor", None)
    found = _read_serialized(folder, "preprocessor.json", Preprocessor, required=False)
    if found is None and isinstance(inline, dict):
        try:
            found = _registered_class(inline, Preprocessor)
        except ValueError as e:
            path = pathlib.Path(folder) / "task.json"
            raise ValueError(f"Preset file {path}, `preprocessor`: {e}.") from e
    if found is None:
        return None
    preprocessor_cls, config = found
    return preprocessor_cls.from_config(config)


def _fit_preprocessor_to(preprocessor, backbone):
    """Makes the image converter resize to the backbone's image size."""
    converter = getattr(preprocessor, "image_converter", None)
    shape = getattr(backbone, "image_shape", None)
    if converter is None or converter.image_size is None or shape is None:
        return
    if getattr(backbone, "data_format", "channels_last") == "channels_first":
        converter.image_size = tuple(shape[1:3])
    else:
        converter.image_size = tuple(shape[:2])


def _names(cls, skip=("self", "args", "kwargs")):
    return [n for n in inspect.signature(cls.__init__).parameters if n not in skip]


def _apply_backbone_overrides(backbone_cls, config, overrides):
    """The backbone config with `overrides`; `image_size` sets `image_shape`."""
    overrides = dict(overrides)
    if "image_size" in overrides:
        size = overrides.pop("image_size")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        shape = config.get("image_shape")
        if shape is None:
            shape = (
                inspect.signature(backbone_cls.__init__)
                .parameters["image_shape"]
                .default
            )
        overrides.setdefault("image_shape", (*hw, shape[-1]))
    family_hook = getattr(backbone_cls, "apply_preset_overrides", None)
    if family_hook is not None:
        return family_hook(dict(config), overrides)
    return {**config, **overrides}


def _split_overrides(overrides, backbone_cls, task_cls=None):
    """`(backbone overrides, task overrides)`; an unknown key raises.

    The valid keys are the constructor arguments of the preset's classes
    (with `image_size` for backbones that take an `image_shape`).
    """
    backbone_names = set(_names(backbone_cls)) | {"dtype"}
    if "image_shape" in backbone_names:
        backbone_names.add("image_size")
    classifier_names = set()
    if task_cls is None:  # `name` and `trainable` are the backbone's.
        backbone_names |= {"name", "trainable"}
    else:
        classifier_names = set(_names(task_cls)) - {"backbone"}
        classifier_names |= {"name", "compile"}
    backbone_kw, classifier_kw = {}, {}
    for key, value in overrides.items():
        if key in classifier_names:
            classifier_kw[key] = value
        elif key in backbone_names:
            backbone_kw[key] = value
        else:
            valid = sorted(backbone_names | classifier_names)
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


def load_backbone(preset, load_weights=True, cls=Backbone, **overrides):
    """The backbone of a preset name or folder; see `from_preset`.

    Args:
        preset: str. A built-in preset name or a preset folder.
        load_weights: bool. Load `model.weights.h5` (or the sharded
            weights). Defaults to `True`.
        cls: class. The preset's backbone must be a registered subclass
            (`VisionMoEBackbone.from_preset` passes itself). Defaults to
            `keras_hub.models.Backbone`.
        **overrides: Constructor arguments of the preset's backbone class.
    """
    folder = resolve_preset(preset)
    backbone_cls, config, _, _, metadata = _load_configs(folder, cls)
    backbone_kw, _ = _split_overrides(overrides, backbone_cls)
    backbone = backbone_cls.from_config(
        _apply_backbone_overrides(backbone_cls, config, backbone_kw)
    )
    weights = _backbone_weights_file(folder, metadata) if load_weights else None
    if weights is not None:
        _load_weights(backbone, weights, "load_weights")
    return backbone


def load_classifier(preset, load_weights=True, cls=ImageClassifier, **overrides):
    """The image classifier of a preset name or folder; see `from_preset`.

    Args:
        preset: str. A built-in preset name or a preset folder.
        load_weights: bool. Load the saved weights. Defaults to `True`.
        cls: class. The preset's task (`task.json`) must be a registered
            subclass (`VisionMoEImageClassifier.from_preset` passes itself);
            without `task.json`, the registered subclass made for the
            preset's backbone class is built. Defaults to
            `keras_hub.models.ImageClassifier`.
        **overrides: Constructor arguments of the preset's backbone or task;
            `preprocessor=None` leaves the preset's preprocessor out.
    """
    folder = resolve_preset(preset)
    if "backbone" in overrides:
        raise ValueError("Pass overrides, not a `backbone`, to from_preset().")
    backbone_cls, config, task_cls, task_config, metadata = _load_configs(
        folder, task_base=cls
    )
    backbone_kw, classifier_kw = _split_overrides(overrides, backbone_cls, task_cls)
    backbone = backbone_cls.from_config(
        _apply_backbone_overrides(backbone_cls, config, backbone_kw)
    )
    if "preprocessor" not in classifier_kw:
        preprocessor = _load_preprocessor(folder, task_config)
        _fit_preprocessor_to(preprocessor, backbone)
        classifier_kw["preprocessor"] = preprocessor
    task_config.pop("preprocessor", None)
    task_config = {**task_config, **classifier_kw}
    missing = [
        name
        for name, p in inspect.signature(task_cls.__init__).parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and name not in ("self", "backbone", *task_config)
    ]
    if missing:
        needed = ", ".join(f"`{name}=`" for name in missing)
        raise ValueError(f"Preset folder '{folder}' has no `task.json`; pass {needed}.")
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
    """The image classifier of a built-in preset or a preset folder.

    The classes are the preset's own (`VisionMoEImageClassifier` for the
    built-in presets and the models keras_vmoe saves; a keras-hub
    classifier's preset, e.g. a dense `ViTImageClassifier`, loads too).

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
            also given), `num_experts`, `num_layers`, `hidden_dim`, ...;
            `preprocessor=None` for a classifier without the preset's
            preprocessor (for inputs already preprocessed, such as the
            `keras_vmoe.data` pipelines' batches).

    Returns:
        A `keras_hub.models.ImageClassifier` (`VisionMoEImageClassifier`)
        with the preset's preprocessor (`VisionMoEImageClassifierPreprocessor`:
        raw images of any size in, resized to the model's size and scaled
        to [-1, 1]), when the preset has one.

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
