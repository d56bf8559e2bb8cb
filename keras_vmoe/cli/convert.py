"""Convert an official V-MoE checkpoint (google-research/vmoe) into a preset.

    keras-vmoe convert --checkpoint PREFIX --config CONFIG --output DIR

`PREFIX` is a vmoe checkpoint's path without extension: the files
`PREFIX.index` and `PREFIX.data-NNNNN-of-NNNNN` (the format of the released
`gs://vmoe_checkpoints/*`, downloaded first). `CONFIG` is the model's vmoe
config (`config.model`) as a JSON file, or the name of a released checkpoint
(`keras-vmoe presets` lists them; their configs are built in,
`keras_vmoe.convert.released`). `DIR` becomes a preset folder that
`keras_vmoe.models.from_preset(DIR)` loads, with a `metadata.json` saying
where it came from (`source`: the checkpoint, its files, the config).

The folder is written atomically: into a temporary sibling that replaces
`DIR` only once the conversion has finished, so a failed conversion (a
missing shard, a config that does not match the weights) leaves nothing at
`DIR`, and an existing preset there stays as it was.
"""

import json
import os

from keras_vmoe.cli.common import check_preset_output, one_line
from keras_vmoe.cli.errors import UsageError

INDEX_SUFFIX = ".index"


def add_arguments(parser):
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PREFIX",
        help="vmoe checkpoint prefix: the path of PREFIX.index without '.index'.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="vmoe model config: a JSON file of config.model, or a released "
        "checkpoint name (see `keras-vmoe presets`).",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="The preset folder to write."
    )
    parser.add_argument(
        "--name",
        default=None,
        help="The preset's name in its metadata (default: DIR's folder name).",
    )


def checkpoint_prefix(text):
    """The prefix of a checkpoint path; `PREFIX.index` is accepted too.

    Raises:
        UsageError: `PREFIX.index` does not exist.

    Example:
    >>> checkpoint_prefix("/no/such/ckpt")
    Traceback (most recent call last):
    ...
    keras_vmoe.cli.errors.UsageError: --checkpoint: no checkpoint index /no/such/ckpt.index (pass the prefix of PREFIX.index and PREFIX.data-*).
    """
    prefix = os.path.expanduser(str(text))
    if prefix.endswith(INDEX_SUFFIX) and os.path.isfile(prefix):
        prefix = prefix[: -len(INDEX_SUFFIX)]
    if not os.path.isfile(prefix + INDEX_SUFFIX):
        raise UsageError(
            f"--checkpoint: no checkpoint index {prefix}{INDEX_SUFFIX} (pass the "
            "prefix of PREFIX.index and PREFIX.data-*)."
        )
    return prefix


def resolve_config(text):
    """`(config argument for the converter, source entry for the metadata)`.

    A released checkpoint's name stays a name (the converter knows its config
    and image size); a file is read here, so that a bad file is a one-line
    error and its content goes into the metadata.

    Raises:
        UsageError: neither a released name nor a readable JSON file, or a
            released checkpoint that cannot be converted (E3 ensembles).
    """
    from keras_vmoe.convert import released

    if released.is_released_name(text):
        record = released.released_checkpoint(text)
        if not record.supported:
            raise UsageError(f"--config {record.name}: {record.notes[0]}")
        source = {
            "config": record.name,
            "released_checkpoint": record.prefix,
            "config_source": record.config_source,
            "vmoe_config": record.vmoe_config(),
            "image_size": record.image_size,
        }
        if record.assumed:
            source["assumed"] = list(record.assumed)
        return record.name, source
    path = os.path.expanduser(str(text))
    if not os.path.isfile(path):
        close = _close_released_name(text)
        raise UsageError(
            f"--config: {text!r} is neither a JSON file nor a released checkpoint "
            f"name{close} (`keras-vmoe presets` lists the released ones)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            vmoe_config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"--config: cannot read {path} as JSON: {one_line(e)}"
        ) from None
    if not isinstance(vmoe_config, dict):
        raise UsageError(
            f"--config: {path} holds no JSON object (a vmoe config.model)."
        )
    return path, {"config": os.path.abspath(path), "vmoe_config": vmoe_config}


def _close_released_name(text):
    import difflib

    from keras_vmoe.convert.released import RELEASED_CHECKPOINTS

    close = difflib.get_close_matches(str(text), RELEASED_CHECKPOINTS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checkpoint_files(prefix):
    """The checkpoint's files (names and bytes), for the metadata."""
    folder, base = os.path.split(os.path.abspath(prefix))
    files = {}
    for name in sorted(os.listdir(folder or ".")):
        if name == base + INDEX_SUFFIX or name.startswith(base + ".data-"):
            files[name] = os.path.getsize(os.path.join(folder, name))
    return files


def _ignored_options(config, model):
    """The vmoe options the conversion accepted without effect (init, sharding)."""
    from keras_vmoe.convert import load_vmoe_config, vmoe_config_to_keras

    vmoe_config, _ = load_vmoe_config(config)
    image_shape = tuple(model.backbone.layout.image_shape)
    return list(vmoe_config_to_keras(vmoe_config, image_shape)[2])


def convert(prefix, config, source, output, name=None):
    """Converts a checkpoint and writes the preset folder `output` atomically.

    Args:
        prefix: str. The checkpoint prefix.
        config: str or dict. What `from_vmoe_checkpoint` takes.
        source: dict. The metadata's `source` entry (the config part).
        output: str. The preset folder.
        name: str or None. The preset's name. Defaults to `output`'s folder name.

    Returns:
        The converted `VisionMoEImageClassifier`.
    """
    from keras_vmoe.convert import from_vmoe_checkpoint
    from keras_vmoe.models import VisionMoEImageClassifierPreprocessor
    from keras_vmoe.models.vision_moe.presets import add_preset_metadata
    from keras_vmoe.utils.atomic import atomic_directory

    name = name or os.path.basename(os.path.normpath(output))
    source = {
        "format": "vmoe partitioned checkpoint (google-research/vmoe)",
        "checkpoint": os.path.abspath(prefix),
        "checkpoint_files": _checkpoint_files(prefix),
        **source,
        "converted_by": "keras-vmoe convert",
    }
    origin = source.get("released_checkpoint") or source["checkpoint"]
    description = f"V-MoE converted from the vmoe checkpoint {origin}."
    if source.get("released_checkpoint"):
        from keras_vmoe.convert.released import released_checkpoint

        description = (
            f"{released_checkpoint(source['config']).description} {description}"
        )
    with atomic_directory(output) as staging:
        model = from_vmoe_checkpoint(prefix, config)
        source["ignored_vmoe_options"] = _ignored_options(config, model)
        # The preset gets the preprocessing vmoe's models expect (resize,
        # scale to [-1, 1]); the returned model takes images in [-1, 1].
        model.preprocessor = VisionMoEImageClassifierPreprocessor.for_backbone(
            model.backbone
        )
        model.save_to_preset(staging)
        model.preprocessor = None
        add_preset_metadata(
            staging,
            model,
            name=name,
            description=description,
            weights="converted",
            source=source,
        )
    return model


def run(args):
    prefix = checkpoint_prefix(args.checkpoint)
    config, source = resolve_config(args.config)
    output = os.path.expanduser(args.output)
    check_preset_output(output)
    try:
        model = convert(prefix, config, source, output, name=args.name)
    except (ValueError, KeyError, OSError) as e:
        # A missing or corrupt shard, a config that does not match the
        # weights: nothing was written at --output.
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"cannot convert {prefix}: {one_line(message)}") from None
    params = model.count_params()
    print(
        f"Converted {prefix} ({params:,} parameters) into {output}; load it with "
        f"keras_vmoe.models.from_preset({output!r})."
    )
    return 0
