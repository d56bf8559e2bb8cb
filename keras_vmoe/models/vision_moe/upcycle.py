"""`upcycle`: a trained dense ViT becomes a V-MoE that starts where it was.

Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints", https://arxiv.org/abs/2212.05055)
turns a dense checkpoint into a Mixture of Experts and keeps training it:
every weight of the dense model is copied, each expert of an MoE block starts
as that block's dense MLP, and only the routers are new.

Sources: a keras-hub `ViTBackbone` or `ViTImageClassifier`, a dense
`VisionMoEBackbone` or `VisionMoEImageClassifier` (`router=None`), or a
preset of either (a folder, one of ours by name, or a keras-hub preset
name, which keras-hub downloads). The weights are gathered from the source
under the variable paths of our dense backbone (`patch_embedding/conv/kernel`,
`encoder_block_{i}/attention/query/kernel`, `encoder_block_{i}/mlp/dense_1/...`,
as `keras_vmoe.convert` maps vmoe checkpoints), then written into the new
V-MoE: MLP weights of the MoE blocks become the stacked expert weights
`(E, ...)`, everything else is copied to the same path.
"""

import os

import numpy as np

from keras_vmoe.models import preset_loader
from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.image_classifier import VisionMoEImageClassifier
from keras_vmoe.models.vision_moe.image_classifier_preprocessor import (
    VisionMoEImageClassifierPreprocessor,
)

# Dense MLP weight -> the stacked expert weight it initialises.
_MLP_TO_EXPERTS = {
    "mlp/dense_1/kernel": "moe/experts/intermediate_kernel",
    "mlp/dense_1/bias": "moe/experts/intermediate_bias",
    "mlp/dense_2/kernel": "moe/experts/output_kernel",
    "mlp/dense_2/bias": "moe/experts/output_bias",
}
# keras-hub ViT sublayer -> ours, inside one encoder block.
_HUB_BLOCK_LAYERS = {
    "ln_1": "ln_1",
    "ln_2": "ln_2",
    "mha": "attention",
    "mlp": "mlp",
}
# Arguments of our backbone that a V-MoE needs and a dense config leaves out
# or sets otherwise.
_MOE_ARGUMENTS = (
    "moe_layers",
    "router",
    "router_config",
    "num_experts",
    "identical_expert_init",
)


def upcycle(
    dense,
    router,
    num_experts,
    moe_layers="every:2",
    router_config=None,
    group_size=None,
    expert_noise=0.0,
    router_init_stddev=0.02,
    seed=None,
):
    """A V-MoE initialised from a trained dense ViT (sparse upcycling).

    Follows Komatsuzaki et al. 2023 ("Sparse Upcycling",
    https://arxiv.org/abs/2212.05055): the patch embedding, class token,
    position embedding, attention, layer norms, the dense MLPs of the blocks
    that stay dense, the final norm and the classification head are copied
    exactly; in the blocks listed by `moe_layers`, every expert starts as
    that block's dense MLP (optionally perturbed by `expert_noise`). The
    routers are the only new weights. The paper initialises them randomly;
    here every router weight with two or more axes (the gating kernel of
    the Token and Expert Choice routers, the slot embeddings of Soft MoE) is
    drawn from a zero-mean normal of small standard deviation
    `router_init_stddev`, so that the first routing decisions are close to
    uniform, and the others (Soft MoE's `scale`) keep their initialiser.
    Any registered router can be chosen.

    With one expert and a capacity that keeps every token (Token Choice
    with `num_selected_experts=1` and `capacity_factor>=1`, or an Expert
    Choice router at `capacity_factor>=1`), the upcycled model computes
    the dense model's function. With `E > 1` experts the MLP output of an
    MoE block is the experts' output times the router's combine weights, so
    the upcycled model starts close to, not at, the dense one, as in the
    paper.

    Options of a keras-hub ViT that our backbone lacks are mapped:
    `use_mha_bias=False`, `use_mlp_bias=False` and `use_patch_bias=False`
    become zero biases (exactly the same function; the biases then train),
    `use_class_token`, `layer_norm_epsilon`, `image_shape`, `patch_size`,
    the dropout rates and the dtype carry over. `data_format=
    "channels_first"` and, for a `ViTImageClassifier`, a `pooling` or
    `activation` our classifier cannot express raise a `ValueError` naming
    the option. A dense classifier's preprocessor carries over as a
    `VisionMoEImageClassifierPreprocessor` with the same pixel scale and
    offset, resize interpolation and cropping (a keras-hub ViT's scaling
    included), so `predict` on raw images keeps working.

    Args:
        dense: the dense model: a keras-hub `ViTBackbone` or
            `ViTImageClassifier`, a `VisionMoEBackbone` or
            `VisionMoEImageClassifier` without MoE blocks, or a preset of
            one (a folder, a built-in name of ours, or a keras-hub preset
            name, downloaded by keras-hub).
        router: str. A router name (`keras_vmoe.routers.ROUTER_NAMES`).
        num_experts: int. Experts per MoE block `E`.
        moe_layers: list of int or str. The blocks that become MoE (see
            `parse_moe_layers`). Defaults to `"every:2"`.
        router_config: dict or None. Router arguments, e.g.
            `{"num_selected_experts": 1, "capacity_factor": 1.0}`. Defaults
            to `None` (the router's defaults).
        group_size: int or None. Images per routing group. Defaults to
            `None`: the dense backbone's own (ours), else 8.
        expert_noise: float. Each expert kernel gets independent Gaussian
            noise of standard deviation `expert_noise` times the standard
            deviation of the dense kernel (biases are copied unchanged), so
            that experts differ from the start. Defaults to `0.0` (exact
            copies).
        router_init_stddev: float. Standard deviation of the router weights
            with two or more axes. Defaults to `0.02`.
        seed: int or None. Seed of the router weights and of the expert
            noise. Defaults to `None`.

    Returns:
        A `VisionMoEBackbone`, or a `VisionMoEImageClassifier` with the
        dense classifier's head when `dense` is (or holds) a classifier.

    Raises:
        ValueError: `dense` is not a dense ViT, an option of it cannot be
            expressed (the message names it), or a V-MoE argument is invalid.

    Example:
    >>> import numpy as np
    >>> dense = VisionMoEBackbone(image_shape=(16, 16, 3), patch_size=4,
    ...     num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16)
    >>> moe = upcycle(dense, router="softmax_expert_choice", num_experts=4,
    ...     moe_layers=[1], group_size=1, seed=0)
    >>> moe.moe_layer_indices
    (1,)
    >>> experts = moe.get_layer("encoder_block_1").mlp.experts
    >>> dense_kernel = dense.get_layer("encoder_block_1").mlp.dense_1.kernel
    >>> all(np.array_equal(np.asarray(k), np.asarray(dense_kernel))
    ...     for k in np.asarray(experts.intermediate_kernel))
    True
    """
    if not isinstance(expert_noise, (int, float)) or not expert_noise >= 0:
        raise ValueError(f"`expert_noise` must be a float >= 0, got {expert_noise!r}.")
    if not isinstance(router_init_stddev, (int, float)) or not router_init_stddev > 0:
        raise ValueError(
            f"`router_init_stddev` must be a float > 0, got {router_init_stddev!r}."
        )
    if router is None:
        raise ValueError(
            "`router` must be a router name (keras_vmoe.routers.ROUTER_NAMES); "
            "upcycling makes MoE blocks."
        )
    source = dense_source(load_dense(dense))
    config = dict(source["config"])
    config.update(
        moe_layers=moe_layers,
        router=router,
        router_config=None if router_config is None else dict(router_config),
        num_experts=num_experts,
        group_size=int(group_size or config.get("group_size") or 8),
        identical_expert_init=True,
    )
    backbone = VisionMoEBackbone(**config)
    if not backbone.moe_layer_indices:
        raise ValueError(
            f"`moe_layers={moe_layers!r}` selects no block of the "
            f"{backbone.num_layers}; upcycling needs at least one MoE block."
        )
    rng = np.random.default_rng(seed)
    _write_backbone(backbone, source["weights"], expert_noise, router_init_stddev, rng)
    if source["head"] is None:
        return backbone
    head = source["head"]
    model = VisionMoEImageClassifier(
        backbone,
        preprocessor=preprocessor_like(source["preprocessor"], backbone),
        **head["config"],
    )
    for layer_name, values in head["weights"].items():
        model.get_layer(layer_name).set_weights(values)
    return model


# keras-hub `ImageConverter` arguments that say how pixels are prepared.
_CONVERTER_ARGUMENTS = (
    "scale",
    "offset",
    "crop_to_aspect_ratio",
    "pad_to_aspect_ratio",
    "interpolation",
    "antialias",
)


def preprocessor_like(preprocessor, backbone):
    """Our classifier preprocessor that prepares pixels as `preprocessor` does.

    Args:
        preprocessor: a keras-hub `ImageClassifierPreprocessor` (ours or a
            keras-hub ViT's), or None.
        backbone: `VisionMoEBackbone`. Its image size is the output size.

    Returns:
        `VisionMoEImageClassifierPreprocessor`, or None when `preprocessor`
        is None or has no image converter.

    Example (a keras-hub ViT converter scales by 1/255 and no offset):
    >>> from keras_hub.layers import ImageConverter
    >>> from keras_hub.models import ImageClassifierPreprocessor
    >>> hub = ImageClassifierPreprocessor(
    ...     image_converter=ImageConverter(image_size=(32, 32), scale=1 / 255))
    >>> backbone = VisionMoEBackbone(image_shape=(16, 16, 3), patch_size=4,
    ...     num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    >>> ours = preprocessor_like(hub, backbone).image_converter
    >>> ours.image_size, round(ours.scale, 6), ours.offset
    ((16, 16), 0.003922, None)
    """
    converter = getattr(preprocessor, "image_converter", None)
    if converter is None:
        return None
    config = converter.get_config()
    arguments = {k: config[k] for k in _CONVERTER_ARGUMENTS if k in config}
    return VisionMoEImageClassifierPreprocessor.for_backbone(backbone, **arguments)


def load_dense(dense):
    """The dense model `dense` names: itself, or the preset it names.

    A folder or a built-in name of ours loads with `preset_loader` (the
    classifier when the folder has a `task.json`, else the backbone); any
    other name is a keras-hub preset (`ImageClassifier`, else `Backbone`).
    """
    if not isinstance(dense, (str, os.PathLike)):
        return dense
    try:
        folder = preset_loader.resolve_preset(dense)
    except ValueError:
        folder = None
    if folder is not None:
        if (folder / "task.json").is_file():
            return preset_loader.load_classifier(folder)
        return preset_loader.load_backbone(folder)
    import keras_hub

    try:
        return keras_hub.models.ImageClassifier.from_preset(str(dense))
    except ValueError:
        return keras_hub.models.Backbone.from_preset(str(dense))


def dense_source(model):
    """What `upcycle` copies from a dense model, in our backbone's terms.

    Args:
        model: a keras-hub `ViTBackbone` / `ViTImageClassifier`, or a dense
            `VisionMoEBackbone` / `VisionMoEImageClassifier`.

    Returns:
        dict with `"config"` (`VisionMoEBackbone` arguments of the dense
        model), `"weights"` (`{path in our dense backbone: numpy array}`)
        `"head"` (None, or `{"config": classifier arguments,
        "weights": {layer name: list of arrays}}`) and `"preprocessor"`
        (the classifier's, or None).

    Raises:
        ValueError: not a supported dense model, or an option of it that
            cannot be expressed (named).
    """
    from keras_hub.models import ViTBackbone, ViTImageClassifier

    if isinstance(model, VisionMoEImageClassifier):
        source = _ours_source(model.backbone)
        source["head"] = _ours_head(model)
        source["preprocessor"] = model.preprocessor
        return source
    if isinstance(model, VisionMoEBackbone):
        return _ours_source(model)
    if isinstance(model, ViTImageClassifier):
        source = _hub_source(model.backbone)
        head_config, pooling = _hub_head(model, source["config"]["use_class_token"])
        source["config"]["pooling"] = pooling
        source["head"] = head_config
        source["preprocessor"] = model.preprocessor
        return source
    if isinstance(model, ViTBackbone):
        return _hub_source(model)
    raise ValueError(
        "`dense` must be a keras-hub ViTBackbone or ViTImageClassifier, a "
        "dense VisionMoEBackbone or VisionMoEImageClassifier, or a preset of "
        f"one; got {type(model).__name__}."
    )


def _values(weights, prefix=""):
    """`{path without prefix: numpy array}` of Keras variables."""
    return {v.path[len(prefix) :]: np.asarray(v.numpy()) for v in weights}


def _ours_source(backbone):
    if backbone.router is not None and backbone.moe_layer_indices:
        raise ValueError(
            f"`dense` is already a V-MoE (router {backbone.router!r}, MoE "
            f"blocks {list(backbone.moe_layer_indices)}); upcycle a dense "
            "model (`router=None`)."
        )
    config = backbone.get_config()
    for name in ("name", "trainable"):
        config.pop(name, None)
    for name in _MOE_ARGUMENTS:
        config.pop(name, None)
    config["expert_hidden_dim"] = None
    return {
        "config": config,
        "weights": _values(backbone.weights),
        "head": None,
        "preprocessor": None,
    }


def _ours_head(model):
    config = model.get_config()
    head_config = {
        name: config[name]
        for name in (
            "num_classes",
            "representation_size",
            "activation",
            "loss_type",
            "head_bias_init",
            "dropout",
            "head_dtype",
        )
    }
    weights = {
        name: model.get_layer(name).get_weights() for name in ("pre_logits", "head")
    }
    return {"config": head_config, "weights": weights}


def _hub_source(backbone):
    if backbone.data_format != "channels_last":
        raise ValueError(
            f"keras-hub ViTBackbone option `data_format={backbone.data_format!r}` "
            "cannot be upcycled: VisionMoEBackbone takes channels_last images. "
            "Rebuild the ViT with data_format='channels_last' (the weights are "
            "the same) and upcycle that."
        )
    image_shape = tuple(int(s) for s in backbone.image_shape)
    config = dict(
        image_shape=image_shape,
        patch_size=tuple(int(p) for p in backbone.patch_size),
        num_layers=int(backbone.num_layers),
        num_heads=int(backbone.num_heads),
        hidden_dim=int(backbone.hidden_dim),
        mlp_dim=int(backbone.mlp_dim),
        use_class_token=bool(backbone.use_class_token),
        pooling="token" if backbone.use_class_token else "gap",
        dropout_rate=float(backbone.dropout_rate),
        attention_dropout=float(backbone.attention_dropout),
        layer_norm_epsilon=float(backbone.layer_norm_epsilon),
        mlp_activation="gelu",  # keras-hub's MLP: Keras' exact GELU.
        dtype=backbone.dtype_policy.name,
    )
    hub = _values(backbone.weights)
    d = config["hidden_dim"]
    weights = {}
    embed = "vit_patching_and_embedding/"
    weights["patch_embedding/conv/kernel"] = hub[embed + "patch_embedding/kernel"]
    weights["patch_embedding/conv/bias"] = hub.get(
        embed + "patch_embedding/bias", np.zeros((d,), "float32")
    )
    if config["use_class_token"]:
        weights["class_token/token"] = hub[embed + "class_token"]
    positions = hub[embed + "position_embedding/embeddings"]  # (T, d)
    weights["position_embedding/embeddings"] = positions[None]  # (1, T, d)
    for i in range(config["num_layers"]):
        hub_block = f"vit_encoder/transformer_block_{i + 1}/"
        for path, value in hub.items():
            if not path.startswith(hub_block):
                continue
            layer, _, rest = path[len(hub_block) :].partition("/")
            weights[f"encoder_block_{i}/{_HUB_BLOCK_LAYERS[layer]}/{rest}"] = value
        _zero_missing_biases(weights, f"encoder_block_{i}/")
    weights["encoder_norm/gamma"] = hub["vit_encoder/ln/gamma"]
    weights["encoder_norm/beta"] = hub["vit_encoder/ln/beta"]
    return {"config": config, "weights": weights, "head": None, "preprocessor": None}


def _zero_missing_biases(weights, block):
    """Zero biases where a keras-hub ViT has none (`use_*_bias=False`).

    Biases of zero compute what the bias-free layer computes: an attention
    projection's kernel `(d, heads, head_dim)` gets a bias `(heads,
    head_dim)`, its output kernel `(heads, head_dim, d)` a bias `(d,)`, a
    Dense kernel `(m, n)` a bias `(n,)`.
    """
    for kind in ("attention/query", "attention/key", "attention/value"):
        kernel = weights[f"{block}{kind}/kernel"]
        weights.setdefault(f"{block}{kind}/bias", np.zeros(kernel.shape[1:], "float32"))
    output = weights[f"{block}attention/attention_output/kernel"]
    weights.setdefault(
        f"{block}attention/attention_output/bias",
        np.zeros(output.shape[-1:], "float32"),
    )
    for dense in ("mlp/dense_1", "mlp/dense_2"):
        kernel = weights[f"{block}{dense}/kernel"]
        weights.setdefault(
            f"{block}{dense}/bias", np.zeros(kernel.shape[-1:], "float32")
        )


def _hub_head(model, use_class_token):
    """(our classifier's head, our pooling) of a keras-hub ViTImageClassifier."""
    pooling = model.pooling
    if pooling == "token" and not use_class_token:
        raise ValueError(
            "keras-hub ViTImageClassifier option `pooling='token'` without a "
            "class token (it pools the first patch token) cannot be upcycled: "
            "VisionMoEImageClassifier pools a class token or averages patches."
        )
    if pooling == "gap" and use_class_token:
        raise ValueError(
            "keras-hub ViTImageClassifier option `pooling='gap'` with a class "
            "token (it averages the class token with the patches) cannot be "
            "upcycled: VisionMoEImageClassifier's 'gap' averages the patch "
            "tokens only."
        )
    if pooling not in ("token", "gap"):
        raise ValueError(
            f"keras-hub ViTImageClassifier option `pooling={pooling!r}` cannot "
            "be upcycled: VisionMoEImageClassifier pools with 'token' or 'gap'."
        )
    activation = model.activation
    if activation not in (None, "softmax", "sigmoid"):
        raise ValueError(
            f"keras-hub ViTImageClassifier option `activation={activation!r}` "
            "cannot be upcycled: VisionMoEImageClassifier's head outputs "
            "logits, 'softmax' or 'sigmoid'."
        )
    config = dict(
        num_classes=int(model.num_classes),
        representation_size=model.intermediate_dim,
        activation=activation,
        dropout=float(model.dropout),
        head_bias_init=None,
        head_dtype=model.output_dense.dtype_policy.name,
    )
    weights = {"head": model.output_dense.get_weights()}
    if model.intermediate_dim is not None:
        weights["pre_logits"] = model.intermediate_layer.get_weights()
    return {"config": config, "weights": weights}, pooling


def _write_backbone(backbone, weights, expert_noise, router_init_stddev, rng):
    """Assigns every weight of the new V-MoE `backbone` from `weights`."""
    used = set()
    moe_blocks = {f"encoder_block_{i}/" for i in backbone.moe_layer_indices}
    expert_sources = {}
    for block in moe_blocks:
        for mlp_path, experts_path in _MLP_TO_EXPERTS.items():
            expert_sources[block + experts_path] = block + mlp_path
    for variable in backbone.weights:
        path = variable.path
        if path in weights:
            value = weights[path]
            used.add(path)
        elif path in expert_sources:
            dense_path = expert_sources[path]
            used.add(dense_path)
            value = _expert_stack(
                weights[dense_path], variable.shape[0], expert_noise, path, rng
            )
        elif "/moe/router/" in path:
            if len(variable.shape) < 2:
                continue  # e.g. Soft MoE's scale: its own initialiser.
            value = rng.normal(0.0, router_init_stddev, variable.shape)
        elif not variable.trainable and "/moe/" in path:
            continue  # routing statistics
        else:
            raise ValueError(f"The dense model has no weight for {path!r}.")
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{path}: the dense weight has shape {tuple(value.shape)}, the "
                f"V-MoE expects {tuple(variable.shape)}."
            )
        variable.assign(value.astype(variable.dtype))
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"Dense weights that the V-MoE has no place for: {unused}.")


def _expert_stack(dense_value, num_experts, expert_noise, path, rng):
    """`num_experts` copies of a dense MLP weight, `(E, ...)`, plus noise.

    Kernels get `expert_noise * std(kernel) * N(0, 1)`, drawn independently
    for each expert; biases are copied exactly.
    """
    stacked = np.repeat(dense_value[None], num_experts, axis=0)  # (E, ...)
    if expert_noise and path.endswith("_kernel"):
        scale = expert_noise * float(np.std(dense_value))
        stacked = stacked + rng.normal(0.0, scale, stacked.shape)
    return stacked
