"""Allocation: from token-expert scores to a sparse `Routing`.

An allocation function reads a score for every (token, expert) pair of each
group and decides which token fills which expert slot. It knows nothing of
how the scores were made (softmax gates, a transport plan, ...): that is
the affinity's job. Router layers compose the two.

Shapes: scores `(G, S, E)`; the result's slots `(G, E, C)`.
"""

from keras import ops

from keras_vmoe import backend
from keras_vmoe.routers.routing import SparseRouting


def _check_scores(scores, combine_weights):
    # Static shapes only: under tf.function the group axis may be unknown.
    shape = tuple(scores.shape)
    if len(shape) != 3:
        raise ValueError(
            f"`scores` must have shape (groups, group_size, num_experts), got shape {shape}."
        )
    if combine_weights is not None and tuple(combine_weights.shape)[1:] != shape[1:]:
        raise ValueError(
            f"`combine_weights` must have the shape of `scores` {shape}, got "
            f"{tuple(combine_weights.shape)}."
        )


def _check_capacity(capacity):
    if int(capacity) != capacity or capacity < 1:
        raise ValueError(f"`capacity` must be an int >= 1, got {capacity!r}.")


def token_choice(
    scores, num_selected_experts, capacity, batch_priority=False, combine_weights=None
):
    """Token Choice: each token picks its top-K experts, slots permitting.

    Slots are filled in choice order: every token's first choice before any
    token's second choice. Within one choice rank, tokens go in sequence
    order, or, with batch priority routing, in decreasing order of their
    top-1 score (ties keep sequence order). A choice that finds its expert
    full is dropped; a later choice of the same token may still be kept.

    Args:
        scores: float tensor `(G, S, E)`. Token-expert scores (e.g. softmax
            gates or a transport plan). Ties go to the lower expert index.
        num_selected_experts: int. `K`, experts chosen per token,
            `1 <= K <= E`.
        capacity: int. `C`, slots per expert.
        batch_priority: bool. Batch priority routing. Defaults to `False`.
        combine_weights: float tensor `(G, S, E)`. Weight of expert `e`'s
            output on token `s`. Defaults to `scores`.

    Returns:
        A sparse `Routing` with `(G, E, C)` slots.

    Example:
    >>> import numpy as np
    >>> gates = np.array([[[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]], "float32")
    >>> r = token_choice(gates, num_selected_experts=1, capacity=1)
    >>> np.asarray(r.slot_token)[0].tolist()  # token 1 finds expert 0 full
    [[0], [2]]
    """
    _check_scores(scores, combine_weights)
    _check_capacity(capacity)
    num_groups, s, e = ops.shape(scores)
    k = num_selected_experts
    if int(k) != k or not 1 <= k <= e:
        raise ValueError(
            "`num_selected_experts` must be an int in [1, num_experts="
            f"{e}], got {num_selected_experts!r}."
        )
    c = int(capacity)
    scores = ops.cast(scores, "float32")
    if combine_weights is None:
        combine_weights = scores
    top_scores, top_experts = backend.top_k(scores, k)  # (G, S, K) each
    weights = ops.take_along_axis(
        ops.cast(combine_weights, "float32"), top_experts, axis=2
    )  # (G, S, K)

    # Order in which tokens claim slots within each choice rank.
    if batch_priority:
        token_order = backend.argsort_descending(top_scores[..., 0])  # (G, S)
    else:
        token_order = ops.broadcast_to(ops.arange(s, dtype="int32"), (num_groups, s))
    experts = ops.take_along_axis(top_experts, token_order[..., None], axis=1)
    weights = ops.take_along_axis(weights, token_order[..., None], axis=1)

    # Slot position of each choice: how many earlier claims (all ranks before
    # this one, then earlier tokens in this rank) went to the same expert.
    claims = ops.one_hot(ops.transpose(experts, (0, 2, 1)), e, dtype="int32")
    claims = ops.reshape(claims, (num_groups, k * s, e))  # (G, K*S, E) rank-major
    position = ops.sum((ops.cumsum(claims, axis=1) - 1) * claims, axis=2)  # (G, K*S)
    position = ops.transpose(ops.reshape(position, (num_groups, k, s)), (0, 2, 1))
    kept = position < c  # (G, S, K)

    # Scatter kept choices into their slots; dropped ones go to a spare slot
    # (index E*C) that is cut off afterwards. Each real slot receives at most
    # one choice, so the segment sum is an assignment.
    slot = ops.where(kept, experts * c + position, e * c)  # (G, S, K)
    tokens = ops.broadcast_to(token_order[..., None], (num_groups, s, k))
    payload = ops.stack(
        [
            ops.cast(tokens, "float32"),  # exact below 2**24 tokens
            ops.ones((num_groups, s, k), "float32"),
            weights,
        ],
        axis=-1,
    )  # (G, S, K, 3)
    filled = backend.grouped_segment_sum(
        ops.reshape(payload, (num_groups, s * k, 3)),
        ops.reshape(slot, (num_groups, s * k)),
        num_segments=e * c + 1,
    )  # (G, E*C + 1, 3)
    filled = filled[:, : e * c]
    filled = ops.reshape(filled, (num_groups, e, c, 3))
    # Token ids and the mask are counts, not functions of the scores: keep
    # them out of the backward pass (with them in it, XLA's CPU backward of
    # this layer ran ~4x slower).
    return SparseRouting(
        slot_token=ops.cast(ops.stop_gradient(filled[..., 0]), "int32"),
        slot_mask=ops.stop_gradient(filled[..., 1]),
        slot_weight=filled[..., 2],
        num_tokens=s,
    )


def expert_choice(scores, capacity, combine_weights=None):
    """Expert Choice: each expert takes its top-C tokens by score.

    The rank of a token in its expert's choice is its slot index. A token may
    reach any number of experts, including none. When `C > S` an expert takes
    every token and the remaining slots stay empty.

    Args:
        scores: float tensor `(G, S, E)`. Ties go to the lower token index.
        capacity: int. `C`, slots per expert.
        combine_weights: float tensor `(G, S, E)`. Defaults to `scores`.

    Returns:
        A sparse `Routing` with `(G, E, C)` slots.

    Example:
    >>> import numpy as np
    >>> gates = np.array([[[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]], "float32")
    >>> r = expert_choice(gates, capacity=1)
    >>> np.asarray(r.slot_token)[0].tolist()
    [[1], [2]]
    """
    _check_scores(scores, combine_weights)
    _check_capacity(capacity)
    num_groups, s, e = ops.shape(scores)
    c = int(capacity)
    scores = ops.cast(scores, "float32")
    if combine_weights is None:
        combine_weights = scores
    taken = min(c, s)
    _, tokens = backend.top_k(ops.transpose(scores, (0, 2, 1)), taken)  # (G, E, C')
    weights = ops.take_along_axis(
        ops.transpose(ops.cast(combine_weights, "float32"), (0, 2, 1)), tokens, axis=2
    )  # (G, E, C')
    mask = ops.ones_like(weights)
    if taken < c:
        pad = [(0, 0), (0, 0), (0, c - taken)]
        tokens = ops.pad(tokens, pad)
        weights = ops.pad(weights, pad)
        mask = ops.pad(mask, pad)
    return SparseRouting(
        slot_token=tokens, slot_mask=mask, slot_weight=weights, num_tokens=s
    )
