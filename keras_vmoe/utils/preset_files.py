"""Where the built-in presets live, and reading their JSON files.

Standard library only (no Keras), so that `keras-vmoe presets` lists the
presets without importing Keras; `keras_vmoe.models.preset_loader` uses
these and re-exports them.
"""

import json
import os
import pathlib
import sys

PRESETS_ENV_VAR = "KERAS_VMOE_PRESETS_DIR"


class PresetFileError(ValueError):
    """A preset file that exists but cannot be used (unreadable, corrupt).

    Args:
        message: str. What is wrong, naming the file.
        path: str or os.PathLike. The file.
    """

    def __init__(self, message, path):
        super().__init__(message)
        self.path = str(path)


def presets_dir(anchor=__file__):
    """The folder holding the built-in presets.

    Looked up in order: `$KERAS_VMOE_PRESETS_DIR`; `keras_vmoe/presets`
    (installed as package data); `presets/` next to the package (a source
    checkout); `<sys.prefix>/share/keras_vmoe/presets` (installed as data
    files). Returns the first that exists, else the checkout location.

    Args:
        anchor: str. A file of a direct subpackage of `keras_vmoe` (its
            folder's parent is the package). Defaults to this module.

    Example:
    >>> (presets_dir() / "vit_dense_b16_224" / "config.json").is_file()
    True
    """
    package = pathlib.Path(anchor).resolve().parent.parent  # keras_vmoe/
    candidates = []
    if os.environ.get(PRESETS_ENV_VAR):
        candidates.append(pathlib.Path(os.environ[PRESETS_ENV_VAR]))
    candidates += [
        package / "presets",
        package.parent / "presets",
        pathlib.Path(sys.prefix) / "share" / "keras_vmoe" / "presets",
    ]
    for path in candidates:
        if path.is_dir():
            return path
    return package.parent / "presets"


def builtin_names(root=None):
    """Names of the preset folders in `root` (default: `presets_dir()`).

    Hidden folders (`.tmp-*`, `.old-*` left by an interrupted atomic save)
    are not presets.

    Example:
    >>> "vmoe_softmax_tc_b16_e32_224" in builtin_names()
    True
    """
    root = pathlib.Path(presets_dir() if root is None else root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and (p / "config.json").is_file()
    )


def read_json(folder, filename, required=True):
    """The JSON document `folder/filename`, or None if absent and not required.

    Raises:
        FileNotFoundError: the file is missing and `required`.
        PresetFileError: the file is not valid JSON.
    """
    path = pathlib.Path(folder) / filename
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"Preset folder '{folder}' has no `{filename}` (expected {path})."
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PresetFileError(
            f"Preset file {path} is not valid JSON (truncated or corrupt?): {e}",
            path,
        ) from e


def list_preset_metadata():
    """`{name: metadata.json}` of every built-in preset, in name order.

    Example:
    >>> list_preset_metadata()["vit_dense_b16_224"]["parameter_count"] > 85_000_000
    True
    """
    root = presets_dir()
    return {name: read_json(root / name, "metadata.json") for name in builtin_names()}
