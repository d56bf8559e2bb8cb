"""Architecture presets: definitions, generation, listing and loading.

A preset is a keras-hub preset folder `presets/<name>/` holding
`config.json` (the serialized `VisionMoEBackbone`), `task.json` (the
serialized `VisionMoEImageClassifier`), `metadata.json` (description,
parameter count, FLOPs per image) and, for trained models only,
`model.weights.h5` / `task.weights.h5`. The shipped presets are
architectures (random initialisation). Regenerate them with
`python presets/generate.py`.

Families (all 224x224 images, ImageNet-1k head with sigmoid loss):

- `vmoe_{router}_{size}_e32_224`: V-MoE (Riquelme et al. 2021) with 32
  experts, one preset per router of Liu et al. 2024; sizes `s32` (the
  8-block V-MoE S), `b32`, `b16`, `l16`, `h14`. Class token, pre-logits,
  groups of 8 images. Placement as in the V-MoE paper configs:
  `"last_odd:2"` for S/32 (the S/32 "Last 2" model), `"every:2"` for the
  others. Every router costs about two expert MLPs per token: Token Choice
  with K=2 at capacity factor 1.05; Expert Choice routers at capacity
  factor 2; the Soft MoE router per image (group of 1) with
  `round(2 * tokens / E)` slots per expert. Experts start identical.
- `vit_dense_{size}_224`: the dense ViT baseline of each size.
- `soft_moe_{s16,b16}_e128_224`: Soft MoE (Puigcerver et al. 2024) with
  128 experts of 1 slot, in the second half of the blocks (`"last:6"`),
  groups of 1 image, no class token, global average pooling, no pre-logits.
  S is the 12-block, d=384 ViT-S here.
"""

import difflib
import json
import os
import pathlib

import keras

from keras_vmoe.models import cost
from keras_vmoe.models.vmoe_backbone import VisionMoEBackbone, parse_moe_layers
from keras_vmoe.models.vmoe_image_classifier import VisionMoEImageClassifier

# (num_layers, hidden_dim, mlp_dim, num_heads); ROUTERS.md section 4.
SIZES = {
    "S": (8, 512, 2048, 8),  # V-MoE S (8 blocks)
    "S_soft": (12, 384, 1536, 6),  # Soft MoE / big_vision S (12 blocks)
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}
VMOE_VARIANTS = (("S", 32), ("B", 32), ("B", 16), ("L", 16), ("H", 14))
VMOE_NUM_EXPERTS = 32
NUM_CLASSES = 1000
IMAGE_SIZE = 224

# short name -> (router, router_config, images per group, label)
ROUTER_RECIPES = {
    "softmax_tc": (
        "softmax_token_choice",
        {"num_selected_experts": 2, "capacity_factor": 1.05},
        8,
        "Softmax Token Choice (K=2, capacity factor 1.05)",
    ),
    "sinkhorn_tc": (
        "sinkhorn_token_choice",
        {"num_selected_experts": 2, "capacity_factor": 1.05},
        8,
        "Sinkhorn Token Choice (K=2, capacity factor 1.05)",
    ),
    "softmax_ec": (
        "softmax_expert_choice",
        {"capacity_factor": 2.0},
        8,
        "Softmax Expert Choice (capacity factor 2)",
    ),
    "sinkhorn_ec": (
        "sinkhorn_expert_choice",
        {"capacity_factor": 2.0},
        8,
        "Sinkhorn Expert Choice (capacity factor 2)",
    ),
    "sparsity_ec": (
        "sparsity_constrained_expert_choice",
        {"capacity_factor": 2.0},
        8,
        "Sparsity-constrained Expert Choice (capacity factor 2)",
    ),
    "soft": (
        "soft",
        {"capacity_factor": 2.0},
        1,
        "Soft MoE router (round(2T/E) slots per expert, 1 image per group)",
    ),
}

PRESETS_ENV_VAR = "KERAS_VMOE_PRESETS_DIR"
_PRESET_FILES = ("config.json", "task.json", "metadata.json")


def _size_kwargs(size, patch):
    layers, d, mlp, heads = SIZES[size]
    return dict(
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        patch_size=patch,
        num_layers=layers,
        hidden_dim=d,
        mlp_dim=mlp,
        num_heads=heads,
    )


def preset_definitions():
    """Every shipped preset, as `{name: (description, backbone_kwargs, classifier_kwargs)}`."""
    defs = {}
    for size, patch in VMOE_VARIANTS:
        tag = f"{size.lower()}{patch}"
        base = _size_kwargs(size, patch)
        layers, d = base["num_layers"], base["hidden_dim"]
        head = dict(num_classes=NUM_CLASSES, representation_size=d, loss_type="sigmoid")
        arch = f"ViT-{size}/{patch} ({layers} blocks, d={d})"
        defs[f"vit_dense_{tag}_224"] = (
            f"Dense {arch} baseline, class token, pre-logits; random init.",
            dict(base),
            dict(head),
        )
        placement = "last_odd:2" if size == "S" else "every:2"
        for short, (router, router_config, group, label) in ROUTER_RECIPES.items():
            blocks = parse_moe_layers(placement, layers)
            backbone = dict(
                base,
                moe_layers=placement,
                router=router,
                router_config=dict(router_config),
                num_experts=VMOE_NUM_EXPERTS,
                group_size=group,
                identical_expert_init=True,
            )
            desc = (
                f"V-MoE {arch}, {VMOE_NUM_EXPERTS} experts, {label}; MoE in "
                f"blocks {list(blocks)} ('{placement}'); random init."
            )
            defs[f"vmoe_{short}_{tag}_e{VMOE_NUM_EXPERTS}_224"] = (
                desc,
                backbone,
                dict(head),
            )
    for size in ("S", "B"):
        base = _size_kwargs("S_soft" if size == "S" else size, 16)
        layers, d = base["num_layers"], base["hidden_dim"]
        placement = f"last:{layers // 2}"
        backbone = dict(
            base,
            moe_layers=placement,
            router="soft",
            router_config={"num_slots": 1},
            num_experts=128,
            group_size=1,
            identical_expert_init=True,
            use_class_token=False,
            pooling="gap",
        )
        desc = (
            f"Soft MoE ViT-{size}/16 ({layers} blocks, d={d}), 128 experts of 1 "
            f"slot in the last {layers // 2} blocks ('{placement}'), global "
            "average pooling; random init."
        )
        head = dict(
            num_classes=NUM_CLASSES, representation_size=None, loss_type="sigmoid"
        )
        defs[f"soft_moe_{size.lower()}16_e128_224"] = (desc, backbone, head)
    return defs


# ----------------------------------------------------------------------------
# Where presets live.
# ----------------------------------------------------------------------------
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


def _builtin_names():
    root = presets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def _read_json(folder, filename, required=True):
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
        raise ValueError(f"Preset file {path} is not valid JSON: {e}") from e


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
    names = _builtin_names()
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
    """(backbone class, backbone config, classifier class, classifier config)."""
    raw = _read_json(folder, "config.json")
    try:
        backbone_cls, backbone_config = _serialized(raw, VisionMoEBackbone)
    except ValueError as e:
        raise ValueError(
            f"Preset file {pathlib.Path(folder) / 'config.json'}: {e}."
        ) from e
    _read_json(folder, "metadata.json", required=False)  # must parse if present
    task = _read_json(folder, "task.json", required=False)
    task_cls, task_config = VisionMoEImageClassifier, {}
    if task is not None:
        try:
            task_cls, task_config = _serialized(task, VisionMoEImageClassifier)
        except ValueError as e:
            raise ValueError(
                f"Preset file {pathlib.Path(folder) / 'task.json'}: {e}."
            ) from e
        task_config.pop("backbone", None)
        task_config.pop("preprocessor", None)
    return backbone_cls, backbone_config, task_cls, task_config


def _names(cls, skip=("self", "args", "kwargs")):
    import inspect

    return [n for n in inspect.signature(cls.__init__).parameters if n not in skip]


def _apply_backbone_overrides(config, overrides):
    config = dict(config)
    overrides = dict(overrides)
    if "image_size" in overrides:
        size = overrides.pop("image_size")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        channels = config.get("image_shape", (IMAGE_SIZE, IMAGE_SIZE, 3))[-1]
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


def _load_weights(model, path, method):
    try:
        getattr(model, method)(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named.
        raise ValueError(
            f"Could not load weights from {path}: {e}. If you overrode the "
            "architecture, pass load_weights=False."
        ) from e


def load_backbone(preset, load_weights=True, **overrides):
    """A `VisionMoEBackbone` from a preset name or folder; see `from_preset`."""
    folder = resolve_preset(preset)
    backbone_cls, config, _, _ = _load_configs(folder)
    backbone_kw, _ = _split_overrides(overrides, for_classifier=False)
    backbone = backbone_cls.from_config(_apply_backbone_overrides(config, backbone_kw))
    weights = folder / "model.weights.h5"
    if load_weights and weights.is_file():
        _load_weights(backbone, weights, "load_weights")
    return backbone


def load_classifier(preset, load_weights=True, **overrides):
    """A `VisionMoEImageClassifier` from a preset; see `from_preset`."""
    folder = resolve_preset(preset)
    backbone_cls, config, task_cls, task_config = _load_configs(folder)
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
        weights = folder / "model.weights.h5"
        if weights.is_file():
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
        load_weights: bool. Load saved weights when the folder has them
            (built-in architecture presets have none). Defaults to `True`.
        **overrides: Backbone or classifier arguments replacing the
            preset's: `num_classes`, `image_size` (int or (h, w)), `router`
            (its `router_config` then resets to the router's defaults unless
            also given), `num_experts`, `num_layers`, `hidden_dim`, ...

    Returns:
        `VisionMoEImageClassifier`.

    Raises:
        ValueError: unknown preset (close matches listed), unknown override,
            or an unreadable preset file (named).
        FileNotFoundError: a required preset file is missing (named).

    Example:
    >>> model = from_preset("vmoe_softmax_ec_b16_e32_224", num_classes=10,
    ...     image_size=32, num_layers=2, hidden_dim=16, mlp_dim=32,
    ...     num_heads=2, num_experts=4, group_size=1)
    >>> model.backbone.moe_layer_indices
    (1,)
    """
    return load_classifier(name_or_dir, load_weights=load_weights, **overrides)


def list_presets(print_table=False):
    """The built-in presets with their description, size and cost.

    Args:
        print_table: bool. Also print one line per preset. Defaults to
            `False`.

    Returns:
        dict of name -> metadata dict (`description`, `parameter_count`,
        `classifier_parameter_count`, `flops_per_image`, ...).

    Example:
    >>> presets = list_presets()
    >>> presets["vit_dense_b16_224"]["parameter_count"] > 85_000_000
    True
    """
    root = presets_dir()
    result = {
        name: _read_json(root / name, "metadata.json") for name in _builtin_names()
    }
    if print_table:
        for name, meta in result.items():
            print(
                f"{name:40s} {meta['parameter_count'] / 1e6:10.1f}M params "
                f"{meta['flops_per_image'] / 1e9:8.1f} GFLOPs/image"
            )
    return result


# ----------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------
def _serialize(cls, config):
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "config": config,
        "registered_name": keras.saving.get_registered_name(cls),
    }


def preset_files(name, description, backbone_kwargs, classifier_kwargs):
    """The JSON documents of one preset folder, computed without building it.

    Returns:
        dict of file name -> JSON-serialisable object.
    """
    backbone_config = {
        "name": "vision_moe_backbone",
        "trainable": True,
        "dtype": None,
        **cost.resolve_backbone_config(backbone_kwargs),
    }
    for derived in ("patch", "num_patches", "seq_len", "moe_indices", "expert_hidden"):
        backbone_config.pop(derived)
    backbone_config["image_shape"] = list(backbone_config["image_shape"])
    classifier_config = {
        "name": "vision_moe_image_classifier",
        "backbone": _serialize(VisionMoEBackbone, backbone_config),
        "preprocessor": None,
        "activation": None,
        "head_bias_init": None,
        "dropout": 0.0,
        **classifier_kwargs,
    }
    resolved = cost.resolve_backbone_config(backbone_config)
    d, n = resolved["hidden_dim"], classifier_config["num_classes"]
    rep = classifier_config.get("representation_size")
    params = cost.count_backbone_params(backbone_config)
    flops = cost.backbone_flops(backbone_config)
    metadata = {
        "name": name,
        "description": description,
        "parameter_count": params,
        "classifier_parameter_count": params + cost.count_head_params(d, n, rep),
        "flops_per_image": flops,
        "classifier_flops_per_image": flops + cost.head_flops(d, n, rep),
        "flops_convention": "forward pass, 2 x multiply-accumulates of matmuls and convolutions",
        "router": resolved["router"],
        "num_experts": resolved["num_experts"],
        "moe_layers": list(resolved["moe_indices"]),
        "sequence_length": resolved["seq_len"],
        "weights": None,
        "keras_version": keras.version(),
        "tasks": ["ImageClassifier"],
    }
    return {
        "config.json": _serialize(VisionMoEBackbone, backbone_config),
        "task.json": _serialize(VisionMoEImageClassifier, classifier_config),
        "metadata.json": metadata,
    }


def generate_presets(out_dir=None, names=None):
    """Writes the preset folders (config.json, task.json, metadata.json).

    Args:
        out_dir: str or None. Where to write. Defaults to `presets_dir()`.
        names: list of str or None. Only these presets. Defaults to all.

    Returns:
        list of str, the names written.
    """
    out = pathlib.Path(out_dir) if out_dir else presets_dir()
    written = []
    for name, (
        desc,
        backbone_kwargs,
        classifier_kwargs,
    ) in preset_definitions().items():
        if names is not None and name not in names:
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for filename, doc in preset_files(
            name, desc, backbone_kwargs, classifier_kwargs
        ).items():
            with open(folder / filename, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=4)
                f.write("\n")
        written.append(name)
    return written


def register_with_keras_hub():
    """Registers the built-in presets with keras-hub's preset registry.

    Afterwards `VisionMoEBackbone.presets` lists them, and
    `keras_hub.models.Backbone.from_preset(name, load_weights=False)` loads
    them (architecture presets have no weights file).
    """
    from keras_hub.src.utils.preset_utils import register_presets

    root = presets_dir()
    entries = {}
    for name in _builtin_names():
        try:
            meta = _read_json(root / name, "metadata.json")
        except (FileNotFoundError, ValueError):
            continue
        entries[name] = {
            "metadata": {
                "description": meta.get("description", ""),
                "params": meta.get("parameter_count"),
                "path": "keras_vmoe",
            },
            "kaggle_handle": str(root / name),
        }
    register_presets(entries, VisionMoEBackbone)
    return sorted(entries)
