"""Running a model over whole routing groups: one padding rule for inference.

A V-MoE routes the tokens of `group_size` consecutive images together
(`keras_vmoe.layers.MoE` cuts the flattened tokens of a batch into groups),
and an image's output may depend on the images that share its group (Soft
MoE mixes every token of a group into its slots; sparse routers make a
group's tokens compete for expert capacity). The model itself takes any
batch size (a short last group is routed on its own, as a batch of its own
would be), but its groups then follow the batches that `predict` cuts, so
an image's output depends on `batch_size`. This module fixes the groups
instead: they are runs of `group_size` consecutive images of the whole
input, whatever the batching, and every batch has one compiled shape.
Every evaluation in the package (the `keras-vmoe eval` and `train`
commands, `keras_vmoe.callbacks.FewShotEvaluator`, the router study) runs
models through `predict_in_groups` (or, for `fit(validation_data=...)`,
`group_padded`), so they all see the same groups and the same padding.

The padding rule (`group_padding_index`):

1. Groups are runs of `group_size` consecutive images of the whole input,
   whatever the batch size: `predict_in_groups` cuts the input into batches
   of whole groups (and regroups the batches of a stream), so only the last
   group can be short of images.
2. A short last group of `m` real images is filled by cycling through
   those `m` images: `r0 .. r(m-1), r0, r1, ...`. The padded tokens are then
   copies of real tokens of the same group: no foreign content (a zero
   image is not an image of the data; after the patch embedding it is a
   token of biases and position embeddings) enters any group.
3. When a batch must keep the shape of the batches before it (one compiled
   function on JAX and TensorFlow), it is filled further with whole
   groups that repeat its (filled) last group. Groups are routed
   independently, so these change no real image's output.
4. Padding rows are dropped: the outputs have one row per real image, in
   order.

What the rule guarantees: every image in a whole group gets exactly the
output of running its group directly, independently of `batch_size` and
of how a stream is batched. An image of a short last group gets the output
of running that group filled as in 2; with Soft MoE, when `m` divides
`group_size`, that equals the output of the `m` images routed alone (each
token then appears `group_size / m` times in every slot's softmax over
tokens, which cancels). With sparse routers the copies still compete for
capacity (Token Choice buffers, Expert Choice picks), so the last group's
real images can be routed differently than without padding; with capacity
to spare (no token dropped) their outputs do not depend on the padding.
Zero padding guarantees none of this: zero images draw slots and weights
away from the real ones. (Running the short last group unpadded, routed on
its own by the model, would give each of its images its output as a batch
of its own; the padding above is kept so that the package's evaluations,
and the numbers they have reported, stay unchanged and every batch keeps
one compiled shape.)
"""

import math

import numpy as np


def model_group_size(model):
    """Images a keras_vmoe model routes together; 1 for other models.

    The `group_size` of the model's `backbone` (or of the model itself when
    it is a backbone) if it has a router and MoE layers, else 1.

    Args:
        model: keras.Model. Usually a `VisionMoEImageClassifier`.

    Returns:
        int. Every batch the model runs must be a multiple of it.

    Example:
    >>> from keras_vmoe.models import VisionMoEBackbone
    >>> backbone = VisionMoEBackbone(
    ...     image_shape=(8, 8, 1), patch_size=4, num_layers=2, num_heads=1,
    ...     hidden_dim=8, mlp_dim=8, router="soft", num_experts=2, group_size=3)
    >>> model_group_size(backbone)
    3
    >>> import keras
    >>> model_group_size(keras.Sequential([keras.layers.Dense(2)]))
    1
    """
    backbone = getattr(model, "backbone", model)
    if backbone is None or getattr(backbone, "router", None) is None:
        return 1
    if not getattr(backbone, "moe_layer_indices", (1,)):
        return 1
    return int(getattr(backbone, "group_size", 1) or 1)


def model_image_shape(model):
    """`(height, width, channels)` of a model's (first) input.

    Args:
        model: keras.Model with an image input `(batch, h, w, c)`.

    Returns:
        tuple of 3 ints.

    Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((8, 6, 3)), keras.layers.Flatten()])
    >>> model_image_shape(model)
    (8, 6, 3)
    """
    shape = model.inputs[0].shape
    return tuple(int(s) for s in shape[1:4])


def _check_group_size(group_size):
    if (
        not isinstance(group_size, (int, np.integer))
        or isinstance(group_size, bool)
        or group_size < 1
    ):
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}.")
    return int(group_size)


def group_padding_index(num_images, group_size, size=None):
    """Row of the real images that fills each row of a whole-group batch.

    The padding rule of this module (see its docstring): rows
    `0..num_images-1` are the images themselves; a short last group of `m`
    images is filled by cycling through those `m` images; rows beyond, up
    to `size`, repeat the (filled) last group.

    Args:
        num_images: int >= 1. Real images `n`.
        group_size: int >= 1. Images per routing group `g`.
        size: int or None. Rows wanted: a multiple of `g`, at least
            `ceil(n / g) * g`. Defaults to `None` (`ceil(n / g) * g`).

    Returns:
        int64 array `(size,)` of indices into the `n` real images.

    Example:
    >>> group_padding_index(7, 4).tolist()  # last group: images 4, 5, 6 + 4
    [0, 1, 2, 3, 4, 5, 6, 4]
    >>> group_padding_index(5, 2, size=8).tolist()  # + a whole group of 4, 4
    [0, 1, 2, 3, 4, 4, 4, 4]
    """
    g = _check_group_size(group_size)
    n = int(num_images)
    if n < 1:
        raise ValueError(f"`num_images` must be >= 1, got {num_images!r}.")
    whole = math.ceil(n / g) * g  # rows of the groups that hold real images
    size = whole if size is None else int(size)
    if size < whole or size % g:
        raise ValueError(
            f"`size` must be a multiple of `group_size` ({g}) and at least "
            f"{whole} for {n} images, got {size}."
        )
    full = n - n % g  # images in groups without padding
    m = max(n - full, 1)  # real images of the last group (if it is short)
    rows = np.arange(whole)
    index = np.where(rows < n, rows, full + (rows - full) % m)
    if size > whole:  # whole padding groups: repeat the last group
        extra = index[whole - g + np.arange(size - whole) % g]
        index = np.concatenate([index, extra])
    return index.astype(np.int64)


def pad_to_groups(images, group_size, size=None):
    """`images` padded to whole routing groups by `group_padding_index`.

    Args:
        images: array `(n, ...)`, `n >= 1`.
        group_size: int. Images per routing group.
        size: int or None. Rows of the result (a multiple of `group_size`).
            Defaults to `None` (`ceil(n / group_size) * group_size`).

    Returns:
        array `(size, ...)` whose first `n` rows are `images`.

    Example:
    >>> pad_to_groups(np.arange(5), 4).tolist()
    [0, 1, 2, 3, 4, 4, 4, 4]
    >>> pad_to_groups(np.arange(6), 4).tolist()
    [0, 1, 2, 3, 4, 5, 4, 5]
    """
    images = np.asarray(images)
    index = group_padding_index(len(images), group_size, size)
    if len(index) == len(images):
        return images
    return np.take(images, index, axis=0)


def _is_array(images):
    return isinstance(images, np.ndarray) or (
        hasattr(images, "shape") and hasattr(images, "dtype")
    )


def _chunks(images, step):
    """Consecutive chunks of exactly `step` images; the last may be shorter.

    `images` is an array or an iterable of batches (of any sizes).
    """
    if _is_array(images):
        images = np.asarray(images)
        for start in range(0, len(images), step):
            yield images[start : start + step]
        return
    pending, count = [], 0
    for batch in images:
        batch = np.asarray(batch)
        if not len(batch):
            continue
        pending.append(batch)
        count += len(batch)
        while count >= step:
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:step]
            rest = joined[step:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def _to_numpy(value):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(value))


def predict_in_groups(
    model, images, batch_size=256, *, group_size=None, callbacks=None
):
    """Outputs of a model on images, run as whole routing groups.

    The one way the package runs a V-MoE for evaluation (padding rule in
    the module docstring): batches of `batch_size` images rounded down to
    whole groups; a short last group filled with copies of its own images;
    a short last batch filled to the shape of the batches before it with
    copies of its last group; padding rows dropped. Groups are always runs
    of `group_size` consecutive input images, so the outputs do not depend
    on `batch_size` or on how a stream is batched.

    Args:
        model: keras.Model or callable. A model runs with
            `predict_on_batch`; a callable `fn(batch) -> outputs` is called
            on each padded batch (NumPy `(b, ...)`, `b` a multiple of the
            group) and returns an array or a list/tuple/dict of arrays with
            one row per image.
        images: array `(n, ...)`, or an iterable of batches `(b_i, ...)` of
            any sizes (e.g. `dataset.map(lambda x, y: x).as_numpy_iterator()`),
            regrouped into whole groups in order.
        batch_size: int. Images per call, rounded down to whole groups (at
            least one group). Defaults to `256`.
        group_size: int or None. Images per routing group. Defaults to
            `None` (`model_group_size(model)`; 1 for a callable without a
            `backbone`).
        callbacks: list of `keras.callbacks.Callback` or None. Get
            `on_predict_begin`, `on_predict_batch_begin/end` (logs
            `{"outputs": ...}`, padding included) and `on_predict_end`, as
            in `model.predict`; only with a keras.Model. Defaults to `None`.

    Returns:
        NumPy array `(n, ...)`, or the model's structure (list, tuple, dict)
        of such arrays; row `i` belongs to input image `i`.

    Example:
    >>> # A stand-in for a V-MoE that mixes each group of 2 images: the
    >>> # output of an image is the mean of its group.
    >>> mix = lambda x: np.repeat(x.reshape(-1, 2).mean(axis=1), 2)
    >>> predict_in_groups(mix, np.arange(5.0), batch_size=4, group_size=2).tolist()
    [0.5, 0.5, 2.5, 2.5, 4.0]
    >>> batches = iter([np.arange(3.0), np.arange(3.0, 5.0)])  # regrouped
    >>> predict_in_groups(mix, batches, batch_size=2, group_size=2).tolist()
    [0.5, 0.5, 2.5, 2.5, 4.0]
    """
    import keras

    is_model = isinstance(model, keras.Model)
    if not is_model and not callable(model):
        raise ValueError(f"`model` must be a keras.Model or callable, got {model!r}.")
    if group_size is None:
        group_size = model_group_size(model)
    g = _check_group_size(group_size)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    step = max(g, int(batch_size) // g * g)
    run = model.predict_on_batch if is_model else model
    if callbacks and not is_model:
        raise ValueError("`callbacks` need a keras.Model `model`.")
    hooks = None
    if callbacks:
        hooks = keras.callbacks.CallbackList(list(callbacks), model=model)
        hooks.on_predict_begin()
    outputs = []
    for index, chunk in enumerate(_chunks(images, step)):
        n = len(chunk)
        # The first batch only needs whole groups; a later (last, short)
        # batch keeps the shape of the full batches before it.
        padded = pad_to_groups(chunk, g, size=step if index else None)
        if hooks is not None:
            hooks.on_predict_batch_begin(index)
        out = run(padded)  # (rows of `padded`, ...) per output
        if hooks is not None:
            hooks.on_predict_batch_end(index, {"outputs": out})
        outputs.append(keras.tree.map_structure(lambda o, n=n: _to_numpy(o)[:n], out))
    if hooks is not None:
        hooks.on_predict_end()
    if not outputs:
        raise ValueError("`images` holds no image.")
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outputs)


def group_padded(dataset, group_size):
    """Pads every batch of an `(images, labels)` tf.data.Dataset to whole groups.

    The tf.data form of `pad_to_groups` for `fit(validation_data=...)` and
    `evaluate`: each batch is padded by `group_padding_index` (a short last
    group cycles through its own images) and the padded rows weigh 0. Its
    groups are those of `predict_in_groups` when every batch but the last
    holds whole groups (as `keras_vmoe.data.eval_pipeline` gives with a
    batch size that is a multiple of the group).

    Args:
        dataset: tf.data.Dataset of batched `(images, labels)`.
        group_size: int. Images per routing group.

    Returns:
        tf.data.Dataset of `(images, labels, sample_weight)`; the weight is
        1 for real rows, 0 for padding.

    Example:
    >>> import tensorflow as tf
    >>> ds = tf.data.Dataset.from_tensor_slices((np.arange(7), np.arange(7)))
    >>> images, labels, weight = next(iter(group_padded(ds.batch(7), 4)))
    >>> images.numpy().tolist(), weight.numpy().tolist()
    ([0, 1, 2, 3, 4, 5, 6, 4], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    """
    import tensorflow as tf

    g = _check_group_size(group_size)

    def pad(images, labels):
        # The same indices as `group_padding_index(n, g)`, in tf ops.
        n = tf.shape(images)[0]
        full = n - n % g
        m = tf.maximum(n - full, 1)
        rows = tf.range((n + g - 1) // g * g)
        index = tf.where(rows < n, rows, full + (rows - full) % m)
        weight = tf.cast(rows < n, tf.float32)
        return tf.gather(images, index), tf.gather(labels, index), weight

    return dataset.map(pad)
