"""Atomic saving: write into a temporary sibling, then rename into place.

An interrupted save (an exception, Ctrl-C, a killed process) must not
leave a half-written preset or checkpoint where a good one was. Both
helpers here write into a temporary sibling of the target (same folder,
hence same file system, so the final `rename` is atomic) and move it into
place only when writing has finished; on failure the temporary is removed
and the target is untouched.

- `atomic_file(path)`: a single file. `os.replace` swaps it in atomically.
- `atomic_directory(path)`: a folder (a preset, a backup). POSIX cannot
  swap two folders in one step, so an existing folder is renamed aside
  (`.old-*`), the new one renamed into place, then the old one deleted.
  Between the two renames, a tiny window, `path` does not exist; a crash
  exactly there leaves the previous contents complete in the `.old-*`
  sibling (rename it back to recover).

Temporary names start with `.tmp-` (and `.old-`) and end with the target's
name, so suffixes such as `.weights.h5` or `.keras`, which Keras checks,
are kept.
"""

import contextlib
import os
import secrets
import shutil
import threading

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

# Folders being staged by an `atomic_directory` in this process: a nested
# save into one of them (a task's `save_to_preset` saving its backbone into
# the same folder) writes in place instead of staging again.
_staging = set()
_staging_lock = threading.Lock()


def _sibling(path, prefix):
    parent, name = os.path.split(path)
    return os.path.join(parent, f"{prefix}{secrets.token_hex(4)}-{name}")


def _fsync_tree(root):
    """Flushes every file under `root` (and the folders) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_folder(folder)


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path to write; on success it replaces `path`.

    Args:
        path: str or os.PathLike. The file to write. Its folder is created
            if missing.

    Yields:
        str. A sibling path with the same name suffix (`.tmp-XXXXXXXX-name`).

    Raises:
        IsADirectoryError: `path` is a folder.

    Example:
    >>> import os, tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> target = os.path.join(folder.name, "note.txt")
    >>> with atomic_file(target) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("done")
    >>> open(target).read(), os.listdir(folder.name)
    ('done', ['note.txt'])
    >>> folder.cleanup()
    """
    path = os.path.realpath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"Cannot save to {path!r}: it is a folder.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling(path, TMP_PREFIX)
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise FileNotFoundError(f"The save wrote nothing for {path!r}.")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_folder(os.path.dirname(path))


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_replaceable(path, marker):
    if not os.path.isdir(path):
        raise NotADirectoryError(
            f"Cannot save a folder to {path!r}: a file of that name exists."
        )
    entries = os.listdir(path)
    if entries and marker not in entries:
        raise FileExistsError(
            f"Refusing to replace {path!r}: it is not empty and has no "
            f"`{marker}`, so it does not look like a folder this save wrote. "
            "Save to a new or empty folder."
        )


@contextlib.contextmanager
def atomic_directory(path, marker="config.json", keep_existing=False):
    """Yields a temporary folder to fill; on success it replaces `path`.

    If `path` is being staged already by an enclosing `atomic_directory`
    (of this process), yields `path` itself: the enclosing one moves it.

    Args:
        path: str or os.PathLike. The folder to write. Its parent is created
            if missing.
        marker: str. A file name that identifies a folder this kind of save
            writes (`config.json` for presets). An existing non-empty
            `path` without it is not replaced (it may be unrelated data).
            Defaults to `"config.json"`.
        keep_existing: bool. Start the temporary folder as a copy of the
            existing `path`, so files the save does not rewrite are kept.
            Defaults to `False` (the result holds only what was written).

    Yields:
        str. The temporary folder, a sibling of `path`.

    Raises:
        FileExistsError: `path` is a non-empty folder without `marker`.
        NotADirectoryError: `path` is a file.

    Example:
    >>> import os, tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> target = os.path.join(folder.name, "preset")
    >>> with atomic_directory(target) as tmp:
    ...     with open(os.path.join(tmp, "config.json"), "w") as f:
    ...         _ = f.write("{}")
    >>> os.listdir(target), os.listdir(folder.name)
    (['config.json'], ['preset'])
    >>> folder.cleanup()
    """
    path = os.path.realpath(os.fspath(path))
    with _staging_lock:
        nested = path in _staging
    if nested:
        yield path
        return
    exists = os.path.lexists(path)
    if exists:
        _check_replaceable(path, marker)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling(path, TMP_PREFIX)
    try:
        if keep_existing and exists:
            shutil.copytree(path, tmp, symlinks=True)
        else:
            os.mkdir(tmp)
        with _staging_lock:
            _staging.add(tmp)
        try:
            yield tmp
        finally:
            with _staging_lock:
                _staging.discard(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp, path):
    """Moves the finished folder `tmp` to `path`, replacing what is there."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        _fsync_folder(os.path.dirname(path))
        return
    old = _sibling(path, OLD_PREFIX)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous folder back
        raise
    _fsync_folder(os.path.dirname(path))
    _remove(old)


def atomic_preset_save(cls):
    """Class decorator making a keras-hub model's `save_to_preset` atomic.

    The inherited `save_to_preset` writes its files (`config.json`, weights,
    and for a task `task.json` with the backbone's files) into a temporary
    sibling folder that then replaces `preset_dir` (see `atomic_directory`),
    so an interrupted save leaves the previous preset as it was. A decorator
    rather than a base class: keras-hub names a task in a preset's
    `metadata.json` by its first base class, which must stay the keras-hub
    one (`ImageClassifier`).

    Args:
        cls: a subclass of a keras-hub `Backbone` or `Task`.

    Returns:
        `cls`, with `save_to_preset` replaced.
    """
    save = cls.save_to_preset

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """Saves the model as a keras-hub preset folder, atomically.

        Args:
            preset_dir: str. The preset folder. An existing one is replaced
                if it is empty or a preset (has `config.json`).
            max_shard_size: int or float. Largest weights file in GB before
                the weights are sharded. Defaults to `10`.

        Raises:
            FileExistsError: `preset_dir` holds files but no `config.json`.
        """
        with atomic_directory(preset_dir) as staging:
            save(self, staging, max_shard_size=max_shard_size)

    cls.save_to_preset = save_to_preset
    return cls
