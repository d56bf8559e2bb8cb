"""Expert capacity: how many slots each expert has per group."""

import math


def compute_capacity(
    num_tokens,
    num_experts,
    capacity_factor=None,
    capacity=None,
    ceil_or_round="ceil",
    multiple_of=4,
):
    """Number of slots per expert in one group.

    `C = ceil(num_tokens * capacity_factor / num_experts)` (or `round`), then
    rounded up to a multiple of `multiple_of`. Token Choice routers pass
    `num_tokens = S * K` (group size times experts per token); Expert Choice
    and Soft MoE pass `num_tokens = S`.

    Args:
        num_tokens: int. Tokens (or token-expert choices) to place per group.
        num_experts: int. Number of experts, at least 1.
        capacity_factor: float. Slots per expert relative to a perfectly
            balanced assignment. Exactly one of `capacity_factor` and
            `capacity` must be given.
        capacity: int. An explicit number of slots per expert.
        ceil_or_round: str. `"ceil"` or `"round"`. Defaults to `"ceil"`.
        multiple_of: int. Round the capacity up to a multiple of this
            (1 means no rounding). Defaults to 4.

    Returns:
        int, the capacity `C >= 1`.

    Example:
    >>> compute_capacity(16, 8, capacity_factor=1.05)  # ceil(2.1)=3 -> 4
    4
    >>> compute_capacity(16, 8, capacity_factor=1.05, multiple_of=1)
    3
    """
    if (capacity_factor is None) == (capacity is None):
        raise ValueError(
            "Give exactly one of `capacity_factor` and `capacity`; got "
            f"capacity_factor={capacity_factor!r}, capacity={capacity!r}."
        )
    if int(num_tokens) != num_tokens or num_tokens < 1:
        raise ValueError(f"`num_tokens` must be a positive int, got {num_tokens!r}.")
    if int(num_experts) != num_experts or num_experts < 1:
        raise ValueError(f"`num_experts` must be a positive int, got {num_experts!r}.")
    if int(multiple_of) != multiple_of or multiple_of < 1:
        raise ValueError(f"`multiple_of` must be a positive int, got {multiple_of!r}.")
    if capacity is not None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"`capacity` must be an int >= 1, got {capacity!r}.")
        return int(capacity)
    if ceil_or_round not in ("ceil", "round"):
        raise ValueError(
            f"`ceil_or_round` must be 'ceil' or 'round', got {ceil_or_round!r}."
        )
    if not capacity_factor > 0:
        raise ValueError(f"`capacity_factor` must be > 0, got {capacity_factor!r}.")
    exact = num_tokens * capacity_factor / num_experts
    cap = math.ceil(exact) if ceil_or_round == "ceil" else round(exact)
    if cap < 1:
        raise ValueError(
            f"Capacity {exact:g} slots per expert (num_tokens={num_tokens}, "
            f"num_experts={num_experts}, capacity_factor={capacity_factor}) "
            f"rounds to {cap} < 1. Increase `capacity_factor` or the group size."
        )
    if multiple_of > 1:
        cap = -(-cap // multiple_of) * multiple_of
    return int(cap)
