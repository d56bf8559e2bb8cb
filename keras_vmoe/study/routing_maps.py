"""Which expert each patch goes to: the data of the V-MoE routing pictures.

For a few test images, the last MoE layer's routing is recorded during an
ordinary (eager) forward pass (`MoE.capture_routing`) and reduced to one
expert id per patch:

- sparse routers (Token and Expert Choice): the expert with the largest
  combine weight among those the patch reached (for Token Choice, the
  patch's kept choice with the largest gate; for Expert Choice, the
  choosing expert with the largest weight); `-1` where the patch reached no
  expert (dropped);
- Soft MoE: the expert of the slot with the largest dispatch weight for the
  patch (every patch contributes to every slot, none is dropped).
"""

import numpy as np
from keras import ops

from keras_vmoe.routers import SparseRouting

UNROUTED = -1


def expert_per_token(routing):
    """One expert id per token of a routing, `-1` where it reaches none.

    Args:
        routing: `keras_vmoe.routers.Routing` of `G` groups of `S` tokens.

    Returns:
        int array `(G, S)`.

    Example:
    >>> from keras_vmoe.routers import SparseRouting
    >>> # 1 group, 3 tokens, 2 experts of 1 slot: token 2 is dropped.
    >>> r = SparseRouting(np.array([[[1], [0]]]), np.ones((1, 2, 1), "float32"),
    ...                    np.array([[[0.7], [0.6]]], "float32"), num_tokens=3)
    >>> expert_per_token(r).tolist()
    [[1, 0, -1]]
    """
    if isinstance(routing, SparseRouting):
        combine = ops.convert_to_numpy(routing.combine_tensor())  # (G, S, E, C)
        dispatch = ops.convert_to_numpy(routing.dispatch_tensor())
        weight = combine.sum(axis=-1)  # (G, S, E)
        reached = dispatch.sum(axis=-1) > 0  # (G, S, E)
        weight = np.where(reached, weight, -np.inf)
        expert = weight.argmax(axis=-1)
        return np.where(reached.any(axis=-1), expert, UNROUTED).astype(np.int64)
    dispatch = ops.convert_to_numpy(routing.dispatch_tensor())  # (G, S, E, P)
    g, s, e, p = dispatch.shape
    best_slot = dispatch.reshape(g, s, e * p).argmax(axis=-1)
    return (best_slot // p).astype(np.int64)


def last_routing(model, images):
    """The `Routing` of the model's last MoE layer on `images` (eager pass).

    Args:
        model: a model containing `MoE` layers.
        images: float32 array `(N, H, W, C)`; `N` a multiple of the group
            size in images.

    Returns:
        `keras_vmoe.routers.Routing`, or `None` if the model has no MoE layer.
    """
    from keras_vmoe.callbacks.routing import moe_layers

    layers = moe_layers(model)
    if not layers:
        return None
    with layers[-1].capture_routing() as routings:
        model(images, training=False)
    return routings[-1]


def patch_expert_maps(routing, tokens_per_image, grid, class_token=True):
    """Expert id per patch of each image of a routing.

    Args:
        routing: `Routing` of whole images (`last_routing`).
        tokens_per_image: int. Tokens per image (class token first, if any).
        grid: int. Patches per side.
        class_token: bool. The first token of each image is a class token
            (`tokens_per_image = grid**2 + 1`), left out of the map.
            Defaults to `True`.

    Returns:
        int array `(N, grid, grid)`; `-1` marks patches that reached no
        expert.

    Example:
    >>> from keras_vmoe.routers import SparseRouting
    >>> # 1 group of 1 image: class token + 2x2 patches, 2 experts, 1 slot.
    >>> r = SparseRouting(np.array([[[1], [4]]]), np.ones((1, 2, 1), "float32"),
    ...                    np.ones((1, 2, 1), "float32"), num_tokens=5)
    >>> patch_expert_maps(r, tokens_per_image=5, grid=2).tolist()
    [[[0, -1], [-1, 1]]]
    """
    experts = expert_per_token(routing).reshape(-1, tokens_per_image)
    if class_token:
        experts = experts[:, 1:]  # drop the class token
    return experts.reshape(len(experts), grid, grid)
