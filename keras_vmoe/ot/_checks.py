"""Argument checks shared by the optimal-transport solvers."""

import numbers


def check_positive_int(value, name):
    """Raises ValueError unless `value` is an integer >= 1.

    Args:
        value: object. The argument to check.
        name: str. The argument's name, quoted in the error message.

    Returns:
        The value as a Python int.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return int(value)


def check_positive_float(value, name):
    """Raises ValueError unless `value` is a finite real number > 0.

    Args:
        value: object. The argument to check.
        name: str. The argument's name, quoted in the error message.

    Returns:
        The value as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return value


def check_rank(x, rank, name, meaning):
    """Raises ValueError unless tensor `x` has the given rank.

    Args:
        x: tensor. The argument to check.
        rank: int. The required rank.
        name: str. The argument's name, quoted in the error message.
        meaning: str. What the axes are, e.g. "(groups, tokens, experts)".

    Returns:
        None.
    """
    if len(x.shape) != rank:
        raise ValueError(
            f"`{name}` must have rank {rank} {meaning}, got shape {tuple(x.shape)}."
        )
