"""The `keras-vmoe` command.

    keras-vmoe study     the router study on bundled data (what `make demo` runs)
    keras-vmoe train     pre-train a preset with the paper's recipe, resumable
    keras-vmoe eval      test and few-shot accuracy of a trained preset
    keras-vmoe presets   the built-in presets with parameters and FLOPs
    keras-vmoe demo      route and train a tiny MoE stack with every router
    keras-vmoe upcycle   turn a dense ViT preset into a V-MoE preset

Each subcommand lives in its own module of this package (listed in
`_COMMANDS`). No library module imports from here.
Bad arguments print a one-line error and exit with status 2.
"""

import argparse
import importlib
import os
import sys

from keras_vmoe.cli.errors import UsageError

# subcommand -> module with `add_arguments(parser)` and `run(args)`.
_COMMANDS = {
    "demo": "keras_vmoe.cli.demo",
    "study": "keras_vmoe.cli.study",
    "train": "keras_vmoe.cli.train",
    "eval": "keras_vmoe.cli.eval",
    "presets": "keras_vmoe.cli.presets",
    "convert": "keras_vmoe.cli.convert",
    "upcycle": "keras_vmoe.cli.upcycle",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-vmoe",
        description="Vision Mixture of Experts for Keras 3: routers, models, studies.",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=None,
        help="Keras backend (default: $KERAS_BACKEND or ~/.keras/keras.json).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in _COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(command)
        command.set_defaults(module=module_name)
    return parser


def _select_backend(argv):
    """Honours --backend.

    Importing `keras_vmoe` imports Keras, which fixes its backend at import
    time (from $KERAS_BACKEND or ~/.keras/keras.json). When --backend asks
    for another one, the command restarts itself with $KERAS_BACKEND set.
    """
    pre = argparse.ArgumentParser(prog="keras-vmoe", add_help=False)
    pre.add_argument("--backend", choices=("jax", "tensorflow", "torch"))
    known, _ = pre.parse_known_args(argv)
    import keras

    if known.backend and known.backend != keras.backend.backend():
        env = dict(os.environ, KERAS_BACKEND=known.backend)
        os.execve(sys.executable, [sys.executable, "-m", "keras_vmoe.cli", *argv], env)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    _select_backend(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args.module)
    try:
        return module.run(args) or 0
    except UsageError as error:
        print(f"keras-vmoe {args.command}: error: {error}", file=sys.stderr)
        return 2
