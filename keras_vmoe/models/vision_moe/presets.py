"""Architecture presets: definitions, generation, listing and loading.

A preset is a keras-hub preset folder `presets/<name>/` holding
`config.json` (the serialized `VisionMoEBackbone`), `task.json` (the
serialized `VisionMoEImageClassifier`, its preprocessor included),
`preprocessor.json` and `image_converter.json` (the
`VisionMoEImageClassifierPreprocessor` and its `VisionMoEImageConverter`:
resize to 224x224, scale to [-1, 1]), `metadata.json` (description,
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

import json
import os
import pathlib

import keras

from keras_vmoe.models.preset_loader import builtin_names, presets_dir, read_json
from keras_vmoe.models.vision_moe import cost
from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.config import parse_moe_layers
from keras_vmoe.models.vision_moe.image_classifier import VisionMoEImageClassifier
from keras_vmoe.models.vision_moe.image_classifier_preprocessor import (
    VisionMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vision_moe.image_converter import VisionMoEImageConverter
from keras_vmoe.routers import get_class, router_names
from keras_vmoe.utils.atomic import atomic_directory

# (num_layers, hidden_dim, mlp_dim, num_heads); docs/routers.md, "Reference
# models and presets".
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
        for router in router_names():
            recipe = get_class(router).preset_recipe()
            if recipe is None:
                continue
            short, router_config, group, label = (
                recipe.short_name,
                recipe.router_config,
                recipe.images_per_group,
                recipe.description,
            )
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
    result = {name: read_json(root / name, "metadata.json") for name in builtin_names()}
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


def _without_build_configs(doc):
    """`doc` without `build_config` / `compile_config` entries, as keras-hub saves."""
    if isinstance(doc, dict):
        return {
            k: _without_build_configs(v)
            for k, v in doc.items()
            if k not in ("build_config", "compile_config")
        }
    return doc


def preprocessor_files(image_shape):
    """`preprocessor.json` and `image_converter.json` for images of `image_shape`.

    The documents keras-hub's `save_to_preset` writes for a
    `VisionMoEImageClassifierPreprocessor` whose converter resizes to
    `image_shape[:2]` (only these two small layers are built).

    Args:
        image_shape: tuple. The backbone's `(height, width, channels)`.

    Returns:
        dict of file name -> JSON-serialisable object.
    """
    converter = VisionMoEImageConverter(
        image_size=tuple(image_shape[:2]), dtype="float32"
    )
    preprocessor = VisionMoEImageClassifierPreprocessor(converter, dtype="float32")
    # A round trip through JSON turns tuples into lists, as in the files.
    return {
        filename: json.loads(
            json.dumps(
                _without_build_configs(keras.saving.serialize_keras_object(layer))
            )
        )
        for filename, layer in (
            ("preprocessor.json", preprocessor),
            ("image_converter.json", converter),
        )
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
        **VisionMoEBackbone.arguments_from_config(backbone_kwargs),
    }
    backbone_config["image_shape"] = list(backbone_config["image_shape"])
    # As `get_config()` writes it: resolved, not Keras' global setting.
    if backbone_config["data_format"] is None:
        backbone_config["data_format"] = "channels_last"
    preprocessing = preprocessor_files(backbone_config["image_shape"])
    classifier_config = {
        "name": "vision_moe_image_classifier",
        "backbone": _serialize(VisionMoEBackbone, backbone_config),
        "preprocessor": preprocessing["preprocessor.json"],
        "activation": None,
        "head_bias_init": None,
        "dropout": 0.0,
        "head_dtype": None,
        **classifier_kwargs,
    }
    metadata = preset_metadata(
        backbone_config, classifier_config, name=name, description=description
    )
    return {
        "config.json": _serialize(VisionMoEBackbone, backbone_config),
        "task.json": _serialize(VisionMoEImageClassifier, classifier_config),
        **preprocessing,
        "metadata.json": metadata,
    }


def preset_metadata(
    backbone_config, classifier_config, *, name, description, weights=None, **extra
):
    """The `metadata.json` entries of a V-MoE classifier preset.

    Sizes and cost come from the configs (`cost.py`, nothing is built), the
    MoE blocks and sequence length from the backbone's `VisionMoELayout`.
    `generate_presets` and `keras-vmoe train` both write it.

    Args:
        backbone_config: dict. `VisionMoEBackbone` arguments, e.g. its
            `get_config()`.
        classifier_config: dict. `VisionMoEImageClassifier` arguments, e.g.
            its `get_config()`; `num_classes` and `representation_size` are
            read.
        name: str. The preset's name.
        description: str. One line on what the preset is.
        weights: str or None. `None` for an architecture preset (loads with
            random weights and needs no weights file), e.g. `"trained"`
            otherwise. Defaults to `None`.
        **extra: More entries, e.g. `training={...}`.

    Returns:
        dict, JSON-serialisable.

    Example:
    >>> meta = preset_metadata(
    ...     dict(image_shape=(16, 16, 3), patch_size=4, num_layers=2,
    ...          num_heads=2, hidden_dim=8, mlp_dim=16, router="soft",
    ...          num_experts=4, group_size=1),
    ...     dict(num_classes=3), name="tiny", description="A tiny V-MoE.")
    >>> meta["moe_layers"], meta["sequence_length"], meta["weights"]
    ([1], 17, None)
    """
    cfg = cost.resolve_backbone_config(backbone_config)
    d, n = cfg["hidden_dim"], classifier_config["num_classes"]
    rep = classifier_config.get("representation_size")
    params = cost.count_backbone_params(backbone_config)
    flops = cost.backbone_flops(backbone_config)
    return {
        "name": name,
        "description": description,
        "parameter_count": params,
        "classifier_parameter_count": params + cost.count_head_params(d, n, rep),
        "flops_per_image": flops,
        "classifier_flops_per_image": flops + cost.head_flops(d, n, rep),
        "flops_convention": "forward pass, 2 x multiply-accumulates of matmuls and convolutions",
        "router": cfg["router"],
        "num_experts": cfg["num_experts"],
        "moe_layers": list(cfg["moe_layer_indices"]),
        "sequence_length": cfg["sequence_length"],
        "weights": weights,
        "keras_version": keras.version(),
        "tasks": ["ImageClassifier"],
        **extra,
    }


def add_preset_metadata(preset_dir, model, **entries):
    """Merges `preset_metadata` of a saved classifier into its metadata.json.

    Keeps what `save_to_preset` wrote (e.g. keras-hub's version) and adds or
    replaces the V-MoE entries: sizes, cost, layout and `entries`.

    Args:
        preset_dir: str. A folder `model.save_to_preset` wrote.
        model: `VisionMoEImageClassifier`. The saved classifier.
        **entries: `preset_metadata` arguments (`name`, `description`,
            `weights`, and extra entries such as `training={...}`).
    """
    path = os.path.join(preset_dir, "metadata.json")
    meta = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    meta.update(
        preset_metadata(model.backbone.get_config(), model.get_config(), **entries)
    )
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=4)
        f.write("\n")


def generate_presets(out_dir=None, names=None):
    """Writes the preset folders (`preset_files`: config.json, task.json,
    preprocessor.json, image_converter.json, metadata.json).

    Each folder is written atomically: into a temporary sibling that then
    replaces it (other files are carried over).

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
        docs = preset_files(name, desc, backbone_kwargs, classifier_kwargs)
        # Other files in the folder (e.g. weights) are kept; an interrupted
        # run leaves the folder as it was.
        with atomic_directory(out / name, keep_existing=True) as folder:
            for filename, doc in docs.items():
                with open(os.path.join(folder, filename), "w", encoding="utf-8") as f:
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
    for name in builtin_names():
        try:
            meta = read_json(root / name, "metadata.json")
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
