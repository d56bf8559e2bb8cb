"""The run folder of `keras-vmoe train`: logs, checkpoints, the trained preset.

    run.json              the run's arguments and device layout (`--resume`
                          reuses them)
    history.json          per-epoch logs (`HistoryFile`)
    log.csv               the same, from keras.callbacks.CSVLogger
    tensorboard/          the same as TensorBoard scalars (with --tensorboard)
    checkpoints/best.weights.h5   best val_accuracy (ModelCheckpoint)
    backup/               BackupAndRestoreWithRNG state while the run is unfinished
    preset/               the trained model (`save_trained_preset`)

On a device mesh (JAX, `keras_vmoe.cli.train_distribution`), the weights
are sharded, possibly across processes: `backup/` is then an Orbax
checkpoint (`OrbaxBackupAndRestore`), the best weights are
`checkpoints/best/<epoch>/` (`keras.callbacks.OrbaxCheckpoint`), each
process writing its own shards; only process 0 writes the logs and the
preset.

On `--resume`, the logs are cut back to the epoch the backup resumes from.
"""

import csv
import json
import os
import shutil

import keras

from keras_vmoe.cli.train_arguments import RUN_FILE, run_arguments


def prepare_run_folder(cfg, layout=None):
    """Creates the run folder and writes run.json; a new run clears an old one.

    run.json holds the run's arguments (`--resume` reuses them) and, as
    `layout`, the devices this start of the run trains on
    (`keras_vmoe.cli.train_distribution.layout_record`), which `--resume`
    reuses too. It is rewritten atomically on every start.
    """
    out = cfg["output"]
    os.makedirs(out, exist_ok=True)
    if not cfg["resume"]:
        for entry in ("backup", "preset", "checkpoints", "tensorboard"):
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)
        for entry in ("history.json", "log.csv"):
            if os.path.exists(os.path.join(out, entry)):
                os.remove(os.path.join(out, entry))
    record = {"arguments": run_arguments(cfg)}
    if layout is not None:
        record["layout"] = layout
    path = os.path.join(out, RUN_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)


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
    With `tensorboard_dir`, every number of the epoch's logs is also written
    there as a TensorBoard scalar (tag = log key, step = 0-based epoch, as
    `keras.callbacks.TensorBoard` counts), without the `tensorboard` package.
    """

    def __init__(self, path, initial_epoch, tensorboard_dir=None):
        super().__init__()
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self._writer = None
        self.history = {}
        if initial_epoch and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            keep = sum(1 for e in old.get("epoch", []) if e <= initial_epoch)
            self.history = {k: list(v[:keep]) for k, v in old.items()}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
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
        if self.tensorboard_dir is not None:
            from keras_vmoe.callbacks.routing import write_scalars

            if self._writer is None:
                import tensorflow as tf

                self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
            scalars = {k: v for k, v in entry.items() if k != "epoch"}
            write_scalars(self._writer, scalars, epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def truncate_csv(path, initial_epoch):
    """Keeps the header and the rows of epochs < initial_epoch (0-based)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < initial_epoch]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(kept)


def best_so_far(history_path, monitor, initial_epoch):
    """The best `monitor` value of the epochs before `initial_epoch`, or None."""
    if not initial_epoch or not os.path.isfile(history_path):
        return None
    with open(history_path, encoding="utf-8") as f:
        values = json.load(f).get(monitor, [])[:initial_epoch]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def backup_class(sharded):
    """`OrbaxBackupAndRestore` on a device mesh, else `BackupAndRestoreWithRNG`."""
    if sharded:
        from keras_vmoe.training.orbax_backup import OrbaxBackupAndRestore

        return OrbaxBackupAndRestore
    from keras_vmoe.training.recipe import BackupAndRestoreWithRNG

    return BackupAndRestoreWithRNG


def resume_epoch(backup_dir, sharded):
    """The epoch the backup in `backup_dir` resumes at (0: none).

    Raises `UsageError` when the backup was written in the other format
    (with or without a device mesh) than this run would read.
    """
    from keras_vmoe.cli.train_arguments import usage_error
    from keras_vmoe.training.orbax_backup import OrbaxBackupAndRestore
    from keras_vmoe.training.recipe import BackupAndRestoreWithRNG

    orbax = OrbaxBackupAndRestore.resume_epoch(backup_dir)
    h5 = BackupAndRestoreWithRNG.resume_epoch(backup_dir)
    if sharded and h5 and not orbax:
        raise usage_error(
            f"the backup in {backup_dir!r} was written on one device; resume "
            "it with --no-distribution."
        )
    if not sharded and orbax and not h5:
        raise usage_error(
            f"the backup in {backup_dir!r} was written on a device mesh; resume "
            "it on the JAX backend without --no-distribution."
        )
    return orbax if sharded else h5


def exportable_model(model, cfg, num_classes, num_processes):
    """`model`, or with several processes a one-device copy on process 0.

    A weight sharded across processes cannot be written by one of them:
    every process gathers each weight (a collective, at the end of the run
    only), and process 0 puts them into the same model built without a
    device mesh. Other processes get `None`.
    """
    if num_processes == 1:
        return model
    import jax
    from jax.experimental import multihost_utils

    from keras_vmoe.cli.train_setup import build_model

    values = [
        multihost_utils.process_allgather(w.value, tiled=True) for w in model.weights
    ]
    if jax.process_index() != 0:
        return None
    with no_distribution():
        plain = build_model(cfg, num_classes)
    plain.set_weights(values)
    return plain


class no_distribution:
    """Runs its block without the run's distribution (restored on exit)."""

    def __enter__(self):
        self._previous = keras.distribution.distribution()
        keras.distribution.set_distribution(None)

    def __exit__(self, *exc):
        keras.distribution.set_distribution(self._previous)


def run_callbacks(
    out, start, monitor, extra, backup, tensorboard=False, chief=True, sharded=False
):
    """The logging callbacks of the run, then `extra`, then `backup`.

    Args:
        out: str. The run folder.
        start: int. First epoch of this `fit()` (0, or the resumed epoch).
        monitor: str. Metric that picks `checkpoints/best.weights.h5`.
        extra: list of callbacks. Placed before the backup.
        backup: `BackupAndRestoreWithRNG` or `OrbaxBackupAndRestore`. Last,
            so it saves after the rest.
        tensorboard: bool. Also write the epoch logs to `out/tensorboard`.
        chief: bool. This process writes the logs (process 0). Defaults to
            `True`.
        sharded: bool. The weights are sharded on a device mesh: the best
            weights go to an Orbax checkpoint, written by every process.
            Defaults to `False`.
    """
    history_path = os.path.join(out, "history.json")
    csv_path = os.path.join(out, "log.csv")
    tensorboard_dir = os.path.join(out, "tensorboard") if tensorboard else None
    threshold = best_so_far(history_path, monitor, start)
    if sharded:
        best = keras.callbacks.OrbaxCheckpoint(
            os.path.abspath(os.path.join(out, "checkpoints", "best")),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            save_on_background=False,
            initial_value_threshold=threshold,
        )
    else:
        best = keras.callbacks.ModelCheckpoint(
            os.path.join(out, "checkpoints", "best.weights.h5"),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=threshold,
        )
    logs = []
    if chief:
        logs = [
            HistoryFile(history_path, start, tensorboard_dir),
            keras.callbacks.CSVLogger(csv_path, append=start > 0),
        ]
    return [*logs, best, *extra, backup]


def save_trained_preset(model, cfg, recipe, total, epochs):
    """Writes `preset/` atomically, then deletes `backup/`.

    Returns:
        `(preset folder, final metrics)`: the last value of each metric in
        `history.json`.
    """
    from keras_vmoe.utils.atomic import atomic_directory

    out = cfg["output"]
    preset_dir = os.path.join(out, "preset")
    history_path = os.path.join(out, "history.json")
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
        write_metadata(staging, model, cfg, recipe, total, epochs, final)
    shutil.rmtree(os.path.join(out, "backup"), ignore_errors=True)
    final.pop("epoch", None)
    return preset_dir, final


def write_metadata(preset_dir, model, cfg, recipe, total, epochs, final):
    """Adds sizes, cost and the training run to the preset's metadata.json."""
    from keras_vmoe.models.vision_moe.presets import add_preset_metadata

    add_preset_metadata(
        preset_dir,
        model,
        name=os.path.basename(os.path.normpath(cfg["output"])),
        description=(
            f"{cfg['preset']} trained on {cfg['dataset']} for {total} steps "
            "by keras-vmoe train."
        ),
        weights="trained",
        training={
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
    )
