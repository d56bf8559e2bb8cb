"""Model and data set-up of `keras-vmoe train`.

`build_model` and `compile_for_run` make the classifier from the run's
settings (`keras_vmoe.cli.train_arguments`), `detach_preprocessor` keeps
its preprocessor out of training on the pipelines' preprocessed batches; `training_stream` is the
endless, resumable stream of training batches, and `validation_data` the
evaluation split padded to whole routing groups
(`keras_vmoe.evaluation.group_padded`, the padding rule of
`keras_vmoe.evaluation.predict_in_groups`).
"""

from keras_vmoe.cli.common import one_line
from keras_vmoe.cli.train_arguments import usage_error

MAX_SHUFFLE_BUFFER = 10_000


def build_model(cfg, num_classes):
    """The classifier of `--preset` with the overrides and the dataset's classes."""
    from keras_vmoe.models import preset_loader

    try:
        folder = preset_loader.resolve_preset(cfg["preset"])
        task = preset_loader.read_json(folder, "task.json", required=False) or {}
    except ValueError as e:
        raise usage_error(one_line(e)) from None
    overrides = dict(cfg["overrides"])
    # Keep a trained preset's head when it already has the dataset's classes
    # (overriding `num_classes` re-initialises the head).
    if task.get("config", {}).get("num_classes") != num_classes:
        overrides["num_classes"] = num_classes
    try:
        return preset_loader.load_classifier(folder, **overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise usage_error(
            f"cannot build the model from --preset and --override: {one_line(e)}"
        ) from None


def detach_preprocessor(model):
    """Takes the preprocessor off `model` for training; returns the one to save.

    The training and validation batches come from the `keras_vmoe.data`
    pipelines, already resized and scaled to [-1, 1] (split preprocessing,
    in keras-hub's words), so the model trains without a preprocessor. The
    returned one goes back on before the preset is saved: the preset's own,
    or for a V-MoE preset without one, the `VisionMoEImageClassifierPreprocessor`
    of its backbone.
    """
    from keras_vmoe.models import (
        VisionMoEBackbone,
        VisionMoEImageClassifierPreprocessor,
    )

    preprocessor = model.preprocessor
    if preprocessor is None and isinstance(model.backbone, VisionMoEBackbone):
        preprocessor = VisionMoEImageClassifierPreprocessor.for_backbone(model.backbone)
    model.preprocessor = None
    return preprocessor


def compile_for_run(model, cfg, total_steps):
    """Compiles `model` with the run's recipe; returns the recipe's name.

    `--recipe auto` is the Soft MoE recipe for models whose router returns
    a `SoftRouting` (Soft MoE) and that pool by averaging, else the V-MoE
    recipe. `--lr-schedule` and `--freeze-non-experts` (for upcycled
    presets) are applied first (`keras_vmoe.training.upcycling`).
    """
    from keras_vmoe.routers import SoftRouting, get_class
    from keras_vmoe.training.recipe import compile_with_recipe
    from keras_vmoe.training.upcycling import apply_upcycling_options

    recipe = cfg["recipe"]
    if recipe == "auto":
        backbone = model.backbone
        soft = (
            backbone.router is not None
            and issubclass(get_class(backbone.router).routing_class, SoftRouting)
            and backbone.pooling == "gap"
        )
        recipe = "soft_moe" if soft else "vmoe"
    try:
        warmup_steps = apply_upcycling_options(
            model,
            cfg.get("lr_schedule", "restart"),
            cfg.get("freeze_non_experts", False),
            cfg["warmup_steps"],
        )
        compile_with_recipe(
            model,
            recipe,
            total_steps=total_steps,
            peak_learning_rate=cfg["learning_rate"],
            warmup_steps=warmup_steps,
            weight_decay=cfg["weight_decay"],
            loss=cfg["loss"],
            label_smoothing=cfg["label_smoothing"],
        )
    except ValueError as e:
        raise usage_error(one_line(e)) from None
    return recipe


def pass_seed(seed, pass_index):
    """Seed of pass `pass_index` over the training split.

    Example:
    >>> pass_seed(0, 3), pass_seed(1, 0)
    (3, 1000003)
    """
    return (int(seed) * 1_000_003 + int(pass_index)) % (2**31 - 1)


def training_stream(
    dataset,
    split,
    image_shape,
    batch_size,
    batches_per_pass,
    start_step=0,
    seed=0,
    augment=False,
    shuffle_buffer=MAX_SHUFFLE_BUFFER,
    data_dir=None,
    shard=None,
):
    """An endless, resumable stream of training batches as a tf.data.Dataset.

    Pass `p` over the split is `keras_vmoe.data.train_pipeline(...,
    seed=pass_seed(seed, p))`, so batch `i` of the run depends only on
    `seed` and `i`; the stream starts at batch `start_step` (it rebuilds
    the pass that contains it and skips into it).

    Args:
        dataset: str. Dataset name.
        split: str. Training split.
        image_shape: tuple. `(height, width, channels)`.
        batch_size: int.
        batches_per_pass: int. Batches in one pass (remainder dropped).
        start_step: int. First batch. Defaults to `0`.
        seed: int. Defaults to `0`.
        augment: bool. Random resized crop and flip. Defaults to `False`.
        shuffle_buffer: int. Defaults to `10_000`.
        data_dir: str or None. TFDS data directory. Defaults to `None`.
        shard: tuple `(process index, process count)` or None. Stream only
            this process's rows of every batch: `batch_size / count` rows,
            the `index`-th slice (`keras_vmoe.data.train_pipeline(shard=...)`,
            which augments only those). Defaults to `None` (whole batches).

    Returns:
        tf.data.Dataset of `(float32 images (b, h, w, c), int32 labels (b,))`,
        `b = batch_size / count`.
    """
    import tensorflow as tf

    from keras_vmoe import data

    h, w, c = image_shape
    if shard is not None:
        index, count = shard
        if batch_size % count:
            raise ValueError(
                f"batch_size {batch_size} does not split over {count} processes."
            )
        batch_size //= count
        shard = (index, count) if count > 1 else None

    def batches():
        pass_index, offset = divmod(int(start_step), batches_per_pass)
        while True:
            ds = data.train_pipeline(
                data.load(dataset, split, data_dir=data_dir),
                (h, w),
                batch_size,
                random_crop=augment,
                flip=augment,
                channels=c,
                shuffle_buffer=shuffle_buffer,
                seed=pass_seed(seed, pass_index),
                drop_remainder=True,
                shard=shard,
            )
            if offset:
                ds = ds.skip(offset)
                offset = 0
            yield from ds.as_numpy_iterator()
            pass_index += 1

    spec = (
        tf.TensorSpec((batch_size, h, w, c), tf.float32),
        tf.TensorSpec((batch_size,), tf.int32),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2)


def training_data(
    cfg, image_shape, batches_per_pass, start_step, num_train, shard=None
):
    """The run's `training_stream`, from batch `start_step` on.

    `--augment auto` is no augmentation for the bundled datasets, else
    random crop and flip. `shard=(process index, count)`: this process's
    rows of each batch.
    """
    from keras_vmoe import data

    augment = cfg["augment"]
    if augment == "auto":
        augment = "none" if cfg["dataset"] in data.BUNDLED_NAMES else "crop_flip"
    return training_stream(
        cfg["dataset"],
        cfg["train_split"],
        image_shape,
        cfg["batch_size"],
        batches_per_pass,
        start_step=start_step,
        seed=cfg["seed"],
        augment=augment == "crop_flip",
        shuffle_buffer=min(num_train, MAX_SHUFFLE_BUFFER),
        data_dir=cfg["data_dir"],
        shard=shard,
    )


def validation_data(cfg, image_shape, group_size):
    """`--eval-split` batches padded to whole groups (padding weighs 0)."""
    from keras_vmoe import data
    from keras_vmoe.evaluation import group_padded

    return group_padded(
        data.eval_pipeline(
            data.load(cfg["dataset"], cfg["eval_split"], data_dir=cfg["data_dir"]),
            image_shape[:2],
            cfg["batch_size"],
            crop_fraction=data.eval_crop_fraction(cfg["dataset"]),
            channels=image_shape[2],
        ),
        group_size,
    )


def sharded_validation_data(cfg, image_shape, group_size, num_eval, shard, mesh_batch):
    """`--eval-split` for a device mesh: this process's rows of each batch.

    Every batch must split over the mesh's batch axis (`mesh_batch` shards
    of whole routing groups) and, with several processes, each process
    feeds its rows of every batch (`batch / count`, in process order), and
    all run the same number of steps. Batches hold `--batch-size` images
    but the last, which is padded to `mesh_batch` whole groups only: its
    short last group cycles through its own images (the rule of
    `keras_vmoe.evaluation.group_padded`, so the real images are routed as
    without a mesh), then whole groups of other images follow; padded rows
    weigh 0. Only this process's rows are decoded and resized.

    Args:
        cfg: dict. The run's settings.
        image_shape: tuple. `(height, width, channels)`.
        group_size: int. Images per routing group.
        num_eval: int. Examples in the split.
        shard: tuple `(process index, process count)`.
        mesh_batch: int. Size of the mesh's batch axis (a multiple of the
            process count).

    Returns:
        tf.data.Dataset of `(images, labels, sample_weight)`.
    """
    import tensorflow as tf

    from keras_vmoe import data

    index, count = shard
    batch = cfg["batch_size"]
    unit = mesh_batch * group_size
    total = -(-num_eval // unit) * unit
    full = num_eval - num_eval % group_size
    in_groups = -(-num_eval // group_size) * group_size
    last = total - (total - 1) // batch * batch  # rows of the last batch
    raw = data.load(cfg["dataset"], cfg["eval_split"], data_dir=cfg["data_dir"])
    padded = raw
    if in_groups > num_eval:  # the short last group cycles through itself
        padded = padded.concatenate(raw.skip(full).repeat().take(in_groups - num_eval))
    if total > in_groups:  # whole groups of padding
        padded = padded.concatenate(raw.repeat().take(total - in_groups))

    def owner(i):
        # Rows of batch i // batch go to the processes in order.
        size = tf.where(
            i // batch == (total - 1) // batch,
            tf.constant(last, tf.int64),
            tf.constant(batch, tf.int64),
        )
        return i % batch // (size // count)

    def mine(ds):
        ds = ds.enumerate().filter(lambda i, e: owner(i) == index)
        return ds.map(lambda i, e: e)

    rows = batch // count
    images = data.eval_pipeline(
        mine(padded),
        image_shape[:2],
        rows,
        crop_fraction=data.eval_crop_fraction(cfg["dataset"]),
        channels=image_shape[2],
    )
    weights = mine(tf.data.Dataset.range(total)).map(
        lambda i: tf.cast(i < num_eval, tf.float32)
    )
    ds = tf.data.Dataset.zip(images, weights.batch(rows))
    ds = ds.map(lambda xy, w: (*xy, w))
    # The filters hide the length, which fit() needs to end validation
    # without a warning that the data ran out.
    return ds.apply(tf.data.experimental.assert_cardinality(-(-total // batch)))
