"""tf.data input pipelines: pixels in, `(images, labels)` batches out.

Training: decode, inception-style random resized crop, horizontal flip,
optional channel conversion, optional Keras `RandAugment`, scale to [-1, 1],
optional one-hot labels and Keras `MixUp`, batch, prefetch. Evaluation:
decode, resize the short side then central crop (or plain resize), scale,
batch. The batches are tf tensors that Keras converts for every backend, so
`model.fit(train_pipeline(...))` works on JAX, TensorFlow and torch.

Randomness is reproducible with a seed: the shuffle is seeded, the crop and
flip use stateless ops fed by a seeded `tf.data.Dataset.random` stream (new
draws every epoch), and the Keras layers are seeded (their map then runs
sequentially, since their seed state is shared between calls).
"""

import math
import types

import keras
import tensorflow as tf

from keras_vmoe.utils.pixels import scale_pixels

AUTOTUNE = tf.data.AUTOTUNE


def _as_size(image_size, arg="image_size"):
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        size = tuple(image_size)
    else:
        raise ValueError(
            f"`{arg}` must be an int or (height, width), got {image_size!r}."
        )
    if not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"`{arg}` must be positive ints, got {image_size!r}.")
    return size


def _check_common(batch_size, num_classes, channels):
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if num_classes is not None and (
        not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ValueError(
            f"`num_classes` must be an int >= 2 or None, got {num_classes!r}."
        )
    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be None, 1 or 3, got {channels!r}.")


def _image_label(*element):
    """Accept `{"image", "label", ...}` dicts or `(image, label)` tuples."""
    if len(element) == 1 and isinstance(element[0], dict):
        return element[0]["image"], element[0]["label"]
    if len(element) == 2:
        return element
    raise ValueError(
        "`ds` must yield {'image', 'label'} dicts or (image, label) tuples."
    )


def _decode(image):
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, expand_animations=False)
    if image.shape.rank == 2:
        image = image[..., None]
    return image


def _to_channels(image, channels):
    if channels is None or image.shape[-1] == channels:
        return image
    if image.shape[-1] is None:  # decoded images: channels known at run time
        if channels == 3:
            image = tf.cond(
                tf.shape(image)[-1] == 1,
                lambda: tf.repeat(image, 3, axis=-1),
                lambda: image[..., :3],
            )
        else:
            image = tf.cond(
                tf.shape(image)[-1] == 1,
                lambda: image,
                lambda: tf.image.rgb_to_grayscale(image[..., :3]),
            )
        return tf.ensure_shape(image, [None, None, channels])
    if channels == 3 and image.shape[-1] == 1:
        return tf.repeat(image, 3, axis=-1)
    if channels == 1 and image.shape[-1] == 3:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(
        f"Cannot convert {image.shape[-1]} channels to `channels`={channels}."
    )


def _finish(image, label, num_classes):
    # The model's converter's scaling (`VisionMoEImageConverter`); the clip
    # changes nothing for pixels in [0, 255] (255 maps to exactly 1.0).
    image = tf.clip_by_value(scale_pixels(tf.cast(image, tf.float32)), -1.0, 1.0)
    label = tf.cast(label, tf.int32)
    if num_classes is not None:
        label = tf.one_hot(label, num_classes, dtype=tf.float32)
    return image, label


def _resize(image, size):
    return tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)


def _inception_crop(image, size, seed, area_range, aspect_ratio_range):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        area_range=area_range,
        aspect_ratio_range=aspect_ratio_range,
        use_image_if_no_bounding_boxes=True,
    )
    return _resize(tf.slice(image, begin, crop_size), size)


def _resize_small_central_crop(image, size, crop_fraction):
    """Resize the short side to `max(size) / crop_fraction`, crop the centre."""
    target = math.ceil(max(size) / crop_fraction)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = target / tf.reduce_min(shape)
    new = tf.cast(tf.math.round(shape * scale), tf.int32)
    new = tf.maximum(new, tf.constant(size, tf.int32))
    image = tf.image.resize(tf.cast(image, tf.float32), new, antialias=True)
    top = (new[0] - size[0]) // 2
    left = (new[1] - size[1]) // 2
    return tf.slice(image, [top, left, 0], [size[0], size[1], -1])


def _tf_histogram(layer, values, value_range, nbins):
    """`Equalization`'s histogram as one bincount (what Keras uses off JAX)."""
    lo, hi = value_range
    scaled = (tf.cast(values, tf.float32) - lo) * (nbins - 1) / (hi - lo)
    indices = tf.clip_by_value(tf.cast(scaled, tf.int32), 0, nbins - 1)
    return tf.math.bincount(tf.reshape(indices, [-1]), minlength=nbins, maxlength=nbins)


def _rand_augment(num_ops, factor, seed):
    layer = keras.layers.RandAugment(
        value_range=(0, 255), num_ops=num_ops, factor=factor, seed=seed
    )
    if keras.backend.backend() == "jax":
        # Keras 3.15's Equalization unrolls its histogram into 256 steps
        # whenever the *global* backend is JAX, even inside tf.data where it
        # runs on TensorFlow: ~46k graph ops, ~30 s to trace. Inside tf.data
        # the TensorFlow bincount path is the right one.
        layer.equalization._custom_histogram_fixed_width = types.MethodType(
            _tf_histogram, layer.equalization
        )
    return layer


def train_pipeline(
    ds,
    image_size,
    batch_size,
    *,
    num_classes=None,
    random_crop=True,
    crop_area_range=(0.05, 1.0),
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    flip=True,
    channels=None,
    rand_augment=None,
    mixup_alpha=None,
    shuffle_buffer=10_000,
    seed=0,
    repeat=False,
    drop_remainder=True,
    cache=False,
    prefetch=True,
):
    """Training input pipeline: augment, scale to [-1, 1], batch.

    Per example: decode (if encoded), inception-style random resized crop
    (or a plain resize with `random_crop=False`), random horizontal flip,
    channel conversion, optional `keras.layers.RandAugment` (on 0..255
    pixels), scale to [-1, 1] (`keras_vmoe.utils.pixels.scale_pixels`, the
    `VisionMoEImageConverter`'s scaling), optional one-hot label. Per batch:
    optional `keras.layers.MixUp` (needs `num_classes`). For digit-like data
    use `random_crop=False, flip=False`.

    Args:
        ds: tf.data.Dataset. Unbatched `{"image", "label"}` dicts (as from
            `keras_vmoe.data.load`) or `(image, label)` tuples; images uint8
            `(H, W, C)` or encoded bytes, labels int class ids.
        image_size: int or tuple `(height, width)`. Output image size.
        batch_size: int. Examples per batch.
        num_classes: int. If given, labels become float32 one-hot vectors
            of this length. Defaults to `None` (int32 class ids).
        random_crop: bool. Inception-style random resized crop; else resize
            the whole image. Defaults to `True`.
        crop_area_range: tuple of floats. Range of the crop's fraction of the
            image area. Defaults to `(0.05, 1.0)`.
        aspect_ratio_range: tuple of floats. Range of the crop's aspect
            ratio. Defaults to `(3/4, 4/3)`.
        flip: bool. Random horizontal flips. Defaults to `True`.
        channels: int. Convert to 1 or 3 channels (grayscale is repeated to
            RGB). Defaults to `None` (keep).
        rand_augment: tuple `(num_ops, factor)`. Apply
            `keras.layers.RandAugment(num_ops=..., factor=...)` to each image.
            Defaults to `None` (off).
        mixup_alpha: float. Apply `keras.layers.MixUp(alpha=mixup_alpha)` to
            each batch; requires `num_classes`. Defaults to `None` (off).
        shuffle_buffer: int. Shuffle buffer size; 0 disables shuffling.
            Defaults to `10_000`.
        seed: int. Seed of the shuffle and every random op, for
            reproducible batches; `None` draws fresh seeds (and lets the
            Keras-layer maps run in parallel). Defaults to `0`.
        repeat: bool. Repeat the dataset forever (then pass
            `steps_per_epoch` to `fit`). Defaults to `False`.
        drop_remainder: bool. Drop the last partial batch. Defaults to
            `True`.
        cache: bool. Cache the decoded examples in memory before shuffling.
            Defaults to `False`.
        prefetch: bool. Prefetch batches. Defaults to `True`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)`: float32 `(B, h, w, C)` in
        [-1, 1], and int32 `(B,)` or float32 `(B, num_classes)`.

    Example:

    >>> from keras_vmoe.data import load, train_pipeline
    >>> ds = train_pipeline(load("digits", "train"),
    ...                     image_size=16, batch_size=32, num_classes=10,
    ...                     random_crop=False, flip=False)
    >>> images, labels = next(iter(ds))
    >>> tuple(images.shape), tuple(labels.shape)
    ((32, 16, 16, 1), (32, 10))
    """
    size = _as_size(image_size)
    _check_common(batch_size, num_classes, channels)
    if (
        len(crop_area_range) != 2
        or not 0 < crop_area_range[0] <= crop_area_range[1] <= 1
    ):
        raise ValueError(
            f"`crop_area_range` must be (lo, hi) in (0, 1], got {crop_area_range!r}."
        )
    if (
        len(aspect_ratio_range) != 2
        or not 0 < aspect_ratio_range[0] <= aspect_ratio_range[1]
    ):
        raise ValueError(
            f"`aspect_ratio_range` must be (lo, hi) > 0, got {aspect_ratio_range!r}."
        )
    if rand_augment is not None and (
        len(rand_augment) != 2
        or int(rand_augment[0]) < 1
        or not 0 <= rand_augment[1] <= 1
    ):
        raise ValueError(
            "`rand_augment` must be (num_ops >= 1, factor in [0, 1]) or None, "
            f"got {rand_augment!r}."
        )
    if mixup_alpha is not None:
        if not mixup_alpha > 0:
            raise ValueError(f"`mixup_alpha` must be > 0 or None, got {mixup_alpha!r}.")
        if num_classes is None:
            raise ValueError("`mixup_alpha` needs one-hot labels: pass `num_classes`.")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(
            f"`shuffle_buffer` must be an int >= 0, got {shuffle_buffer!r}."
        )
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int or None, got {seed!r}.")

    ds = ds.map(lambda *e: tuple(_image_label(*e)), num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda x, y: (_decode(x), y), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, randoms)

    def augment(element, rnd):
        image, label = element
        num_channels = image.shape[-1]
        op_seeds = tf.random.experimental.stateless_split(
            tf.stack([rnd, tf.constant(0, tf.int64)]), num=2
        )
        if random_crop:
            image = _inception_crop(
                image, size, op_seeds[0], crop_area_range, aspect_ratio_range
            )
        else:
            image = _resize(image, size)
        image = tf.ensure_shape(image, [size[0], size[1], num_channels])
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, op_seeds[1])
        image = _to_channels(image, channels)
        return image, label

    ds = ds.map(augment, num_parallel_calls=AUTOTUNE)
    keras_calls = None if seed is not None else AUTOTUNE
    if rand_augment is not None:
        randaug = _rand_augment(int(rand_augment[0]), float(rand_augment[1]), seed)
        ds = ds.map(
            lambda x, y: (tf.clip_by_value(randaug(x), 0.0, 255.0), y),
            num_parallel_calls=keras_calls,
        )
    ds = ds.map(lambda x, y: _finish(x, y, num_classes), num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if mixup_alpha is not None:
        mixup = keras.layers.MixUp(alpha=float(mixup_alpha), seed=seed)

        def mix(x, y):
            out = mixup({"images": x, "labels": y})
            return out["images"], out["labels"]

        ds = ds.map(mix, num_parallel_calls=keras_calls)
    if prefetch:
        ds = ds.prefetch(AUTOTUNE)
    return ds


def eval_pipeline(
    ds,
    image_size,
    batch_size,
    *,
    num_classes=None,
    crop_fraction=0.875,
    channels=None,
    drop_remainder=False,
    cache=False,
    prefetch=True,
):
    """Evaluation input pipeline: resize, central crop, scale to [-1, 1], batch.

    Per example: decode (if encoded); with `crop_fraction`, resize the short
    side to `ceil(max(image_size) / crop_fraction)` and take the central
    `image_size` crop (ImageNet style: 0.875 gives 256 -> 224); with
    `crop_fraction=None`, resize the whole image to `image_size` (what
    `train_pipeline(random_crop=False)` does; use it for digit-like data).
    Then channel conversion, scaling to [-1, 1] (`scale_pixels`, as the
    `VisionMoEImageConverter` scales), optional one-hot label. With
    `crop_fraction=None` the images are those the model's converter makes
    from the same pixels (bilinear antialiased resize, then scaling).

    Args:
        ds: tf.data.Dataset. Unbatched `{"image", "label"}` dicts or
            `(image, label)` tuples (see `train_pipeline`).
        image_size: int or tuple `(height, width)`. Output image size.
        batch_size: int. Examples per batch.
        num_classes: int. If given, labels become float32 one-hot vectors.
            Defaults to `None` (int32 class ids).
        crop_fraction: float in (0, 1] or None. Fraction of the resized
            image kept by the central crop; `None` resizes without cropping.
            Defaults to `0.875`.
        channels: int. Convert to 1 or 3 channels. Defaults to `None`
            (keep).
        drop_remainder: bool. Drop the last partial batch. Defaults to
            `False`.
        cache: bool. Cache the decoded examples in memory. Defaults to
            `False`.
        prefetch: bool. Prefetch batches. Defaults to `True`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` in input order: float32
        `(B, h, w, C)` in [-1, 1], and int32 `(B,)` or float32
        `(B, num_classes)`.

    Example:

    >>> from keras_vmoe.data import eval_pipeline, load
    >>> ds = eval_pipeline(load("digits", "test"),
    ...                    image_size=8, batch_size=100, crop_fraction=None)
    >>> [int(x.shape[0]) for x, _ in ds]
    [100, 100, 100, 60]
    """
    size = _as_size(image_size)
    _check_common(batch_size, num_classes, channels)
    if crop_fraction is not None and not 0 < crop_fraction <= 1:
        raise ValueError(
            f"`crop_fraction` must be in (0, 1] or None, got {crop_fraction!r}."
        )

    def preprocess(*element):
        image, label = _image_label(*element)
        image = _decode(image)
        num_channels = image.shape[-1]
        if crop_fraction is None:
            image = _resize(image, size)
        else:
            image = _resize_small_central_crop(image, size, crop_fraction)
        image = tf.ensure_shape(image, [size[0], size[1], num_channels])
        image = _to_channels(image, channels)
        return _finish(image, label, num_classes)

    if cache:
        ds = ds.cache()
    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if prefetch:
        ds = ds.prefetch(AUTOTUNE)
    return ds
