"""The `keras-vmoe` command.

    keras-vmoe study     the router study on bundled data (what `make demo` runs)
    keras-vmoe train     pre-train a preset with the paper's recipe, resumable
    keras-vmoe eval      test and few-shot accuracy of a trained preset
    keras-vmoe presets   the built-in presets with parameters and FLOPs
    keras-vmoe demo      route and train a tiny MoE stack with every router
    keras-vmoe upcycle   turn a dense ViT preset into a V-MoE preset

Each subcommand lives in its own module of this package, with
`add_arguments(parser)` and `run(args)`; `_COMMANDS` maps each command name
to its module. Adding a command is one line there (and the module).

Only the command that runs is imported: `keras-vmoe --help` reads each
command's one-line summary (the first line of its module docstring) from
the source without importing it, and `keras-vmoe COMMAND ...` imports that
command's module alone, so commands that need neither Keras nor
TensorFlow answer at once. No library module imports from here.
Bad arguments print a one-line error and exit with status 2.
"""

import argparse
import ast
import importlib
import importlib.util
import os
import sys

from keras_vmoe.cli.errors import UsageError

# Command name -> module with `add_arguments(parser)` and `run(args)`.
_COMMANDS = {
    "demo": "keras_vmoe.cli.demo",
    "study": "keras_vmoe.cli.study",
    "train": "keras_vmoe.cli.train",
    "eval": "keras_vmoe.cli.eval",
    "presets": "keras_vmoe.cli.presets",
    "convert": "keras_vmoe.cli.convert",
    "upcycle": "keras_vmoe.cli.upcycle",
}
_BACKENDS = ("jax", "tensorflow", "torch")


def command_summary(module_name):
    """First line of a command module's docstring, read without importing it.

    Example:
    >>> command_summary("keras_vmoe.cli.presets")
    'List the built-in presets with their parameter count and FLOPs per image.'
    """
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _command_in(argv):
    """The command named in `argv` (the first argument that is not an option)."""
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--backend":
            skip_value = True
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(argv=None):
    """The argument parser; only the command named in `argv` gets its arguments.

    Args:
        argv: list of str or None. The command line; `None` adds every
            command's arguments (importing every command module).
    """
    parser = argparse.ArgumentParser(
        prog="keras-vmoe",
        description="Vision Mixture of Experts for Keras 3: routers, models, studies.",
    )
    parser.add_argument(
        "--backend",
        choices=_BACKENDS,
        default=None,
        help="Keras backend (default: $KERAS_BACKEND or ~/.keras/keras.json).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else _command_in(argv)
    for name, module_name in _COMMANDS.items():
        doc = command_summary(module_name)
        command = sub.add_parser(name, help=doc, description=doc)
        if argv is None or name == wanted:
            importlib.import_module(module_name).add_arguments(command)
        command.set_defaults(module=module_name)
    return parser


def _select_backend(argv):
    """Honours --backend.

    Keras fixes its backend when it is first imported (from $KERAS_BACKEND
    or ~/.keras/keras.json). Before that, --backend just sets
    $KERAS_BACKEND; when Keras is already imported with another backend
    (`main` called from Python), the command restarts itself with
    $KERAS_BACKEND set.
    """
    pre = argparse.ArgumentParser(prog="keras-vmoe", add_help=False)
    pre.add_argument("--backend", choices=_BACKENDS)
    known, _ = pre.parse_known_args(argv)
    if not known.backend:
        return
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = known.backend
        return
    import keras

    if known.backend != keras.backend.backend():
        env = dict(os.environ, KERAS_BACKEND=known.backend)
        os.execve(sys.executable, [sys.executable, "-m", "keras_vmoe.cli", *argv], env)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    _select_backend(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(args.module)
    try:
        return module.run(args) or 0
    except UsageError as error:
        print(f"keras-vmoe {args.command}: error: {error}", file=sys.stderr)
        return 2
