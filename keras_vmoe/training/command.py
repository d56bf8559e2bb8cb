"""Pre-train a classifier from a preset on a dataset, resumably, with the recipe.

    keras-vmoe train --preset vmoe_softmax_tc_s32_e32_224 --dataset animal_mnist \\
        --image-size 32 --epochs 10 --batch-size 128 --output runs/animals \\
        --fewshot digits [--resume]

The model is `from_preset(--preset, num_classes=<dataset classes>, ...)`
with `--router`, `--num-experts`, `--image-size` and `--override KEY=VALUE`
applied; it is compiled by `compile_with_recipe` (V-MoE recipe, or Soft MoE
for Soft MoE presets) and trained with `fit()` and a progress bar.
`--output` then holds:

    run.json              the run's arguments (`--resume` reuses them)
    history.json          per-epoch logs (loss, accuracy, val_*, learning_rate,
                          routing/..., fewshot/...)
    log.csv               the same, from keras.callbacks.CSVLogger
    checkpoints/best.weights.h5   best val_accuracy (ModelCheckpoint)
    backup/               BackupAndRestoreWithRNG state while the run is unfinished
    preset/               the trained model (`save_to_preset`): load it with
                          `keras_vmoe.models.from_preset("OUTPUT/preset")`

Resuming is exact: the backup holds the weights, the optimizer and the
random-seed states, and the input stream is a function of the seed and the
position in the run only (pass `p` of the training split is shuffled and
augmented with a seed derived from `--seed` and `p`), so `--resume` starts
the stream where the interrupted run's last completed epoch left it.
"""

import json
import math
import os
import shutil

from keras_vmoe.evaluation.command import (
    DEFAULT_SHOTS,
    check_dataset,
    crop_fraction_for,
    fewshot_evaluator,
    format_table,
    group_padded,
    num_classes_of,
    one_line,
    parse_int_list,
    parse_name_list,
)

# Arguments that define a run (saved in run.json) and their defaults.
DEFAULTS = {
    "preset": None,
    "dataset": None,
    "epochs": None,
    "steps": None,
    "steps_per_epoch": None,
    "batch_size": 128,
    "learning_rate": 1e-3,
    "warmup_steps": None,
    "recipe": "auto",
    "loss": "sigmoid",
    "label_smoothing": 0.0,
    "weight_decay": None,
    "router": None,
    "num_experts": None,
    "image_size": None,
    "override": [],
    "train_split": "train",
    "eval_split": "test",
    "augment": "auto",
    "fewshot": None,
    "shots": DEFAULT_SHOTS,
    "fewshot_every": 1,
    "seed": 0,
    "data_dir": None,
}
RUN_FILE = "run.json"
MAX_SHUFFLE_BUFFER = 10_000


def add_arguments(parser):
    a = parser.add_argument
    a("--preset", help="Built-in preset name (`keras-vmoe presets`) or folder.")
    a("--dataset", help="animal_mnist, digits or a prepared TFDS dataset.")
    a("--epochs", type=int, help="Passes over the training split (default 1).")
    a("--steps", type=int, help="Optimizer steps in total (instead of --epochs).")
    a(
        "--steps-per-epoch",
        type=int,
        help="Steps between epoch ends (logs, few-shot, backups); default one "
        "pass over the training split.",
    )
    a("--batch-size", type=int, help="Images per step (default 128).")
    a("--learning-rate", type=float, help="Peak learning rate (default 1e-3).")
    a("--warmup-steps", type=int, help="Default min(10000, total steps / 10).")
    a("--recipe", choices=("auto", "vmoe", "soft_moe"), help="Default auto.")
    a("--loss", choices=("sigmoid", "softmax"), help="Default sigmoid.")
    a("--label-smoothing", type=float, help="Default 0.")
    a("--weight-decay", type=float, help="Decay of every kernel (default: recipe).")
    a("--router", help="Replace the preset's router (keras_vmoe.routers.ROUTER_NAMES).")
    a("--num-experts", type=int, help="Experts per MoE layer.")
    a("--image-size", type=int, help="Input height and width.")
    a(
        "--override",
        action="append",
        metavar="KEY=VALUE",
        help="Any from_preset override (repeatable); the value is read as JSON, "
        "else as a string: num_layers=2, moe_layers=every:2, "
        'router_config={"capacity_factor":2.0}.',
    )
    a("--train-split", help="Default train.")
    a("--eval-split", help="Validation split each epoch (default test; none: off).")
    a(
        "--augment",
        choices=("auto", "none", "crop_flip"),
        help="Random crop and flip (auto: none for bundled datasets).",
    )
    a("--fewshot", help="Comma-separated datasets for few-shot accuracy each epoch.")
    a("--shots", help=f"Few-shot shots per class (default {DEFAULT_SHOTS}).")
    a("--fewshot-every", type=int, help="Few-shot every n epochs (default 1).")
    a("--seed", type=int, help="Initialisation, noise and data seed (default 0).")
    a("--data-dir", help="TFDS data directory.")
    a("--output", help="Run folder (default runs/PRESET-DATASET).")
    a("--resume", action="store_true", help="Continue the run in --output.")
    a("--overwrite", action="store_true", help="Replace a finished run in --output.")
    a("--verbose", type=int, choices=(0, 1, 2), default=1, help="fit() verbosity.")


# ----------------------------------------------------------------------------
# Validation (cheap, before any model or data is built).
# ----------------------------------------------------------------------------
def _usage(message):
    from keras_vmoe.cli import UsageError

    return UsageError(message)


def _check_writable(path):
    """Raises UsageError unless `path` is, or can be made, a writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise _usage(f"--output {path!r} exists and is not a folder.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise _usage(
            f"--output {path!r} is not writable ({parent!r} is not a writable folder)."
        )


def _parse_overrides(items):
    overrides = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise _usage(f"--override must be KEY=VALUE, got {item!r}.")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def _resolve(args):
    """The run's settings: defaults < run.json (on --resume) < the command line."""
    given = {k: getattr(args, k, None) for k in DEFAULTS}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume and args.overwrite:
        raise _usage("give --resume or --overwrite, not both.")
    output = args.output
    saved = None
    if args.resume:
        if output is None:
            raise _usage("--resume needs the --output folder of the run.")
        path = os.path.join(output, RUN_FILE)
        if not os.path.isfile(path):
            raise _usage(f"nothing to resume: {path!r} does not exist.")
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)["arguments"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _usage(f"cannot read {path!r}: {one_line(e)}") from None
        changed = sorted(k for k, v in given.items() if k in saved and saved[k] != v)
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise _usage(
                f"--resume continues the saved run; {flags} differ from {path!r}."
            )
    cfg = {**DEFAULTS, **(saved or {}), **given}
    for key in ("preset", "dataset"):
        if not cfg[key]:
            raise _usage(f"--{key} is required.")
    for key, minimum in (
        ("epochs", 1),
        ("steps", 1),
        ("steps_per_epoch", 1),
        ("batch_size", 1),
        ("warmup_steps", 0),
        ("num_experts", 1),
        ("image_size", 1),
        ("fewshot_every", 1),
        ("seed", 0),
    ):
        if cfg[key] is not None and cfg[key] < minimum:
            flag = "--" + key.replace("_", "-")
            raise _usage(f"{flag} must be >= {minimum}, got {cfg[key]}.")
    if cfg["epochs"] is not None and cfg["steps"] is not None:
        raise _usage("give --epochs or --steps, not both.")
    if not cfg["learning_rate"] > 0:
        raise _usage(f"--learning-rate must be > 0, got {cfg['learning_rate']}.")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise _usage(
            f"--label-smoothing must be in [0, 1), got {cfg['label_smoothing']}."
        )
    if cfg["weight_decay"] is not None and cfg["weight_decay"] < 0:
        raise _usage(f"--weight-decay must be >= 0, got {cfg['weight_decay']}.")
    cfg["shots_list"] = parse_int_list(cfg["shots"], "--shots")
    cfg["fewshot_list"] = (
        parse_name_list(cfg["fewshot"], "--fewshot") if cfg["fewshot"] else ()
    )
    cfg["overrides"] = _parse_overrides(cfg["override"])
    if "num_classes" in cfg["overrides"]:
        raise _usage("num_classes comes from --dataset; do not override it.")
    for key in ("router", "num_experts", "image_size"):
        if cfg[key] is not None:
            cfg["overrides"][key] = cfg[key]
    if cfg["router"] is not None:
        from keras_vmoe.routers import ROUTER_NAMES

        if cfg["router"] not in ROUTER_NAMES:
            raise _usage(
                f"unknown --router {cfg['router']!r}; choose from {', '.join(ROUTER_NAMES)}."
            )
    if output is None:
        name = os.path.basename(os.path.normpath(str(cfg["preset"])))
        output = os.path.join("runs", f"{name}-{cfg['dataset']}")
    _check_writable(output)
    if not args.resume and not args.overwrite:
        if os.path.exists(os.path.join(output, RUN_FILE)):
            raise _usage(
                f"--output {output!r} already holds a run: pass --resume to continue "
                "it, --overwrite to replace it, or another --output."
            )
    if args.resume:
        backup = os.path.join(output, "backup")
        if not os.path.isdir(backup) and os.path.isdir(os.path.join(output, "preset")):
            raise _usage(f"the run in {output!r} has finished; nothing to resume.")
    cfg["output"] = output
    cfg["resume"] = bool(args.resume)
    cfg["verbose"] = args.verbose
    return cfg


def _run_arguments(cfg):
    return {k: cfg[k] for k in DEFAULTS}


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------
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

    Returns:
        tf.data.Dataset of `(float32 images (B, h, w, c), int32 labels (B,))`.
    """
    import tensorflow as tf

    from keras_vmoe import data

    h, w, c = image_shape

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


# ----------------------------------------------------------------------------
# Callbacks.
# ----------------------------------------------------------------------------
def _callback_classes():
    import keras

    class StopAtStep(keras.callbacks.Callback):
        """Stops `fit()` after `total_steps` optimizer steps."""

        def __init__(self, total_steps):
            super().__init__()
            self.total_steps = total_steps

        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations) >= self.total_steps:
                self.model.stop_training = True

    class HistoryFile(keras.callbacks.Callback):
        """Adds `learning_rate` to the logs; writes `history.json` every epoch.

        The file is a dict of lists like `History.history`, plus `epoch`
        (1-based); a metric missing at an epoch is `null`. On resume, epochs
        from `initial_epoch` on are dropped before new ones are appended.
        """

        def __init__(self, path, initial_epoch):
            super().__init__()
            self.path = path
            self.history = {}
            if initial_epoch and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
                keep = sum(1 for e in old.get("epoch", []) if e <= initial_epoch)
                self.history = {k: list(v[:keep]) for k, v in old.items()}

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            import keras

            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
            n = len(self.history.get("epoch", []))
            entry = {"epoch": epoch + 1}
            for key, value in logs.items():
                try:
                    entry[key] = float(keras.ops.convert_to_numpy(value))
                except (TypeError, ValueError):
                    continue
            for key in set(self.history) | set(entry):
                column = self.history.setdefault(key, [None] * n)
                column.append(entry.get(key))
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.history, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)

    return StopAtStep, HistoryFile


def _truncate_csv(path, initial_epoch):
    """Keeps the header and the rows of epochs < initial_epoch (0-based)."""
    if not os.path.isfile(path):
        return
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < initial_epoch]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(kept)


def _best_so_far(history_path, monitor, initial_epoch):
    if not initial_epoch or not os.path.isfile(history_path):
        return None
    with open(history_path, encoding="utf-8") as f:
        values = json.load(f).get(monitor, [])[:initial_epoch]
    values = [v for v in values if v is not None]
    return max(values) if values else None


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------
def _build_model(cfg, num_classes):
    from keras_vmoe.models import preset_loader

    try:
        folder = preset_loader.resolve_preset(cfg["preset"])
        task = preset_loader.read_json(folder, "task.json", required=False) or {}
    except ValueError as e:
        raise _usage(one_line(e)) from None
    overrides = dict(cfg["overrides"])
    # Keep a trained preset's head when it already has the dataset's classes
    # (overriding `num_classes` re-initialises the head).
    if task.get("config", {}).get("num_classes") != num_classes:
        overrides["num_classes"] = num_classes
    try:
        return preset_loader.load_classifier(folder, **overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise _usage(
            f"cannot build the model from --preset and --override: {one_line(e)}"
        ) from None


def _plan(cfg, num_train):
    """(steps per epoch, epochs, total steps, batches per pass)."""
    batch = cfg["batch_size"]
    per_pass = num_train // batch
    if per_pass < 1:
        raise _usage(
            f"--batch-size {batch} is larger than the training split "
            f"({num_train} examples)."
        )
    if cfg["steps"] is not None:
        total = cfg["steps"]
        spe = cfg["steps_per_epoch"] or min(total, per_pass)
        epochs = math.ceil(total / spe)
    else:
        epochs = cfg["epochs"] or 1
        spe = cfg["steps_per_epoch"] or per_pass
        total = epochs * spe
    return spe, epochs, total, per_pass


def run(args, callbacks=None):
    """Runs `keras-vmoe train` (see the module docstring).

    Every argument is checked before the model or the data are built; a bad
    one raises `keras_vmoe.cli.UsageError` (one line, exit status 2).

    Args:
        args: argparse.Namespace. Parsed by the parser that `add_arguments`
            filled (`keras_vmoe.cli.build_parser().parse_args([...])`).
        callbacks: list of keras.callbacks.Callback. Extra callbacks for
            `fit()`, placed before the backup callback. Defaults to `None`.

    Returns:
        int, the exit status (0).

    Example:

    ```python
    import keras
    from keras_vmoe import cli
    from keras_vmoe.training import command

    args = cli.build_parser().parse_args(
        ["train", "--preset", "vit_dense_s32_224", "--dataset", "digits",
         "--image-size", "32", "--epochs", "2", "--output", "runs/digits"])
    command.run(args, callbacks=[keras.callbacks.TerminateOnNaN()])
    ```
    """
    cfg = _resolve(args)
    out = cfg["output"]
    num_train = check_dataset(cfg["dataset"], cfg["train_split"], cfg["data_dir"])
    evaluate = str(cfg["eval_split"]).lower() != "none"
    if evaluate:
        check_dataset(cfg["dataset"], cfg["eval_split"], cfg["data_dir"])
    for name in cfg["fewshot_list"]:
        check_dataset(name, "train", cfg["data_dir"])
        check_dataset(name, "test", cfg["data_dir"])
    if num_train is None:
        raise _usage(f"the size of {cfg['dataset']}:{cfg['train_split']} is unknown.")
    spe, epochs, total, per_pass = _plan(cfg, num_train)

    import keras

    from keras_vmoe import data
    from keras_vmoe.callbacks import RoutingStatistics
    from keras_vmoe.evaluation.command import model_group_size, model_image_shape
    from keras_vmoe.training.recipe import BackupAndRestoreWithRNG, compile_with_recipe

    keras.utils.set_random_seed(cfg["seed"])
    num_classes = num_classes_of(cfg["dataset"], cfg["data_dir"])
    model = _build_model(cfg, num_classes)
    group = model_group_size(model)
    if cfg["batch_size"] % group:
        raise _usage(
            f"--batch-size {cfg['batch_size']} must be a multiple of the model's "
            f"routing group of {group} images."
        )
    recipe = cfg["recipe"]
    if recipe == "auto":
        backbone = model.backbone
        soft = backbone.router == "soft" and backbone.pooling == "gap"
        recipe = "soft_moe" if soft else "vmoe"
    try:
        compile_with_recipe(
            model,
            recipe,
            total_steps=total,
            peak_learning_rate=cfg["learning_rate"],
            warmup_steps=cfg["warmup_steps"],
            weight_decay=cfg["weight_decay"],
            loss=cfg["loss"],
            label_smoothing=cfg["label_smoothing"],
        )
    except ValueError as e:
        raise _usage(one_line(e)) from None
    image_shape = model_image_shape(model)
    evaluator = None
    if cfg["fewshot_list"]:
        try:
            evaluator = fewshot_evaluator(
                cfg["fewshot_list"],
                image_shape,
                group,
                cfg["shots_list"],
                seed=cfg["seed"],
                data_dir=cfg["data_dir"],
                every_n_epochs=cfg["fewshot_every"],
            )
        except ValueError as e:
            raise _usage(f"--fewshot: {one_line(e)}") from None

    # === The run folder ===
    backup_dir = os.path.join(out, "backup")
    os.makedirs(out, exist_ok=True)
    if not cfg["resume"]:
        for entry in ("backup", "preset", "checkpoints"):
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)
        for entry in ("history.json", "log.csv"):
            if os.path.exists(os.path.join(out, entry)):
                os.remove(os.path.join(out, entry))
        with open(os.path.join(out, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump({"arguments": _run_arguments(cfg)}, f, indent=2)
    start = BackupAndRestoreWithRNG.resume_epoch(backup_dir) if cfg["resume"] else 0
    history_path = os.path.join(out, "history.json")
    csv_path = os.path.join(out, "log.csv")
    _truncate_csv(csv_path, start)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)

    # === Data ===
    augment = cfg["augment"]
    if augment == "auto":
        augment = "none" if cfg["dataset"] in data.BUNDLED_NAMES else "crop_flip"
    train = training_stream(
        cfg["dataset"],
        cfg["train_split"],
        image_shape,
        cfg["batch_size"],
        per_pass,
        start_step=start * spe,
        seed=cfg["seed"],
        augment=augment == "crop_flip",
        shuffle_buffer=min(num_train, MAX_SHUFFLE_BUFFER),
        data_dir=cfg["data_dir"],
    )
    validation = None
    if evaluate:
        validation = group_padded(
            data.eval_pipeline(
                data.load(cfg["dataset"], cfg["eval_split"], data_dir=cfg["data_dir"]),
                image_shape[:2],
                cfg["batch_size"],
                crop_fraction=crop_fraction_for(cfg["dataset"]),
                channels=image_shape[2],
            ),
            group,
        )

    # === Callbacks ===
    StopAtStep, HistoryFile = _callback_classes()
    monitor = "val_accuracy" if evaluate else "accuracy"
    backup = BackupAndRestoreWithRNG(backup_dir, delete_checkpoint=False)
    cbs = [RoutingStatistics()]
    if evaluator is not None:
        cbs.append(evaluator)
    if total % spe:
        cbs.append(StopAtStep(total))
    cbs += [
        HistoryFile(history_path, start),
        keras.callbacks.CSVLogger(csv_path, append=start > 0),
        keras.callbacks.ModelCheckpoint(
            os.path.join(out, "checkpoints", "best.weights.h5"),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=_best_so_far(history_path, monitor, start),
        ),
        *(callbacks or ()),
        backup,
    ]

    print(
        f"train: {cfg['preset']} ({model.count_params():,} parameters, "
        f"recipe {recipe}) on {cfg['dataset']}:{cfg['train_split']} "
        f"({num_train} images, {num_classes} classes), {total} steps of "
        f"{cfg['batch_size']} = {epochs} epoch{'s' * (epochs != 1)} of {spe} steps"
        + (f", resuming at epoch {start + 1}" if start else "")
        + f"; output {out}"
    )
    if start < epochs:
        model.fit(
            train,
            epochs=epochs,
            steps_per_epoch=spe,
            validation_data=validation,
            callbacks=cbs,
            shuffle=False,  # the stream is shuffled (and must keep its order)
            verbose=cfg["verbose"],
        )
    else:  # Every epoch ran; the run stopped before saving the preset.
        backup.set_model(model)
        backup.on_train_begin()

    # === The trained preset ===
    from keras_vmoe.models.atomic import atomic_directory

    preset_dir = os.path.join(out, "preset")
    # The preset is for inference and fine-tuning: leave the optimizer state
    # out of it (Adam would triple its size). Training has ended, so the
    # default compile() can replace the recipe's optimizer.
    model.compile()
    history = {}
    if os.path.isfile(history_path):
        with open(history_path, encoding="utf-8") as f:
            history = json.load(f)
    final = {k: v[-1] for k, v in history.items() if v and v[-1] is not None}
    # Weights and metadata are written into a temporary folder that replaces
    # `preset/` only when complete; the backup goes only after that.
    with atomic_directory(preset_dir) as staging:
        model.save_to_preset(staging)
        _write_metadata(staging, model, cfg, recipe, total, epochs, final)
    shutil.rmtree(backup_dir, ignore_errors=True)
    final.pop("epoch", None)
    print(f"saved the trained preset to {preset_dir}")
    if final:
        print(format_table(final))
    return 0


def _write_metadata(preset_dir, model, cfg, recipe, total, epochs, final):
    """Adds sizes, cost and the training run to the preset's metadata.json."""
    from keras_vmoe.models import cost

    path = os.path.join(preset_dir, "metadata.json")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    backbone_config = model.backbone.get_config()
    resolved = cost.resolve_backbone_config(backbone_config)
    d = resolved["hidden_dim"]
    rep = getattr(model, "representation_size", None)
    params = cost.count_backbone_params(backbone_config)
    flops = cost.backbone_flops(backbone_config)
    meta.update(
        {
            "name": os.path.basename(os.path.normpath(cfg["output"])),
            "description": (
                f"{cfg['preset']} trained on {cfg['dataset']} for {total} steps "
                "by keras-vmoe train."
            ),
            "parameter_count": params,
            "classifier_parameter_count": params
            + cost.count_head_params(d, model.num_classes, rep),
            "flops_per_image": flops,
            "classifier_flops_per_image": flops
            + cost.head_flops(d, model.num_classes, rep),
            "router": resolved["router"],
            "num_experts": resolved["num_experts"],
            "moe_layers": list(resolved["moe_indices"]),
            "sequence_length": resolved["seq_len"],
            "weights": "trained",
            "training": {
                "dataset": cfg["dataset"],
                "train_split": cfg["train_split"],
                "eval_split": cfg["eval_split"],
                "recipe": recipe,
                "steps": total,
                "epochs": epochs,
                "batch_size": cfg["batch_size"],
                "learning_rate": cfg["learning_rate"],
                "seed": cfg["seed"],
                "source_preset": str(cfg["preset"]),
                "final_metrics": final,
            },
        }
    )
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=4)
