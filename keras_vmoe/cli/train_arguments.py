"""Arguments of `keras-vmoe train`: the flags, their checks, the run's plan.

Every argument is checked here, before any model or data is built; a bad
one raises `keras_vmoe.cli.UsageError` (one line, exit status 2).
`resolve_settings` merges the defaults, the saved `run.json` (on `--resume`)
and the command line into the run's settings (a dict, `cfg`);
`plan_steps` turns them into steps and epochs.
"""

import json
import math
import os

from keras_vmoe.cli.common import (
    DEFAULT_SHOTS,
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
    "data_shards": None,
    "data_dir": None,
    "tensorboard": False,
    "lr_schedule": "restart",
    "freeze_non_experts": False,
}
RUN_FILE = "run.json"


def add_arguments(parser):
    """Adds the `keras-vmoe train` flags to an argparse (sub)parser."""
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
    a(
        "--data-shards",
        type=int,
        help="Contiguous blocks of the training and evaluation splits that "
        "feed every batch, a multiple of the processes, each of which reads "
        "only its own blocks (default: one per process). A run's batches "
        "depend on it, not on its devices or processes.",
    )
    a("--data-dir", help="TFDS data directory.")
    a(
        "--tensorboard",
        action="store_true",
        default=None,
        help="Also write the epoch logs (loss, routing/..., ...) as TensorBoard "
        "scalars to OUTPUT/tensorboard.",
    )
    a(
        "--lr-schedule",
        choices=("restart", "continue"),
        help="For an upcycled preset: restart (warm up again, default) or "
        "continue (no warmup, start at --learning-rate).",
    )
    a(
        "--freeze-non-experts",
        action="store_true",
        default=None,
        help="Train only the MoE layers (routers, experts) and the head.",
    )
    a("--output", help="Run folder (default runs/PRESET-DATASET).")
    a("--resume", action="store_true", help="Continue the run in --output.")
    a("--overwrite", action="store_true", help="Replace a finished run in --output.")
    a("--verbose", type=int, choices=(0, 1, 2), default=1, help="fit() verbosity.")


def usage_error(message):
    """A `keras_vmoe.cli.UsageError` (one line, exit status 2) to raise."""
    from keras_vmoe.cli.errors import UsageError

    return UsageError(message)


def _check_writable(path):
    """Raises UsageError unless `path` is, or can be made, a writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise usage_error(f"--output {path!r} exists and is not a folder.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise usage_error(
            f"--output {path!r} is not writable ({parent!r} is not a writable folder)."
        )


def _parse_overrides(items):
    overrides = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise usage_error(f"--override must be KEY=VALUE, got {item!r}.")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def resolve_settings(args):
    """The run's settings: defaults < run.json (on --resume) < the command line.

    On `--resume`, `cfg["layout"]` is the device layout saved in run.json
    (`keras_vmoe.cli.train_distribution.layout_record`), else `None`.
    """
    given = {k: getattr(args, k, None) for k in DEFAULTS}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume and args.overwrite:
        raise usage_error("give --resume or --overwrite, not both.")
    output = args.output
    saved = saved_layout = None
    if args.resume:
        if output is None:
            raise usage_error("--resume needs the --output folder of the run.")
        path = os.path.join(output, RUN_FILE)
        if not os.path.isfile(path):
            raise usage_error(f"nothing to resume: {path!r} does not exist.")
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            saved = record["arguments"]
            saved_layout = record.get("layout")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise usage_error(f"cannot read {path!r}: {one_line(e)}") from None
        changed = sorted(k for k, v in given.items() if k in saved and saved[k] != v)
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise usage_error(
                f"--resume continues the saved run; {flags} differ from {path!r}."
            )
    cfg = {**DEFAULTS, **(saved or {}), **given}
    for key in ("preset", "dataset"):
        if not cfg[key]:
            raise usage_error(f"--{key} is required.")
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
        ("data_shards", 1),
    ):
        if cfg[key] is not None and cfg[key] < minimum:
            flag = "--" + key.replace("_", "-")
            raise usage_error(f"{flag} must be >= {minimum}, got {cfg[key]}.")
    if cfg["epochs"] is not None and cfg["steps"] is not None:
        raise usage_error("give --epochs or --steps, not both.")
    if not cfg["learning_rate"] > 0:
        raise usage_error(f"--learning-rate must be > 0, got {cfg['learning_rate']}.")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise usage_error(
            f"--label-smoothing must be in [0, 1), got {cfg['label_smoothing']}."
        )
    if cfg["weight_decay"] is not None and cfg["weight_decay"] < 0:
        raise usage_error(f"--weight-decay must be >= 0, got {cfg['weight_decay']}.")
    cfg["shots_list"] = parse_int_list(cfg["shots"], "--shots")
    cfg["fewshot_list"] = (
        parse_name_list(cfg["fewshot"], "--fewshot") if cfg["fewshot"] else ()
    )
    cfg["overrides"] = _parse_overrides(cfg["override"])
    if "num_classes" in cfg["overrides"]:
        raise usage_error("num_classes comes from --dataset; do not override it.")
    for key in ("router", "num_experts", "image_size"):
        if cfg[key] is not None:
            cfg["overrides"][key] = cfg[key]
    if cfg["router"] is not None:
        from keras_vmoe.routers import ROUTER_NAMES

        if cfg["router"] not in ROUTER_NAMES:
            raise usage_error(
                f"unknown --router {cfg['router']!r}; choose from {', '.join(ROUTER_NAMES)}."
            )
    if output is None:
        name = os.path.basename(os.path.normpath(str(cfg["preset"])))
        output = os.path.join("runs", f"{name}-{cfg['dataset']}")
    _check_writable(output)
    if not args.resume and not args.overwrite:
        if os.path.exists(os.path.join(output, RUN_FILE)):
            raise usage_error(
                f"--output {output!r} already holds a run: pass --resume to continue "
                "it, --overwrite to replace it, or another --output."
            )
    if args.resume:
        backup = os.path.join(output, "backup")
        if not os.path.isdir(backup) and os.path.isdir(os.path.join(output, "preset")):
            raise usage_error(f"the run in {output!r} has finished; nothing to resume.")
    cfg["output"] = output
    cfg["resume"] = bool(args.resume)
    # The devices the run last trained on (`keras_vmoe.cli.train_distribution`).
    cfg["layout"] = saved_layout
    cfg["verbose"] = args.verbose
    return cfg


def run_arguments(cfg):
    """The arguments that define the run, as saved in `run.json`."""
    return {k: cfg[k] for k in DEFAULTS}


def plan_steps(cfg, num_train):
    """(steps per epoch, epochs, total steps, batches per pass)."""
    batch = cfg["batch_size"]
    per_pass = num_train // batch
    if per_pass < 1:
        raise usage_error(
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
