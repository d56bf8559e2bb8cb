"""Parameter counts and FLOPs of V-MoE models, computed from their configs.

Nothing is allocated, so the numbers are cheap even for H/14 with 32
experts (billions of parameters). Tests check the counts against
`model.count_params()` of built models.

FLOPs convention: forward pass of one image, `2 x` the multiply-accumulates
of the matrix products and convolutions (patch embedding, attention
projections, attention scores and mixing, MLPs, routers, experts, head).
Element-wise work (norms, softmax, GELU, Sinkhorn/OT iterations) is left
out. Experts are charged for every slot they process, filled or not
(`E * C` slots per group, at the training capacity factor), since a batched
expert computation pays for empty slots too.
"""

import inspect

from keras_vmoe.models.vision_moe.config import parse_moe_layers
from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone


def _defaults(cls):
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def resolve_backbone_config(config):
    """The backbone config with every default filled in, plus derived sizes.

    Args:
        config: dict. `VisionMoEBackbone` constructor arguments.

    Returns:
        dict with the constructor arguments and `patch` (h, w),
        `num_patches`, `seq_len`, `moe_indices`, `expert_hidden` keys.
    """
    cfg = {**_defaults(VisionMoEBackbone), **config}
    patch = cfg["patch_size"]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    h, w, _ = cfg["image_shape"]
    num_patches = (h // patch[0]) * (w // patch[1])
    seq_len = num_patches + int(bool(cfg["use_class_token"]))
    if cfg["router"] is None:
        moe_indices = ()
    else:
        spec = "every:2" if cfg["moe_layers"] is None else cfg["moe_layers"]
        moe_indices = parse_moe_layers(spec, cfg["num_layers"])
    cfg.update(
        patch=patch,
        num_patches=num_patches,
        seq_len=seq_len,
        moe_indices=moe_indices,
        expert_hidden=cfg["expert_hidden_dim"] or cfg["mlp_dim"],
    )
    return cfg


def make_router(cfg):
    """An unbuilt router layer for a resolved backbone config (no weights)."""
    from keras_vmoe.routers.registry import get_class

    kwargs = dict(cfg["router_config"] or {})
    kwargs["num_experts"] = cfg["num_experts"]
    return get_class(cfg["router"])(**kwargs)


def _router_params(cfg):
    """Router weights of one MoE layer.

    Known routers are counted by formula: dense gating `d x E`; Soft MoE
    slot embeddings `d x E x P` plus a scale. Any other router is built
    alone on `(1, S, d)` and counted (router weights are small).
    """
    from keras_vmoe.routers.base import DenseGatingRouter
    from keras_vmoe.routers.soft import SoftRouter

    router = make_router(cfg)
    group_tokens = cfg["group_size"] * cfg["seq_len"]
    d, e = cfg["hidden_dim"], cfg["num_experts"]
    if type(router).build is DenseGatingRouter.build:
        return d * e
    if type(router).build is SoftRouter.build:
        return d * e * router.slots_for(group_tokens) + 1
    router.build((1, group_tokens, d))
    return router.count_params()


def _moe_statistics_count():
    from keras_vmoe.layers.moe import STATISTICS

    return len(STATISTICS)


def expert_slots_per_group(cfg):
    """`E * C`: expert slots processed per group of `group_size` images."""
    router = make_router(cfg)
    group_tokens = cfg["group_size"] * cfg["seq_len"]
    if hasattr(router, "slots_for"):  # Soft MoE: P slots per expert.
        return cfg["num_experts"] * router.slots_for(group_tokens)
    k = 1
    if getattr(router, "counts_selected_experts", False):
        k = router.num_selected_experts
    return cfg["num_experts"] * router.group_capacity(group_tokens, True, k)


def count_backbone_params(config):
    """Number of weights of `VisionMoEBackbone(**config)`, without building it.

    Counts what `count_params()` counts, including each MoE layer's
    non-trainable routing-statistics scalars.

    Args:
        config: dict. Backbone constructor arguments.

    Returns:
        int.

    Example:
    >>> count_backbone_params(dict(image_shape=(16, 16, 3), patch_size=4,
    ...     num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16))
    1152
    """
    cfg = resolve_backbone_config(config)
    d, h, c = cfg["hidden_dim"], cfg["mlp_dim"], cfg["image_shape"][2]
    total = cfg["patch"][0] * cfg["patch"][1] * c * d + d  # patch conv
    total += d * int(bool(cfg["use_class_token"]))  # class token
    total += cfg["seq_len"] * d  # position embedding
    block = 2 * 2 * d + 4 * d * d + 4 * d  # two LayerNorms + attention
    num_moe = len(cfg["moe_indices"])
    total += cfg["num_layers"] * block
    total += (cfg["num_layers"] - num_moe) * (d * h + h + h * d + d)  # dense MLPs
    if num_moe:
        eh = cfg["expert_hidden"]
        experts = cfg["num_experts"] * (d * eh + eh + eh * d + d)
        total += num_moe * (experts + _router_params(cfg) + _moe_statistics_count())
    return total + 2 * d  # final LayerNorm


def count_head_params(hidden_dim, num_classes, representation_size=None):
    """Weights of the classifier head (pre-logits Dense and output Dense)."""
    total, features = 0, hidden_dim
    if representation_size is not None:
        total += hidden_dim * representation_size + representation_size
        features = representation_size
    return total + features * num_classes + num_classes


def backbone_flops(config):
    """Forward FLOPs per image of `VisionMoEBackbone(**config)`.

    Args:
        config: dict. Backbone constructor arguments.

    Returns:
        int. `2 x` multiply-accumulates (see the module docstring).
    """
    cfg = resolve_backbone_config(config)
    d, h, t = cfg["hidden_dim"], cfg["mlp_dim"], cfg["seq_len"]
    macs = (
        cfg["num_patches"]
        * cfg["patch"][0]
        * cfg["patch"][1]
        * cfg["image_shape"][2]
        * d
    )
    num_moe = len(cfg["moe_indices"])
    macs += cfg["num_layers"] * (4 * t * d * d + 2 * t * t * d)  # attention
    macs += (cfg["num_layers"] - num_moe) * 2 * t * d * h  # dense MLPs
    if num_moe:
        g, e, eh = cfg["group_size"], cfg["num_experts"], cfg["expert_hidden"]
        slots = expert_slots_per_group(cfg)
        group_macs = slots * 2 * d * eh  # experts
        if cfg["router"] == "soft":  # logits, dispatch and combine einsums
            group_macs += 3 * g * t * d * slots
        else:  # gating logits
            group_macs += g * t * d * e
        macs += num_moe * group_macs / g
    return int(round(2 * macs))


def head_flops(hidden_dim, num_classes, representation_size=None):
    """Forward FLOPs per image of the classifier head."""
    if representation_size is None:
        return 2 * hidden_dim * num_classes
    return 2 * (hidden_dim * representation_size + representation_size * num_classes)
