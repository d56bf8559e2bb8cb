"""Compare the routers and a dense ViT at equal compute (the paper, small).

    keras-vmoe study [--routers default|all|NAME,...] [--seeds N] [--epochs N]
                     [--quick | --scale cpu|gpu] [--dataset NAME|DIR]
                     [--channels 1|3] [--image-size N] [--train-size N]
                     [--test-size N] [--output DIR] [--batch-size B]
                     [--mesh batch=B,expert=E | --no-distribution]

Trains a small ViT-MoE on Animal-MNIST (or `--dataset`) with each router
and the dense ViT over several seeds, then prints and saves test accuracy,
few-shot transfer to digits, throughput, FLOPs, routing sharpness, the
paired differences against the dense ViT and Softmax Token Choice with
their intervals, and the verdict those intervals allow, with plots.

On the JAX backend with several local devices each model trains on all of
them, on a `(batch, expert)` device mesh (`keras.distribution`, the layout
map of `keras_vmoe.distribution`): the MoE models on the mesh `plan_mesh`
of `keras-vmoe train` picks (or `--mesh`), the dense ViT, which has no
experts to shard, data parallel over the same devices (`batch=B*E`).
`--no-distribution` runs on one device; with one device nothing changes.
"""

import contextlib
import os

from keras_vmoe.routers.registry import ROUTER_NAMES
from keras_vmoe.study import config as study_config

DEFAULT_OUTPUT = "study_output"


def add_arguments(parser):
    parser.add_argument(
        "--routers",
        default="default",
        help=(
            "'default' (the scale's models; cpu: "
            f"{', '.join(study_config.DEFAULT.models)}), 'all' (the dense ViT "
            "and every router) or a comma-separated list of: dense, "
            f"{', '.join(ROUTER_NAMES)}."
        ),
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"Seeds per model (default {study_config.DEFAULT.seeds}; --scale gpu: "
        f"{study_config.GPU.seeds}; --quick: {study_config.QUICK.seeds}).",
    )
    parser.add_argument(
        "--scale",
        choices=sorted(study_config.SCALES),
        default="cpu",
        help="cpu: the default study (4 models x 4 seeds x 3 epochs, sized for "
        "make demo's 10-minute budget on 2 CPU cores); gpu: a "
        "larger ViT-MoE (6 blocks, d=192, 49 tokens), more epochs and seeds, "
        "every router, sized for about 10 minutes on one modern GPU.",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="Upstream data instead of Animal-MNIST: a TFDS dataset already "
        "prepared on disk (`tfds build NAME`; nothing is downloaded) or an "
        "image folder (DIR/train/CLASS/*, DIR/test/CLASS/* or DIR/CLASS/*).",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=None,
        choices=(1, 3),
        help="Image channels (default 1; 3 with --dataset).",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="Resize images to N x N."
    )
    parser.add_argument(
        "--train-size", type=int, default=None, help="Use the first N train images."
    )
    parser.add_argument(
        "--test-size", type=int, default=None, help="Use the first N test images."
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"Training epochs (default {study_config.DEFAULT.epochs}; --quick: "
        f"{study_config.QUICK.epochs}).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Tiny model, a few hundred images, 1 epoch, 1 seed: a smoke test "
        "(about 1 min).",
    )
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help="Output directory (created)."
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"Training batch size, a multiple of the routing group (default "
        f"{study_config.DEFAULT.batch_size}; --quick: {study_config.QUICK.batch_size}).",
    )
    add_distribution_arguments(parser)


def add_distribution_arguments(parser):
    """Adds `--mesh` and `--no-distribution` (own group)."""
    group = parser.add_argument_group(
        "distribution (JAX)",
        "Devices of one process; by default every local device when there are several.",
    )
    group.add_argument(
        "--mesh",
        metavar="batch=B,expert=E",
        help="Device mesh of the MoE models (default: expert axis as large as "
        "the experts and the devices allow, batch axis the rest). The dense "
        "ViT has no experts: it is data parallel over the same devices "
        "(batch=B*E). Each batch shard of the training and evaluation "
        "batches must hold whole routing groups.",
    )
    group.add_argument(
        "--no-distribution",
        action="store_true",
        help="Train and evaluate every model on one device (no device mesh).",
    )


def mesh_flags(args):
    """`parse_mesh(--mesh)` or None, checked against the other flags.

    Raises `UsageError` for a malformed `--mesh`, `--mesh` with
    `--no-distribution`, or `--mesh` on a backend other than JAX. Needs no
    device.

    Example:
    >>> import argparse
    >>> mesh_flags(argparse.Namespace(mesh=None, no_distribution=False)) is None
    True
    >>> mesh_flags(argparse.Namespace(mesh="batch=2", no_distribution=True))
    Traceback (most recent call last):
    ...
    keras_vmoe.cli.errors.UsageError: --no-distribution cannot go with --mesh.
    """
    import keras

    from keras_vmoe.cli.errors import UsageError
    from keras_vmoe.cli.train_distribution import parse_mesh

    text = getattr(args, "mesh", None)
    spec = parse_mesh(text) if text else None
    if spec is not None and getattr(args, "no_distribution", False):
        raise UsageError("--no-distribution cannot go with --mesh.")
    if spec is not None and keras.backend.backend() != "jax":
        raise UsageError(
            "--mesh needs the JAX backend (keras.distribution shards on JAX only)."
        )
    return spec


def plan_meshes(config, num_devices, spec=None):
    """The `{"batch": B, "expert": E}` mesh of each model of a study, checked.

    MoE models get `plan_mesh` of `keras-vmoe train` (with `spec`, or the
    expert axis as large as divides the experts and the devices). The
    dense ViT has no experts: on an expert axis its every weight and its
    whole computation would be repeated on each device of a batch row, so
    it is data parallel over all the devices instead (`batch=B*E`). Raises
    `UsageError`, naming the model, when a mesh would replicate the
    experts, when its expert axis does not divide them, or when the
    training (`batch_size`) or evaluation (`eval_batch_size`) batch, or a
    training pass (`micro_batch_size`), does not split into batch shards of
    whole routing groups of the model.

    Args:
        config: `StudyConfig` (its `models`).
        num_devices: int. Devices of the process.
        spec: dict or None. `parse_mesh(--mesh)`. Defaults to `None` (auto).

    Returns:
        dict `{model name: {"batch": B, "expert": E}}`.

    Example (the quick study, 4 experts, sparse groups of 2 images, Soft
    MoE groups of 1, batches of 32 and 128, on 8 devices):
    >>> from keras_vmoe.study import QUICK
    >>> config = QUICK.replace(models=("dense", "softmax_token_choice"))
    >>> plan_meshes(config, 8)
    {'dense': {'batch': 8, 'expert': 1}, 'softmax_token_choice': {'batch': 2, 'expert': 4}}
    >>> plan_meshes(config, 8, {"batch": 4, "expert": 2})["dense"]
    {'batch': 8, 'expert': 1}
    """
    from keras_vmoe.cli.errors import UsageError
    from keras_vmoe.cli.train_distribution import plan_mesh

    if spec is not None and spec["batch"] * spec["expert"] != num_devices:
        raise UsageError(
            f"--mesh batch={spec['batch']},expert={spec['expert']} has "
            f"{spec['batch'] * spec['expert']} devices; this machine has "
            f"{num_devices}."
        )
    meshes = {}
    for name in config.models:
        group = config.images_per_group(name)
        experts = None if name == study_config.DENSE else config.num_experts
        own = spec
        if experts is None and spec is not None:
            own = {"batch": num_devices, "expert": 1}
        try:
            sizes = plan_mesh(
                num_devices, num_devices, experts, config.batch_size, group, spec=own
            )
        except UsageError as error:
            raise UsageError(f"{name}: {error}") from None
        unit = sizes["batch"] * group
        passes = config.accumulation_steps
        if passes > 1 and (config.batch_size // passes) % unit:
            raise UsageError(
                f"{name}: the training batch of {config.batch_size} images runs "
                f"in {passes} passes of {config.batch_size // passes} (at most "
                f"micro_batch_size {config.micro_batch_size}), which must split "
                f"into {sizes['batch']} batch shards of whole routing groups of "
                f"{group} images (a multiple of {unit}); give --mesh or "
                "--no-distribution."
            )
        if config.eval_batch_size % unit:
            raise UsageError(
                f"{name}: the evaluation batch of {config.eval_batch_size} images "
                f"must split into {sizes['batch']} batch shards of whole routing "
                f"groups of {group} images (a multiple of {unit}); give --mesh "
                "or --no-distribution."
            )
        meshes[name] = sizes
    return meshes


def make_distributions(config, spec=None, off=False):
    """`{model name: keras.distribution.ModelParallel}` of a study, or None.

    None (every model on one device) with `off` (`--no-distribution`), on
    a backend other than JAX, or with one device and no `spec`. Otherwise
    each model gets a `ModelParallel` on its mesh of `plan_meshes` over
    every device of the process, with the layout map of
    `keras_vmoe.distribution.get_layout_map` (`make_distribution` of
    `keras-vmoe train`). Starts JAX's device client: call it where the
    XLA flags of the run are set.

    Args:
        config: `StudyConfig`.
        spec: dict or None. `parse_mesh(--mesh)`. Defaults to `None`.
        off: bool. `--no-distribution`. Defaults to `False`.
    """
    import keras

    from keras_vmoe.cli.train_distribution import make_distribution

    if off or keras.backend.backend() != "jax":
        return None
    import jax

    num_devices = jax.device_count()
    if num_devices == 1 and spec is None:
        return None
    meshes = plan_meshes(config, num_devices, spec)
    made = {}
    for sizes in meshes.values():
        key = (sizes["batch"], sizes["expert"])
        if key not in made:
            made[key] = make_distribution(sizes)[0]
    return {name: made[s["batch"], s["expert"]] for name, s in meshes.items()}


def parse_models(text, default=study_config.DEFAULT_MODELS):
    """Model names from `--routers`: `"default"`, `"all"` or a list.

    Args:
        text: str.
        default: tuple of str. What `"default"` means.

    Returns:
        tuple of names in study order (`"dense"` first, then `ROUTER_NAMES`).

    Example:
    >>> parse_models("soft,dense")
    ('dense', 'soft')
    """
    from keras_vmoe.cli.errors import UsageError

    if text.strip().lower() == "default":
        return tuple(default)
    if text.strip().lower() == "all":
        return study_config.model_names()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--routers is empty; give 'all' or router names.")
    unknown = [n for n in names if n not in study_config.model_names()]
    if unknown:
        raise UsageError(
            f"unknown router {unknown[0]!r} in --routers; choose 'all' or from: "
            f"{', '.join(study_config.model_names())}."
        )
    return tuple(n for n in study_config.model_names() if n in names)


def _check_output(path):
    from keras_vmoe.cli.errors import UsageError

    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"cannot write to --output {path!r}: {reason}.") from None


def _enable_jax_compilation_cache(output_dir):
    """Keeps JAX's compiled programs in `output_dir/.jax_cache`.

    A second study then skips most of the compilation (about a third of the
    default study's time). A cache directory configured already (e.g. by
    the test suite) is left as it is.
    """
    import keras

    if keras.backend.backend() != "jax":
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(os.path.abspath(output_dir), ".jax_cache"),
    )


@contextlib.contextmanager
def _fast_xla_compilation(enabled):
    """For `--quick`: XLA without LLVM optimisation, if JAX has not started.

    The quick study is mostly compilation (two programs per model, a few
    seconds each) and runs each program only a dozen times, so optimising
    the machine code costs more than it saves: measured 70 -> 47 CPU
    seconds for the whole quick study, same results. XLA reads `XLA_FLAGS`
    when its CPU client starts, so this only acts in a fresh process (the
    `keras-vmoe` command), not where JAX already ran (a test session); the
    variable is restored afterwards either way.
    """
    import keras

    if not enabled or keras.backend.backend() != "jax":
        yield
        return
    old = os.environ.get("XLA_FLAGS")
    flag = "--xla_backend_optimization_level=0"
    if old is None or "xla_backend_optimization_level" not in old:
        os.environ["XLA_FLAGS"] = f"{old} {flag}".strip() if old else flag
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = old


def make_config(args):
    """The `StudyConfig` for parsed arguments (validated)."""
    from keras_vmoe.cli.errors import UsageError

    if args.quick:
        config = study_config.QUICK
    else:
        config = study_config.SCALES[args.scale]
    changes = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "dataset": args.dataset,
        "image_size": args.image_size,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "channels": args.channels or (3 if args.dataset else None),
    }
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    config = config.replace(models=parse_models(args.routers, config.models))
    try:
        return config.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None


def run(args):
    from keras_vmoe.cli.errors import UsageError

    for name in ("seeds", "epochs", "batch_size", "image_size", "train_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be >= 1, got {value}.")
    if args.test_size is not None and args.test_size < 1:
        raise UsageError(f"--test-size must be >= 1, got {args.test_size}.")
    if args.dataset and not os.path.isdir(args.dataset) and os.sep in args.dataset:
        raise UsageError(f"--dataset folder {args.dataset!r} does not exist.")
    config = make_config(args)
    train_size = config.train_size or (8000 if config.dataset is None else None)
    if train_size is not None and config.batch_size > train_size:
        raise UsageError(
            f"--batch-size {config.batch_size} exceeds the {train_size} training "
            "images."
        )
    spec = mesh_flags(args)
    _check_output(args.output)
    _enable_jax_compilation_cache(args.output)

    from keras_vmoe.study.data import StudyDataError as DatasetError
    from keras_vmoe.study.experiment import run_study

    with _fast_xla_compilation(args.quick):
        # Counting the devices starts JAX: after the XLA flags are set.
        distributions = make_distributions(config, spec, args.no_distribution)
        try:
            run_study(config, output_dir=args.output, distributions=distributions)
        except DatasetError as error:
            raise UsageError(str(error)) from None
    return 0
