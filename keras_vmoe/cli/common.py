"""Command-line helpers shared by `keras-vmoe eval` and `keras-vmoe train`.

Only command-line concerns live here: parsing flag values, turning errors
into one-line `UsageError`s, checking that a dataset can be read before
any model is built, printing a table. What the commands compute comes from
the library (`keras_vmoe.evaluation`, `keras_vmoe.data`, ...).
"""

import os

from keras_vmoe.cli.errors import UsageError
from keras_vmoe.evaluation.fewshot import DEFAULT_SHOTS as _SHOTS

DEFAULT_SHOTS = ",".join(str(shot) for shot in _SHOTS)  # "1,5,10,25"


def one_line(error):
    """An exception's message on one line.

    Example:
    >>> one_line(ValueError("two\\n  lines"))
    'two lines'
    """
    return " ".join(str(error).split())


def parse_int_list(text, flag, minimum=1):
    """`"1,5,10"` -> `(1, 5, 10)`; raises `UsageError` naming `flag`.

    Example:
    >>> parse_int_list("1, 5,10", "--shots")
    (1, 5, 10)
    """
    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UsageError(
            f"{flag} must be comma-separated integers, got {text!r}."
        ) from None
    if not values or min(values) < minimum:
        raise UsageError(
            f"{flag} must be comma-separated integers >= {minimum}, got {text!r}."
        )
    return values


def parse_name_list(text, flag):
    """`"digits,animal_mnist"` -> `("digits", "animal_mnist")`.

    Example:
    >>> parse_name_list("digits, animal_mnist", "--fewshot")
    ('digits', 'animal_mnist')
    """
    names = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not names:
        raise UsageError(f"{flag} must name at least one dataset, got {text!r}.")
    return names


def check_dataset(name, split, data_dir=None):
    """Checks that a dataset split can be read offline; `UsageError` if not.

    Returns:
        The number of examples in the split (or `None` if unknown).

    Example:
    >>> check_dataset("digits", "test")
    360
    """
    from keras_vmoe import data

    if name in data.BUNDLED_NAMES and split in ("train", "test"):
        return data.SPLIT_SIZES[name][split]
    try:
        ds = data.load(name, split, data_dir=data_dir)
    except data.DatasetNotPreparedError as e:
        raise UsageError(one_line(e)) from None
    except (ValueError, KeyError, AssertionError) as e:
        raise UsageError(f"dataset {name!r}, split {split!r}: {one_line(e)}") from None
    size = int(ds.cardinality())
    return size if size >= 0 else None


def format_table(results):
    """Two-column text table of `{metric: value}`.

    Example:
    >>> print(format_table({"accuracy": 0.51234, "num_examples": 10}))
    metric        value
    accuracy      0.5123
    num_examples  10
    """
    width = max([len("metric")] + [len(k) for k in results])
    lines = [f"{'metric':<{width}}  value"]
    for key, value in results.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def check_preset_output(output):
    """Refuses an `--output` that is a file, or a folder of files but no preset.

    A preset folder (with `config.json`) may be replaced; so may an empty
    or missing one.
    """
    if os.path.isfile(output):
        raise UsageError(f"--output: {output} is a file, not a folder.")
    if os.path.isdir(output) and os.listdir(output):
        if not os.path.isfile(os.path.join(output, "config.json")):
            raise UsageError(
                f"--output: {output} holds files but no config.json: not replacing "
                "a folder that is not a preset."
            )
