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

from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone


def resolve_backbone_config(config):
    """Every backbone argument, resolved, with the derived layout.

    Args:
        config: dict. `VisionMoEBackbone` constructor arguments (missing ones
            take their defaults), e.g. a `get_config()`.

    Returns:
        dict. The constructor arguments, then the `VisionMoELayout` fields
        (`patch_size` as (h, w), `patch_grid`, `num_patches`,
        `sequence_length`, `moe_layer_indices`, `tokens_per_group`,
        `expert_hidden_dim` resolved), which replace the arguments of the
        same names.

    Raises:
        ValueError: an argument is invalid (as `VisionMoEBackbone` raises).
    """
    cfg = VisionMoEBackbone.arguments_from_config(config)
    cfg.update(VisionMoEBackbone.layout_from_config(cfg)._asdict())
    return cfg


def make_router(cfg):
    """An unbuilt router layer for a resolved backbone config (no weights)."""
    from keras_vmoe.routers.registry import get_class

    kwargs = dict(cfg["router_config"] or {})
    kwargs["num_experts"] = cfg["num_experts"]
    return get_class(cfg["router"])(**kwargs)


def _router_params(cfg):
    """Router weights of one MoE layer (the router's `weight_count`)."""
    return make_router(cfg).weight_count(cfg["hidden_dim"], cfg["tokens_per_group"])


def _moe_statistics_count():
    from keras_vmoe.layers.moe import STATISTICS

    return len(STATISTICS)


def expert_slots_per_group(cfg):
    """`E * C`: expert slots processed per group, at the training capacity."""
    return make_router(cfg).expert_slots(cfg["tokens_per_group"], training=True)


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
    total = cfg["patch_size"][0] * cfg["patch_size"][1] * c * d + d  # patch conv
    total += d * int(bool(cfg["use_class_token"]))  # class token
    total += cfg["sequence_length"] * d  # position embedding
    block = 2 * 2 * d + 4 * d * d + 4 * d  # two LayerNorms + attention
    if cfg["attention_qk_norm"]:
        block += 2 * (d // cfg["num_heads"])  # query and key norm scales
    num_moe = len(cfg["moe_layer_indices"])
    total += cfg["num_layers"] * block
    total += (cfg["num_layers"] - num_moe) * (d * h + h + h * d + d)  # dense MLPs
    if num_moe:
        eh = cfg["expert_hidden_dim"]
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
    d, h, t = cfg["hidden_dim"], cfg["mlp_dim"], cfg["sequence_length"]
    macs = (
        cfg["num_patches"]
        * cfg["patch_size"][0]
        * cfg["patch_size"][1]
        * cfg["image_shape"][2]
        * d
    )
    num_moe = len(cfg["moe_layer_indices"])
    macs += cfg["num_layers"] * (4 * t * d * d + 2 * t * t * d)  # attention
    macs += (cfg["num_layers"] - num_moe) * 2 * t * d * h  # dense MLPs
    if num_moe:
        s, eh = cfg["tokens_per_group"], cfg["expert_hidden_dim"]
        slots = expert_slots_per_group(cfg)
        group_macs = slots * 2 * d * eh  # experts
        group_macs += make_router(cfg).routing_macs(s, d)
        macs += num_moe * group_macs / (s / t)  # a group holds s / t images
    return int(round(2 * macs))


def head_flops(hidden_dim, num_classes, representation_size=None):
    """Forward FLOPs per image of the classifier head."""
    if representation_size is None:
        return 2 * hidden_dim * num_classes
    return 2 * (hidden_dim * representation_size + representation_size * num_classes)
