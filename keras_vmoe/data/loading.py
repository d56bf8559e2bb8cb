"""`load` (tf.data from TFDS) and `load_arrays` (NumPy), never online by default.

Bundled datasets (`animal_mnist`, `digits`) are prepared on first use into
`data_dir` from files already on disk. Any other name goes to TFDS: if the
user has prepared it (`tfds build NAME`), it loads; if not, `load` raises
`DatasetNotPreparedError` saying how to prepare it, unless the caller asked
for `download=True`.
"""

import contextlib
import io

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_vmoe.data import bundled
from keras_vmoe.data.builders import BUILDERS
from keras_vmoe.utils.pixels import scale_pixels


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset was requested that is not prepared in `data_dir`.

    Raised by `keras_vmoe.data.load` instead of going online. The message
    says how to prepare the dataset (`tfds build NAME --data_dir DIR`, or
    `load(..., download=True)`).

    Example:

    ```python
    try:
        load("cifar10", "train", data_dir="/tmp/empty")
    except DatasetNotPreparedError as e:
        print(e)
    ```
    """


def _offline_config():
    return tfds.download.DownloadConfig(try_download_gcs=False)


def _prepare_quietly(builder):
    """Prepare a bundled (local, seconds-long) dataset without TFDS chatter."""
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=_offline_config())
    finally:
        tqdm_utils.display_progress_bar(was_active)


def _not_prepared_message(name, data_dir):
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
    dir_flag = f" --data_dir {data_dir}" if data_dir else ""
    return (
        f"TFDS dataset {name!r} is not prepared in {where}. keras_vmoe never "
        "downloads by default. Prepare it once with `tfds build "
        f"{name.split(':')[0]}{dir_flag}` (datasets with a manual download, "
        "e.g. imagenet2012, also need `--manual_dir`), or call "
        f"`keras_vmoe.data.load({name!r}, split, download=True)`."
    )


def _builder(name, data_dir):
    if name in BUILDERS:
        return BUILDERS[name](data_dir=data_dir)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"`name`={name!r} is neither a bundled dataset {bundled.BUNDLED_NAMES} "
            "nor a TFDS dataset (see `tfds.list_builders()`)."
        ) from e


def load(
    name,
    split,
    data_dir=None,
    download=False,
    shuffle_files=False,
    as_supervised=False,
):
    """Load a dataset split as a `tf.data.Dataset`, without going online.

    Bundled datasets (`"animal_mnist"`, `"digits"`) are prepared on first
    use into `data_dir` from local files (a few seconds). Any other name is a
    TFDS dataset (`"cifar10"`, `"imagenet2012"`, `"cifar10:3.0.2"`) that must
    already be prepared there, else `DatasetNotPreparedError` is raised with
    the command that prepares it.

    Args:
        name: str. `"animal_mnist"`, `"digits"` or a TFDS dataset name.
        split: str. TFDS split, e.g. `"train"`, `"test"`, `"train[:10%]"`.
        data_dir: str. TFDS data directory. Defaults to `None` (TFDS
            default: `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        download: bool. Let TFDS download and prepare a dataset that is not
            prepared (network). Defaults to `False`.
        shuffle_files: bool. Shuffle the order of the files read. Defaults
            to `False`.
        as_supervised: bool. Yield `(image, label)` tuples instead of
            `{"image", "label", ...}` dicts. Defaults to `False`.

    Returns:
        A `tf.data.Dataset` of dicts with at least `"image"` (uint8
        `(H, W, C)`) and `"label"` (int64), or `(image, label)` tuples.

    Example:

    >>> ds = load("digits", "test")
    >>> int(ds.cardinality())
    360
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty str, got {name!r}.")
    if not isinstance(split, str) or not split:
        raise ValueError(f"`split` must be a non-empty str, got {split!r}.")
    builder = _builder(name, data_dir)
    if name in BUILDERS:
        if not builder.is_prepared():
            _prepare_quietly(builder)
    elif download:
        builder.download_and_prepare()
    try:
        return builder.as_dataset(
            split=split, shuffle_files=shuffle_files, as_supervised=as_supervised
        )
    except AssertionError as e:
        if "could not find data" not in str(e):
            raise
        raise DatasetNotPreparedError(_not_prepared_message(name, data_dir)) from e


def block_bounds(num_examples, index, count):
    """`(start, stop)` of block `index` of `count` contiguous blocks.

    Block `i` holds records `i * n // count` to `(i + 1) * n // count`; the
    blocks of `count` nest in those of any divisor of `count` (the first two
    of four blocks make the first of two).

    Args:
        num_examples: int. Records in the split.
        index: int. The block, `0 .. count - 1`.
        count: int. Number of blocks.

    Returns:
        `(start, stop)`, ints.

    Example:
    >>> [block_bounds(10, i, 4) for i in range(4)]
    [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    if not 0 <= index < count:
        raise ValueError(f"block `index` must be in [0, {count}), got {index}.")
    return index * num_examples // count, (index + 1) * num_examples // count


def split_block(name, split, index, count, data_dir=None):
    """The TFDS split string of block `index` of `count` contiguous blocks of `split`.

    `load(name, split_block(...))` reads only the records of the block:
    TFDS opens the files that hold them and parses nothing else, so
    `count` processes that each load their own block read the split once
    between them. Block `i` holds records `[i * n // count, (i + 1) * n //
    count)` of the split's `n` (`block_bounds`), in the split's order;
    `split` may be a slice or a sum (`"train[:64]"`, `"train+test"`).

    Args:
        name: str. `"animal_mnist"`, `"digits"` or a prepared TFDS dataset.
        split: str. TFDS split, e.g. `"train"` or `"train[:10%]"`.
        index: int. The block, `0 .. count - 1`.
        count: int. Number of blocks.
        data_dir: str. TFDS data directory. Defaults to `None`.

    Returns:
        str, a TFDS split of absolute slices (`"train[32:64]"`).

    Example:
    >>> split_block("digits", "train[:64]", 1, 2)
    'train[32:64]'
    >>> split_block("digits", "test[350:]+train[:10]", 0, 2)
    'test[350:360]'
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive int, got {count!r}.")
    builder = _builder(name, data_dir)
    if name in BUILDERS and not builder.is_prepared():
        _prepare_quietly(builder)
    splits = builder.info.splits
    try:
        parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    except (ValueError, KeyError) as e:
        raise ValueError(f"Split {split!r} of {name!r}: {e}") from None
    ranges = []
    for part in parts:
        size = splits[part.splitname].num_examples
        start = 0 if part.from_ is None else part.from_
        stop = size if part.to is None else part.to
        ranges.append((part.splitname, start, stop))
    total = sum(stop - start for _, start, stop in ranges)
    lo, hi = block_bounds(total, index, count)
    pieces, offset = [], 0
    for splitname, start, stop in ranges:
        # This range holds records offset .. offset + (stop - start) of the split.
        a = max(lo, offset) - offset + start
        b = min(hi, offset + stop - start) - offset + start
        if a < b:
            pieces.append(f"{splitname}[{a}:{b}]")
        offset += stop - start
    if not pieces:
        raise ValueError(
            f"Block {index} of {count} of {name}:{split} ({total} examples) is empty."
        )
    return "+".join(pieces)


def _to_unit_range(images):
    return scale_pixels(images.astype(np.float32))


def _convert_channels(images, channels):
    if channels is None or images.shape[-1] == channels:
        return images
    if channels == 3 and images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and images.shape[-1] == 3:
        return np.asarray(tf.image.rgb_to_grayscale(images))
    raise ValueError(
        f"Cannot convert {images.shape[-1]} channels to `channels`={channels}."
    )


def load_arrays(name, split, image_size=None, data_dir=None, channels=None):
    """Load a small dataset split into memory as NumPy arrays in (-1, 1).

    For the bundled datasets and the plain `"train"` / `"test"` splits this
    reads the local files directly (no TFDS preparation); the examples are
    the same as `load`'s, in the split's permutation order (TFDS stores them
    in its own hashed order). Other names and splits go through `load`
    (same offline rules) and `eval_pipeline(..., crop_fraction=None)`.

    Args:
        name: str. `"animal_mnist"`, `"digits"` or a prepared TFDS dataset.
        split: str. Split name, e.g. `"train"` or `"test[:50%]"`.
        image_size: int or tuple `(height, width)`. Resize (bilinear,
            antialiased, whole image, no crop) to this size. Defaults to
            `None` (native size; required to be fixed for TFDS datasets
            whose images vary in size).
        data_dir: str. TFDS data directory. Defaults to `None` (TFDS
            default).
        channels: int. Convert to 1 or 3 channels (grayscale is repeated to
            RGB). Defaults to `None` (keep the dataset's channels).

    Returns:
        `(images, labels)`: float32 `(N, H, W, C)` with values in [-1, 1]
        (`keras_vmoe.utils.pixels.scale_pixels`: `x / 127.5 - 1`, the
        scaling of the model's `VisionMoEImageConverter`) and int64 `(N,)`.

    Example:

    >>> x, y = load_arrays("digits", "train", image_size=16)
    >>> x.shape, x.dtype.name, float(x.min()) >= -1.0
    ((1437, 16, 16, 1), 'float32', True)
    """
    from keras_vmoe.data.pipelines import _as_size, eval_pipeline

    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be None, 1 or 3, got {channels!r}.")
    size = None if image_size is None else _as_size(image_size, "image_size")
    if name in bundled.BUNDLED_NAMES and split in ("train", "test"):
        images, labels = bundled.bundled_arrays(name, split)
        if size is None or tuple(images.shape[1:3]) == size:
            images = _convert_channels(images, channels)
            return np.clip(_to_unit_range(images), -1.0, 1.0), labels
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    else:
        ds = load(name, split, data_dir=data_dir)
    if size is None:
        spec = ds.element_spec["image"]
        if None in spec.shape[:2]:
            raise ValueError(f"Images of {name!r} vary in size: pass `image_size`.")
        size = tuple(spec.shape[:2])
    ds = eval_pipeline(ds, size, batch_size=1024, crop_fraction=None, channels=channels)
    xs, ys = [], []
    for x, y in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"Split {split!r} of {name!r} is empty.")
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def num_classes(name, data_dir=None):
    """Number of classes of a bundled or TFDS dataset (its `label` feature).

    Args:
        name: str. `"animal_mnist"`, `"digits"` or a TFDS dataset name.
        data_dir: str. TFDS data directory. Defaults to `None`.

    Returns:
        int.

    Example:
    >>> num_classes("digits")
    10
    """
    if name in bundled.CLASS_NAMES:
        return len(bundled.CLASS_NAMES[name])
    return int(tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes)


def eval_crop_fraction(name):
    """The evaluation crop of a dataset, for `eval_pipeline(crop_fraction=...)`.

    `None` (resize the whole image) for the small bundled datasets, whose
    objects fill the image; `0.875` (ImageNet-style central crop) for any
    other dataset.

    Args:
        name: str. Dataset name.

    Returns:
        float or None.

    Example:
    >>> eval_crop_fraction("digits"), eval_crop_fraction("cifar10")
    (None, 0.875)
    """
    return None if name in bundled.BUNDLED_NAMES else 0.875
