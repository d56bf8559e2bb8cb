"""Model and data set-up of `keras-vmoe train`.

`build_model` and `compile_for_run` make the classifier from the run's
settings (`keras_vmoe.cli.train_arguments`), `detach_preprocessor` keeps
its preprocessor out of training on the pipelines' preprocessed batches;
`training_stream` is the endless, resumable stream of training batches,
and `validation_data` the evaluation split padded to whole routing groups
(`keras_vmoe.evaluation.group_padded`, the padding rule of
`keras_vmoe.evaluation.predict_in_groups`).

Both cut their split into `--data-shards` contiguous blocks (the *data
shards*; by default one per process) and build every batch from equal row
blocks of each: a process of a multi-process run reads only the records
of its own data shards, and the batches are the same whatever devices or
processes a run of the same data shards has.
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


def shard_seed(seed, pass_index, data_shard):
    """Seed of data shard `data_shard` in pass `pass_index`.

    Shard 0's is the pass's seed, so a run of one data shard streams what
    it streamed before shards existed.

    Example:
    >>> shard_seed(0, 3, 0) == pass_seed(0, 3), shard_seed(0, 3, 1)
    (True, 499982)
    """
    return (pass_seed(seed, pass_index) + 499_979 * int(data_shard)) % (2**31 - 1)


def owned_shards(data_shards, shard):
    """The data shards that process `index` of `count` reads, in order.

    Example:
    >>> list(owned_shards(4, (1, 2))), list(owned_shards(2, None))
    ([2, 3], [0, 1])
    """
    index, count = shard if shard is not None else (0, 1)
    if data_shards % count:
        raise ValueError(
            f"{data_shards} data shards do not split over {count} processes."
        )
    per = data_shards // count
    return range(index * per, (index + 1) * per)


def _concat_rows(parts):
    """Zips datasets of equal-length batches and concatenates their rows."""
    import tensorflow as tf

    if len(parts) == 1:
        return parts[0]
    return tf.data.Dataset.zip(tuple(parts)).map(
        lambda *batches: tuple(
            tf.concat([b[k] for b in batches], axis=0) for k in range(len(batches[0]))
        )
    )


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
    data_shards=1,
    shard=None,
):
    """An endless, resumable stream of training batches as a tf.data.Dataset.

    The split is cut into `data_shards` contiguous blocks of records
    (`keras_vmoe.data.split_block`), the *data shards*. Row block `m` of
    every batch (`batch_size / data_shards` rows) comes from data shard
    `m`: pass `p` over shard `m` is `keras_vmoe.data.train_pipeline(...,
    seed=shard_seed(seed, p, m))`, which shuffles and augments the block
    on its own. So batch `i` of the run depends only on `seed`,
    `data_shards` and `i` (not on devices or processes), and the stream
    starts at batch `start_step` (it rebuilds the pass that contains it
    and skips into it). With one data shard this is one pipeline over the
    whole split.

    With `shard=(index, count)`, a process streams only its rows of every
    batch: those of data shards `index * data_shards / count` to
    `(index + 1) * data_shards / count - 1` (`owned_shards`), which are the
    `index`-th of `count` equal slices of the batch, and it reads, decodes
    and augments only the records of those shards. A single process with
    the same `data_shards` streams the same batches whole.

    Args:
        dataset: str. Dataset name.
        split: str. Training split.
        image_shape: tuple. `(height, width, channels)`.
        batch_size: int. Images per (global) batch, a multiple of
            `data_shards`.
        batches_per_pass: int. Batches in one pass (at most the split's
            examples // `batch_size`; the remainder of each block is
            dropped).
        start_step: int. First batch. Defaults to `0`.
        seed: int. Defaults to `0`.
        augment: bool. Random resized crop and flip. Defaults to `False`.
        shuffle_buffer: int. Shuffle buffer of the whole stream: each data
            shard shuffles with `shuffle_buffer // data_shards`. Defaults
            to `10_000`.
        data_dir: str or None. TFDS data directory. Defaults to `None`.
        data_shards: int. Blocks of the split that feed each batch.
            Defaults to `1`.
        shard: tuple `(process index, process count)` or None. Stream
            this process's rows only; `count` must divide `data_shards`.
            Defaults to `None` (whole batches).

    Returns:
        tf.data.Dataset of `(float32 images (b, h, w, c), int32 labels (b,))`,
        `b = batch_size / count`.

    Example:

    ```python
    # What process 1 of 2 feeds: rows 8..15 of each batch of 16, read
    # from the second half of the split only.
    ds = training_stream("digits", "train", (8, 8, 1), 16, 89,
                         data_shards=2, shard=(1, 2))
    ```
    """
    import tensorflow as tf

    from keras_vmoe import data

    h, w, c = image_shape
    if batch_size % data_shards:
        raise ValueError(
            f"batch_size {batch_size} does not split over {data_shards} data shards."
        )
    mine = owned_shards(data_shards, shard)
    rows = batch_size // data_shards
    if data_shards == 1:
        splits = [split]
    else:
        splits = [
            data.split_block(dataset, split, m, data_shards, data_dir) for m in mine
        ]

    def batches():
        pass_index, offset = divmod(int(start_step), batches_per_pass)
        while True:
            parts = [
                data.train_pipeline(
                    data.load(dataset, block, data_dir=data_dir),
                    (h, w),
                    rows,
                    random_crop=augment,
                    flip=augment,
                    channels=c,
                    shuffle_buffer=max(1, shuffle_buffer // data_shards),
                    seed=shard_seed(seed, pass_index, m),
                    drop_remainder=True,
                    prefetch=False,
                ).take(batches_per_pass)
                for m, block in zip(mine, splits)
            ]
            ds = _concat_rows(parts).prefetch(2)
            if offset:
                ds = ds.skip(offset)
                offset = 0
            yield from ds.as_numpy_iterator()
            pass_index += 1

    size = rows * len(mine)
    spec = (
        tf.TensorSpec((size, h, w, c), tf.float32),
        tf.TensorSpec((size,), tf.int32),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2)


def training_data(
    cfg, image_shape, batches_per_pass, start_step, num_train, shard=None
):
    """The run's `training_stream`, from batch `start_step` on.

    `--augment auto` is no augmentation for the bundled datasets, else
    random crop and flip. `--data-shards` (`cfg["data_shards"]`) blocks of
    the split feed each batch; `shard=(process index, count)`: this
    process's rows of each batch, read from its data shards only.
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
        data_shards=cfg.get("data_shards") or 1,
        shard=shard,
    )


def validation_data(cfg, image_shape, group_size, num_eval, shard=None, mesh_batch=1):
    """`--eval-split` batches of whole routing groups; padding weighs 0.

    The split is cut into `--data-shards` (`cfg["data_shards"]`, `M`)
    contiguous blocks, as for training, and row block `m` of every batch
    (`--batch-size / M` rows) comes from block `m`: so each process of a
    multi-process run reads and decodes only its own blocks
    (`shard=(process index, count)`, the data shards of `owned_shards`),
    and every layout of the same `M` (one device, a mesh, several
    processes) routes the same groups. Each block is padded on its own:
    its short last group cycles through its own images (the rule of
    `keras_vmoe.evaluation.group_padded`, which this is with one block),
    then whole groups of its images follow until every block has the same
    length, a multiple of what lets each batch split into `mesh_batch`
    shards of whole groups. Padded rows weigh 0, and whole groups of
    padding do not change the routing of the real images, so the metrics
    do not depend on `mesh_batch` or the processes.

    Args:
        cfg: dict. The run's settings (`batch_size`, `dataset`,
            `eval_split`, `data_dir`, `data_shards`).
        image_shape: tuple. `(height, width, channels)`.
        group_size: int. Images per routing group; `--batch-size` must be a
            multiple of `M * group_size`.
        num_eval: int. Examples in the split (at least `M`).
        shard: tuple `(process index, process count)` or None. Defaults to
            `None` (whole batches).
        mesh_batch: int. Size of the mesh's batch axis. Defaults to `1`.

    Returns:
        tf.data.Dataset of `(images, labels, sample_weight)`, this
        process's rows of each batch.

    Example:

    ```python
    cfg = {"batch_size": 12, "dataset": "digits", "eval_split": "test[:20]",
           "data_dir": None, "data_shards": 2}
    # Process 0 of 2: rows 0..5 of each batch, from test[0:10] only.
    ds = validation_data(cfg, (8, 8, 1), 3, 20, shard=(0, 2), mesh_batch=2)
    ```
    """
    import math

    import tensorflow as tf

    from keras_vmoe import data

    count_m = cfg.get("data_shards") or 1
    g = group_size
    batch = cfg["batch_size"]
    if batch % (count_m * g):
        raise ValueError(
            f"batch_size {batch} is not {count_m} data shards of whole groups of {g}."
        )
    rows = batch // count_m
    bounds = [data.block_bounds(num_eval, m, count_m) for m in range(count_m)]
    sizes = [hi - lo for lo, hi in bounds]
    if min(sizes) < 1:
        raise ValueError(
            f"{num_eval} evaluation examples cannot fill {count_m} data shards."
        )
    unit = math.lcm(g, mesh_batch * g // math.gcd(count_m, mesh_batch * g))
    longest = max(-(-n // g) * g for n in sizes)
    length = -(-longest // unit) * unit  # rows of every padded block

    def block(m):
        n = sizes[m]
        split = cfg["eval_split"]
        if count_m > 1:
            split = data.split_block(cfg["dataset"], split, m, count_m, cfg["data_dir"])
        raw = data.load(cfg["dataset"], split, data_dir=cfg["data_dir"])
        full = n - n % g
        in_groups = -(-n // g) * g
        padded = raw
        if in_groups > n:  # the short last group cycles through itself
            padded = padded.concatenate(raw.skip(full).repeat().take(in_groups - n))
        if length > in_groups:  # whole groups of padding
            padded = padded.concatenate(raw.repeat().take(length - in_groups))
        images = data.eval_pipeline(
            padded,
            image_shape[:2],
            rows,
            crop_fraction=data.eval_crop_fraction(cfg["dataset"]),
            channels=image_shape[2],
            prefetch=False,
        )
        weights = tf.data.Dataset.range(length).map(
            lambda i: tf.cast(i < n, tf.float32)
        )
        return tf.data.Dataset.zip(images, weights.batch(rows)).map(
            lambda xy, w: (*xy, w)
        )

    parts = [block(m) for m in owned_shards(count_m, shard)]
    return _concat_rows(parts).prefetch(tf.data.AUTOTUNE)
