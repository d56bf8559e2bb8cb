"""Compare the six routers and a dense ViT at equal compute (the paper, small).

    keras-vmoe study [--routers all|NAME,...] [--seeds N] [--epochs N]
                     [--quick] [--output DIR] [--batch-size B]

Trains a small ViT-MoE on Animal-MNIST with each router (and the dense ViT),
then prints and saves test accuracy, few-shot transfer to digits,
throughput, FLOPs, dropped tokens and expert load imbalance, with plots.
"""

import contextlib
import os

from keras_vmoe.routers.registry import ROUTER_NAMES
from keras_vmoe.study import config as study_config

DEFAULT_OUTPUT = "study_output"


def add_arguments(parser):
    parser.add_argument(
        "--routers",
        default="all",
        help=(
            "'all' (the dense ViT and the six routers) or a comma-separated "
            f"list of: dense, {', '.join(ROUTER_NAMES)}."
        ),
    )
    parser.add_argument("--seeds", type=int, default=1, help="Seeds per model.")
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
        help="Tiny model, a few hundred images, 1 epoch: a smoke test (<1 min).",
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


def parse_models(text):
    """Model names from `--routers`: `"all"` or a comma-separated list.

    Args:
        text: str.

    Returns:
        tuple of names in study order (`"dense"` first, then `ROUTER_NAMES`).

    Example:
    >>> parse_models("soft,dense")
    ('dense', 'soft')
    """
    from keras_vmoe.cli.errors import UsageError

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

    config = study_config.QUICK if args.quick else study_config.DEFAULT
    if args.epochs is not None:
        config = config.replace(epochs=args.epochs)
    if args.batch_size is not None:
        config = config.replace(batch_size=args.batch_size)
    try:
        return config.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None


def run(args):
    from keras_vmoe.cli.errors import UsageError

    models = parse_models(args.routers)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}.")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    config = make_config(args)
    train_size = config.train_size or 8000
    if config.batch_size > train_size:
        raise UsageError(
            f"--batch-size {config.batch_size} exceeds the {train_size} training "
            "images."
        )
    _check_output(args.output)
    _enable_jax_compilation_cache(args.output)

    from keras_vmoe.study.experiment import run_study

    with _fast_xla_compilation(args.quick):
        run_study(config, models, args.seeds, args.output)
    return 0
