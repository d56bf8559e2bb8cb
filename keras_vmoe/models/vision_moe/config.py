"""`VisionMoEBackbone`'s arguments: checks, MoE placement, derived layout.

`check_backbone_arguments` validates every constructor argument of
`VisionMoEBackbone` (with messages that name the argument) and derives the
`VisionMoELayout`: image and patch shapes, the patch grid, the token
sequence length, the MoE block indices (`parse_moe_layers`), the tokens per
routing group and the experts' hidden size. It is the only place these are
worked out. `apply_preset_overrides` applies `from_preset(...)` overrides to
a saved config.
"""

import collections
import difflib
import math

from keras_vmoe.models.vision_moe import vit_layers
from keras_vmoe.utils.checks import (
    check_positive_float,
    check_positive_int,
    check_rate,
)

_PLACEMENT_HELP = (
    "Give a list of block indices (0-based), or one of: 'every:n' (blocks "
    "n-1, 2n-1, ...), 'last_odd:n' (V-MoE 'Last n': the last n odd blocks), "
    "'last:n' (Soft MoE: the last n contiguous blocks), 'all', 'none'."
)


def parse_moe_layers(spec, num_layers):
    """Resolves an MoE placement spec to a sorted tuple of block indices.

    Blocks are numbered from 0. The two "last n" conventions of the
    literature differ, so they have different names here:

    - `"every:n"`: blocks `n-1, 2n-1, 3n-1, ...` (V-MoE "Every n").
    - `"last_odd:n"`: the last `n` odd-numbered blocks (V-MoE "Last n"; with
      8 blocks, `"last_odd:2"` is `(5, 7)`).
    - `"last:n"`: the last `n` contiguous blocks (Soft MoE; with 12 blocks,
      `"last:6"` is `(6, ..., 11)`).
    - `"all"`, `"none"` (or `None`, `[]`): every block, no block.

    As in the reference configs, "last" asks that exceed the available
    blocks give all of them (`"last_odd:2"` on 2 blocks is `(1,)`).
    - a list of ints: those blocks (negative indices count from the end).

    Args:
        spec: str, list of int or None. The placement.
        num_layers: int. Number of encoder blocks.

    Returns:
        tuple of int, sorted and unique.

    Example:
    >>> parse_moe_layers("every:2", 12)
    (1, 3, 5, 7, 9, 11)
    >>> parse_moe_layers("last_odd:2", 8)
    (5, 7)
    >>> parse_moe_layers("last:2", 8)
    (6, 7)
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none"):
            return ()
        if text == "all":
            return tuple(range(num_layers))
        kind, sep, arg = text.partition(":")
        if not sep or kind not in ("every", "last_odd", "last"):
            raise ValueError(f"Unknown MoE placement {spec!r}. {_PLACEMENT_HELP}")
        try:
            n = int(arg)
        except ValueError:
            raise ValueError(
                f"MoE placement {spec!r}: {arg!r} is not an integer. {_PLACEMENT_HELP}"
            ) from None
        if kind == "every":
            if n < 1:
                raise ValueError(f"MoE placement {spec!r}: n must be >= 1.")
            return tuple(range(n - 1, num_layers, n))
        if n < 0:
            raise ValueError(f"MoE placement {spec!r}: n must be >= 0.")
        # Like the reference (`range(...)[-n:]`), asking for more blocks than
        # exist gives all of them; this keeps presets valid at tiny depths.
        pool = range(num_layers) if kind == "last" else range(1, num_layers, 2)
        return tuple(pool[max(len(pool) - n, 0) :])
    try:
        indices = [int(i) for i in spec]
    except (TypeError, ValueError):
        raise ValueError(f"Invalid MoE placement {spec!r}. {_PLACEMENT_HELP}") from None
    resolved = set()
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise ValueError(
                f"MoE block index {i} is out of range for {num_layers} blocks."
            )
        resolved.add(i % num_layers)
    return tuple(sorted(resolved))


VisionMoELayout = collections.namedtuple(
    "VisionMoELayout",
    [
        "image_shape",
        "patch_size",
        "patch_grid",
        "num_patches",
        "sequence_length",
        "moe_layer_indices",
        "tokens_per_group",
        "expert_hidden_dim",
    ],
)
VisionMoELayout.__doc__ = """The sizes a `VisionMoEBackbone` derives from its arguments.

The one place they are worked out (`check_backbone_arguments`): the
backbone's graph, the cost model (`cost.py`), the presets and the training
metadata all read them from here. `VisionMoEBackbone.layout_from_config`
gives the layout of a config without building the model; a built backbone
holds it as `backbone.layout`.

Fields:
    image_shape: tuple of 3 ints. `(height, width, channels)`, whatever the
        backbone's `data_format` (its `image_shape` argument is in that
        format's order).
    patch_size: (int, int). Patch height and width.
    patch_grid: (int, int). Patches per column and per row.
    num_patches: int. Patches per image.
    sequence_length: int. Tokens per image (patches, plus the class token).
    moe_layer_indices: tuple of int. The MoE blocks, sorted (empty for a
        dense ViT).
    tokens_per_group: int or None. Tokens routed together (the
        `tokens_per_group` argument, else `group_size * sequence_length`);
        `None` without MoE blocks.
    expert_hidden_dim: int or None. Hidden size of each expert MLP
        (`expert_hidden_dim`, else `mlp_dim`); `None` without MoE blocks.
"""


def check_backbone_arguments(arguments):
    """Checks `VisionMoEBackbone`'s arguments and derives its layout.

    Args:
        arguments: dict. Every `VisionMoEBackbone` constructor argument by
            name (`VisionMoEBackbone.arguments_from_config` fills in the
            defaults of a partial config); other keys are ignored.

    Returns:
        A `VisionMoELayout`.

    Raises:
        ValueError: an argument is invalid; the message names it.

    Example:
    >>> layout = check_backbone_arguments(dict(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=4, num_heads=2,
    ...     hidden_dim=16, mlp_dim=32, moe_layers=None, router="soft",
    ...     router_config=None, num_experts=4, expert_hidden_dim=None,
    ...     group_size=2, use_class_token=True, pooling="token",
    ...     dropout_rate=0.0, attention_dropout=0.0, expert_dropout_rate=None,
    ...     layer_norm_epsilon=1e-6, tokens_per_group=None))
    >>> layout.moe_layer_indices, layout.sequence_length, layout.tokens_per_group
    ((1, 3), 17, 34)
    """
    a = arguments
    data_format = vit_layers.standardize_data_format(a.get("data_format"))
    image_shape = _check_image_shape(a["image_shape"], data_format)
    ph, pw = vit_layers._pair(a["patch_size"], "patch_size")
    if image_shape[0] % ph or image_shape[1] % pw:
        raise ValueError(
            f"Image size {image_shape[:2]} (`image_shape`) must be divisible "
            f"by the patch size {(ph, pw)} (`patch_size`)."
        )
    for name in ("num_layers", "num_heads", "hidden_dim", "mlp_dim"):
        check_positive_int(name, a[name])
    if a["expert_hidden_dim"] is not None:
        check_positive_int("expert_hidden_dim", a["expert_hidden_dim"])
    for name in ("dropout_rate", "attention_dropout"):
        check_rate(name, a[name])
    if a["expert_dropout_rate"] is not None:
        check_rate("expert_dropout_rate", a["expert_dropout_rate"])
    check_positive_float("layer_norm_epsilon", a["layer_norm_epsilon"])
    for name in ("attention_qk_norm", "bfloat16_dispatch"):
        if not isinstance(a.get(name, False), bool):
            raise ValueError(f"`{name}` must be a bool, got {a[name]!r}.")
    _check_activation(a.get("mlp_activation", "gelu"))
    pooling, use_class_token = a["pooling"], a["use_class_token"]
    if pooling not in ("token", "gap"):
        raise ValueError(f"`pooling` must be 'token' or 'gap', got {pooling!r}.")
    if pooling == "token" and not use_class_token:
        raise ValueError(
            "`pooling='token'` needs `use_class_token=True`; use `pooling='gap'`."
        )
    moe_indices = _check_moe(
        a["moe_layers"],
        a["num_layers"],
        a["router"],
        a["router_config"],
        a["num_experts"],
        a["group_size"],
    )
    grid = (image_shape[0] // ph, image_shape[1] // pw)
    num_patches = grid[0] * grid[1]
    sequence_length = num_patches + int(bool(use_class_token))
    tokens_per_group = None
    if moe_indices:
        tokens_per_group = _tokens_per_group(
            a.get("tokens_per_group"), a["group_size"], sequence_length
        )
    return VisionMoELayout(
        image_shape=image_shape,
        patch_size=(ph, pw),
        patch_grid=grid,
        num_patches=num_patches,
        sequence_length=sequence_length,
        moe_layer_indices=moe_indices,
        tokens_per_group=tokens_per_group,
        expert_hidden_dim=(
            int(a["expert_hidden_dim"] or a["mlp_dim"]) if moe_indices else None
        ),
    )


def apply_preset_overrides(config, overrides):
    """A backbone config with preset overrides applied (`from_preset(...)`).

    Changing the router resets `router_config` to the new router's defaults
    (another router's arguments rarely fit), and `router=None` also resets
    `moe_layers` and `num_experts` (a dense ViT), unless those are given too.

    Args:
        config: dict. The preset's backbone config.
        overrides: dict. Backbone constructor arguments to replace.

    Returns:
        dict. A new config.

    Example:
    >>> apply_preset_overrides(
    ...     {"router": "soft", "router_config": {"num_slots": 1}},
    ...     {"router": "softmax_expert_choice"})
    {'router': 'softmax_expert_choice', 'router_config': None}
    """
    overrides = dict(overrides)
    if "router" in overrides and overrides["router"] != config.get("router"):
        overrides.setdefault("router_config", None)
        if overrides["router"] is None:
            overrides.setdefault("moe_layers", None)
            overrides.setdefault("num_experts", None)
    return {**config, **overrides}


def _check_moe(moe_layers, num_layers, router, router_config, num_experts, group_size):
    """The MoE block indices, after checking the router arguments."""
    if router is None:
        if parse_moe_layers(moe_layers, num_layers):
            raise ValueError(
                f"`moe_layers={moe_layers!r}` needs a `router`; pass a router "
                "name or `moe_layers=None` for a dense ViT."
            )
        return ()
    _check_router_name(router)
    if num_experts is None:
        raise ValueError(
            "`num_experts` must be a positive int with a router, got None."
        )
    check_positive_int("num_experts", num_experts)
    check_positive_int("group_size", group_size)
    _check_router_config(router, router_config)
    spec = "every:2" if moe_layers is None else moe_layers
    try:
        return parse_moe_layers(spec, num_layers)
    except ValueError as e:
        raise ValueError(f"`moe_layers`: {e}") from None


def _tokens_per_group(tokens_per_group, group_size, sequence_length):
    """Tokens per routing group: `tokens_per_group`, else whole images."""
    if tokens_per_group is None:
        return int(group_size) * sequence_length
    check_positive_int("tokens_per_group", tokens_per_group)
    if (group_size * sequence_length) % tokens_per_group:
        images = math.lcm(tokens_per_group, sequence_length) // sequence_length
        raise ValueError(
            f"`group_size={group_size}` images of {sequence_length} tokens do "
            f"not fill whole routing groups of `tokens_per_group="
            f"{tokens_per_group}` tokens: `group_size` must be a multiple of "
            f"{images}."
        )
    return int(tokens_per_group)


def _check_activation(activation):
    from keras_vmoe.layers.activations import get_activation

    if not isinstance(activation, str):
        raise ValueError(
            f"`mlp_activation` must be an activation name such as 'gelu' or "
            f"'gelu_approximate', got {activation!r}."
        )
    try:
        get_activation(activation)
    except ValueError:
        raise ValueError(
            f"`mlp_activation` must be an activation name such as 'gelu' or "
            f"'gelu_approximate', got {activation!r}."
        ) from None


def _check_image_shape(image_shape, data_format="channels_last"):
    """`image_shape` as `(height, width, channels)` ints, whatever the format."""
    order = "(channels, height, width)"
    if data_format == "channels_last":
        order = "(height, width, channels)"
    try:
        shape = tuple(image_shape)
        valid = len(shape) == 3 and all(
            not isinstance(s, bool) and int(s) == s >= 1 for s in shape
        )
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"`image_shape` must be {order} of positive ints with "
            f"data_format={data_format!r}, got {image_shape!r}."
        )
    shape = tuple(int(s) for s in shape)
    if data_format == "channels_first":
        return (shape[1], shape[2], shape[0])
    return shape


def _check_router_config(router, router_config):
    if router_config is None:
        return
    if not isinstance(router_config, dict):
        raise ValueError(
            "`router_config` must be a dict of router arguments or None, got "
            f"{router_config!r}."
        )
    from keras_vmoe.routers.registry import check_router_arguments

    check_router_arguments(
        router, router_config, reserved=("num_experts", "name", "dtype")
    )


def _check_router_name(router):
    if not isinstance(router, str):
        raise ValueError(f"`router` must be a router name or None, got {router!r}.")
    try:
        from keras_vmoe.routers import ROUTER_NAMES
    except ImportError:  # Routers not available: let routers.get() complain.
        return
    if router not in ROUTER_NAMES:
        close = difflib.get_close_matches(router, ROUTER_NAMES, n=3, cutoff=0.4)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"Unknown `router` {router!r}.{hint} Known routers: "
            f"{list(ROUTER_NAMES)}, or None for a dense ViT."
        )
