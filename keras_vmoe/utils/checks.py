"""Argument checks shared by the whole package.

Every check takes `(name, value)`, returns the value converted to its plain
Python type, and raises a `ValueError` whose message names the argument.
"""

import numbers


def check_positive_int(name, value, minimum=1):
    """`value` as an int, or a ValueError naming `name` unless an int >= `minimum`.

    Args:
        name: str. The argument's name, for the message.
        value: the argument. Integral floats (`4.0`) are accepted.
        minimum: int. Smallest accepted value. Defaults to `1`.

    Example:
    >>> check_positive_int("num_experts", 4.0)
    4
    """
    try:
        valid = not isinstance(value, bool) and int(value) == value >= minimum
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def is_number(value):
    """A real number (NumPy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_float(name, value):
    """`value` as a float, or a ValueError naming `name` unless it is > 0."""
    if not is_number(value) or not value > 0:
        raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")
    if value == float("inf"):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def check_non_negative(name, value):
    """`value` as a float, or a ValueError naming `name` unless it is >= 0."""
    if not is_number(value) or not value >= 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
    return float(value)


def check_rate(name, value):
    """`value` as a float, or a ValueError naming `name` unless in [0, 1).

    For dropout rates and label smoothing.

    Example:
    >>> check_rate("dropout_rate", 0.1)
    0.1
    """
    if not is_number(value) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_bool(name, value):
    """`value`, or a ValueError naming `name` unless it is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_rank(name, x, rank, meaning):
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
