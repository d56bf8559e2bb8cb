"""Pre-train a classifier from a preset on a dataset, resumably, with the recipe.

    keras-vmoe train --preset vmoe_softmax_tc_s32_e32_224 --dataset animal_mnist \\
        --image-size 32 --epochs 10 --batch-size 128 --output runs/animals \\
        --fewshot digits [--resume]

The model is `from_preset(--preset, num_classes=<dataset classes>, ...)`
with `--router`, `--num-experts`, `--image-size` and `--override KEY=VALUE`
applied; it is compiled by `compile_with_recipe` (V-MoE recipe, or Soft MoE
for Soft MoE presets) and trained with `fit()` and a progress bar.
`--output` then holds:

    run.json              the run's arguments and device layout (`--resume`
                          reuses them)
    history.json          per-epoch logs (loss, accuracy, val_*, learning_rate,
                          routing/..., fewshot/...)
    log.csv               the same, from keras.callbacks.CSVLogger
    tensorboard/          the same as TensorBoard scalars (with --tensorboard)
    checkpoints/best.weights.h5   best val_accuracy (ModelCheckpoint)
    backup/               BackupAndRestoreWithRNG state while the run is unfinished
    preset/               the trained model (`save_to_preset`): load it with
                          `keras_vmoe.models.from_preset("OUTPUT/preset")`

On the JAX backend the run uses every device it sees, on a `(batch,
expert)` mesh (`--mesh`, `--no-distribution`), and one process per host
with `--coordinator HOST:PORT --num-processes N --process-id I`
(`keras_vmoe.cli.train_distribution`); `backup/` and the best weights are
then Orbax checkpoints (`checkpoints/best/<epoch>/`) written shard by shard,
and process 0 alone writes the logs and the preset. Each process reads
only its own `--data-shards` (contiguous blocks of the splits; one per
process by default) and feeds its rows of every batch; validation and
few-shot features are computed by all processes together, on the mesh.

Resuming is exact: the backup holds the weights, the optimizer and the
random-seed states, and the input stream is a function of the seed, the
data shards and the position in the run only (pass `p` over data shard `m`
is shuffled and augmented with a seed derived from `--seed`, `p` and `m`),
so `--resume` starts the stream where the interrupted run's last completed
epoch left it, on the same device layout (saved in run.json) unless
`--mesh` moves it.

`run` here puts the steps together: `keras_vmoe.cli.train_arguments` (the
flags, their checks, the plan of steps), `keras_vmoe.cli.train_setup`
(model, recipe and data) and `keras_vmoe.cli.train_outputs` (the run
folder, its logs and the trained preset).
"""

import os
from contextlib import nullcontext

from keras_vmoe.cli import train_distribution as run_distribution
from keras_vmoe.cli import train_outputs as run_outputs
from keras_vmoe.cli import train_setup as run_setup
from keras_vmoe.cli.common import check_dataset, format_table, one_line
from keras_vmoe.cli.train_arguments import (
    add_arguments as add_run_arguments,
)
from keras_vmoe.cli.train_arguments import (
    plan_steps,
    resolve_settings,
    usage_error,
)


def add_arguments(parser):
    """The flags of `keras-vmoe train`: the run's, then devices and processes."""
    add_run_arguments(parser)
    run_distribution.add_distribution_arguments(parser)


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
    from keras_vmoe.cli import train as command

    args = cli.build_parser().parse_args(
        ["train", "--preset", "vit_dense_s32_224", "--dataset", "digits",
         "--image-size", "32", "--epochs", "2", "--output", "runs/digits"])
    command.run(args, callbacks=[keras.callbacks.TerminateOnNaN()])
    ```
    """
    cfg = resolve_settings(args)
    # Before anything runs on a device: JAX's distributed runtime must be
    # joined first, and the mesh picked before the weights exist.
    placement = run_distribution.setup(args, cfg)
    num_processes = placement["num_processes"]
    chief = placement["process_id"] == 0
    out = cfg["output"]
    num_train = check_dataset(cfg["dataset"], cfg["train_split"], cfg["data_dir"])
    evaluate = str(cfg["eval_split"]).lower() != "none"
    num_eval = None
    if evaluate:
        num_eval = check_dataset(cfg["dataset"], cfg["eval_split"], cfg["data_dir"])
    for name in cfg["fewshot_list"]:
        check_dataset(name, "train", cfg["data_dir"])
        check_dataset(name, "test", cfg["data_dir"])
    if num_train is None:
        raise usage_error(
            f"the size of {cfg['dataset']}:{cfg['train_split']} is unknown."
        )
    data_shards = cfg["data_shards"] or num_processes
    if data_shards % num_processes:
        raise usage_error(
            f"--data-shards {data_shards} must be a multiple of the "
            f"{num_processes} processes (each reads whole data shards)."
        )
    if evaluate and num_eval is None:
        raise usage_error(
            f"the size of {cfg['dataset']}:{cfg['eval_split']} is unknown."
        )
    if evaluate and num_eval < data_shards:
        raise usage_error(
            f"the {num_eval} examples of --eval-split cannot fill {data_shards} "
            "data shards."
        )
    cfg["data_shards"] = data_shards  # saved in run.json
    spe, epochs, total, per_pass = plan_steps(cfg, num_train)

    import keras

    distribution = placement["distribution"]
    keras.distribution.set_distribution(distribution)
    try:
        return _run(
            cfg,
            placement,
            callbacks,
            num_train,
            num_eval,
            plan=(spe, epochs, total, per_pass),
            chief=chief,
            evaluate=evaluate,
            out=out,
        )
    finally:
        keras.distribution.set_distribution(None)


def _run(cfg, placement, callbacks, num_train, num_eval, plan, chief, evaluate, out):
    """`run` under the run's distribution (if any)."""
    import keras

    from keras_vmoe import data
    from keras_vmoe.callbacks import FewShotEvaluator, RoutingStatistics
    from keras_vmoe.evaluation import model_group_size, model_image_shape

    spe, epochs, total, per_pass = plan
    num_processes = placement["num_processes"]
    shard = (placement["process_id"], num_processes)
    mesh = placement["mesh"]

    # === The model ===
    keras.utils.set_random_seed(cfg["seed"])
    num_classes = data.num_classes(cfg["dataset"], cfg["data_dir"])
    model = run_setup.build_model(cfg, num_classes)
    preprocessor = run_setup.detach_preprocessor(model)
    if placement["layout_map"] is not None:
        run_distribution.check_model_layout(model, placement)
    group = model_group_size(model)
    unit = cfg["data_shards"] * group
    if cfg["batch_size"] % unit:
        shards = cfg["data_shards"]
        raise usage_error(
            f"--batch-size {cfg['batch_size']} must be a multiple of the model's "
            f"routing group of {group} images"
            + (f" times the {shards} data shards ({unit})." if shards > 1 else ".")
        )
    recipe = run_setup.compile_for_run(model, cfg, total)
    image_shape = model_image_shape(model)
    evaluator = None
    if cfg["fewshot_list"]:
        fewshot_batch = (
            max(256 // (mesh["batch"] * group), 1) * mesh["batch"] * group
            if mesh
            else 256
        )
        feature_fn = None
        if mesh is not None:
            # One forward pass on the mesh per batch, which every process
            # takes part in (no process can run the sharded model alone).
            feature_fn = run_distribution.sharded_features(placement, group)
        try:
            evaluator = FewShotEvaluator.from_dataset_names(
                cfg["fewshot_list"],
                image_shape,
                cfg["shots_list"],
                seed=cfg["seed"],
                data_dir=cfg["data_dir"],
                every_n_epochs=cfg["fewshot_every"],
                batch_size=fewshot_batch,
                feature_fn=feature_fn,
            )
        except ValueError as e:
            raise usage_error(f"--fewshot: {one_line(e)}") from None

    # === The run folder ===
    backup_dir = os.path.join(out, "backup")
    backup_cls = run_outputs.backup_class(mesh is not None)
    start = (
        run_outputs.resume_epoch(backup_dir, mesh is not None) if cfg["resume"] else 0
    )
    run_distribution.barrier("keras_vmoe_read_backup")
    if chief:
        layout = run_distribution.layout_record(placement)
        run_outputs.prepare_run_folder(cfg, layout)
        run_outputs.truncate_csv(os.path.join(out, "log.csv"), start)
    run_distribution.barrier("keras_vmoe_run_folder")

    # === Data ===
    train = run_setup.training_data(
        cfg, image_shape, per_pass, start * spe, num_train, shard=shard
    )
    validation = None
    if evaluate:
        validation = run_setup.validation_data(
            cfg,
            image_shape,
            group,
            num_eval,
            shard=shard,
            mesh_batch=mesh["batch"] if mesh is not None else 1,
        )

    # === Callbacks ===
    monitor = "val_accuracy" if evaluate else "accuracy"
    backup = backup_cls(backup_dir, delete_checkpoint=False)
    cbs = [RoutingStatistics()]
    if evaluator is not None:
        cbs.append(evaluator)
    if total % spe:
        cbs.append(run_outputs.StopAtStep(total))
    cbs += run_outputs.run_callbacks(
        out,
        start,
        monitor,
        callbacks or (),
        backup,
        tensorboard=cfg["tensorboard"],
        chief=chief,
        sharded=mesh is not None,
    )

    if chief:
        where = ""
        if mesh is not None:
            where = f", mesh batch={mesh['batch']} x expert={mesh['expert']}" + (
                f" over {num_processes} processes" if num_processes > 1 else ""
            )
        print(
            f"train: {cfg['preset']} ({model.count_params():,} parameters, "
            f"recipe {recipe}) on {cfg['dataset']}:{cfg['train_split']} "
            f"({num_train} images, {num_classes} classes), {total} steps of "
            f"{cfg['batch_size']} = {epochs} epoch{'s' * (epochs != 1)} of {spe} steps"
            + where
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
            verbose=cfg["verbose"] if chief else 0,
        )
    else:  # Every epoch ran; the run stopped before saving the preset.
        backup.set_model(model)
        backup.on_train_begin()

    # === The trained preset ===
    exported = run_outputs.exportable_model(model, cfg, num_classes, num_processes)
    preset_dir, final = None, None
    if chief:
        exported.preprocessor = preprocessor  # saved as preprocessor.json
        # With several processes `exported` is a one-device copy: its
        # compile() (in the save) must not create variables on the mesh.
        with run_outputs.no_distribution() if num_processes > 1 else nullcontext():
            preset_dir, final = run_outputs.save_trained_preset(
                exported, cfg, recipe, total, epochs
            )
    run_distribution.barrier("keras_vmoe_preset")
    if chief:
        print(f"saved the trained preset to {preset_dir}")
        if final:
            print(format_table(final))
    return 0
