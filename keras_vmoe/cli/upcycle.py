"""Upcycle a dense ViT preset into a V-MoE preset (sparse upcycling).

    keras-vmoe upcycle --from PRESET_OR_DIR --router NAME --num-experts E \\
        [--moe-layers SPEC] [--router-config JSON] [--group-size N] \\
        [--expert-noise S] [--seed N] --output DIR

`--from` is a dense preset: a folder that `keras-vmoe train` (its
`OUTPUT/preset`) or keras-hub's `save_to_preset` wrote, a built-in dense
preset of ours, or a keras-hub ViT preset name (downloaded by keras-hub,
so it needs the network once). `keras_vmoe.models.upcycle` copies every
dense weight, starts each expert of the MoE blocks as that block's MLP and
draws new routers; `DIR` becomes a preset folder whose `metadata.json`
says where it came from (`source`). Continue training it with

    keras-vmoe train --preset DIR --dataset ... [--lr-schedule continue]
        [--freeze-non-experts]

The folder is written atomically: a failed upcycling leaves nothing at DIR.
"""

import json
import os

from keras_vmoe.cli.common import check_preset_output, one_line
from keras_vmoe.cli.errors import UsageError


def add_arguments(parser):
    a = parser.add_argument
    a(
        "--from",
        dest="source",
        required=True,
        metavar="PRESET_OR_DIR",
        help="The dense ViT: a preset folder, a dense preset name of ours, or a "
        "keras-hub ViT preset name.",
    )
    a("--router", required=True, help="Router name (keras_vmoe.routers.ROUTER_NAMES).")
    a("--num-experts", type=int, required=True, help="Experts per MoE block.")
    a(
        "--moe-layers",
        default="every:2",
        metavar="SPEC",
        help="MoE blocks: every:n, last_odd:n, last:n, all, or indices 1,3 "
        "(default every:2).",
    )
    a(
        "--router-config",
        default=None,
        metavar="JSON",
        help="Router arguments as JSON, e.g. '{\"capacity_factor\": 2.0}'.",
    )
    a("--group-size", type=int, default=None, help="Images per routing group.")
    a(
        "--expert-noise",
        type=float,
        default=0.0,
        help="Noise on the expert kernels, relative to the dense kernel's std "
        "(default 0: exact copies).",
    )
    a("--seed", type=int, default=0, help="Router and noise seed (default 0).")
    a("--output", required=True, metavar="DIR", help="The preset folder to write.")
    a("--name", default=None, help="The preset's name (default: DIR's folder name).")


def _moe_layers(text):
    """`--moe-layers`: a spec string, or comma-separated block indices."""
    text = str(text).strip()
    if text and all(part.strip().lstrip("-").isdigit() for part in text.split(",")):
        return [int(part) for part in text.split(",")]
    return text


def _router_config(text):
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--router-config is not JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--router-config must be a JSON object, got {text!r}.")
    return config


def run(args):
    from keras_vmoe.routers import ROUTER_NAMES

    if args.router not in ROUTER_NAMES:
        raise UsageError(
            f"unknown --router {args.router!r}; choose from {', '.join(ROUTER_NAMES)}."
        )
    if args.num_experts < 1:
        raise UsageError(f"--num-experts must be >= 1, got {args.num_experts}.")
    if args.expert_noise < 0:
        raise UsageError(f"--expert-noise must be >= 0, got {args.expert_noise}.")
    router_config = _router_config(args.router_config)
    output = os.path.expanduser(args.output)
    check_preset_output(output)
    try:
        model = upcycle_preset(
            args.source,
            output,
            router=args.router,
            num_experts=args.num_experts,
            moe_layers=_moe_layers(args.moe_layers),
            router_config=router_config,
            group_size=args.group_size,
            expert_noise=args.expert_noise,
            seed=args.seed,
            name=args.name,
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(f"cannot upcycle {args.source}: {one_line(e)}") from None
    backbone = getattr(model, "backbone", model)
    print(
        f"Upcycled {args.source} into {output}: {model.count_params():,} "
        f"parameters, {args.num_experts} experts ({args.router}) in blocks "
        f"{list(backbone.moe_layer_indices)}; continue training with "
        f"`keras-vmoe train --preset {output} --dataset ...`."
    )
    return 0


def upcycle_preset(source, output, name=None, **upcycle_kwargs):
    """Upcycles the dense preset `source` and writes the preset `output`.

    Args:
        source: str. The dense preset (folder or name).
        output: str. The preset folder to write (atomically).
        name: str or None. The preset's name. Defaults to `output`'s folder.
        **upcycle_kwargs: `keras_vmoe.models.upcycle` arguments.

    Returns:
        The upcycled model (classifier, or backbone for a backbone preset).
    """
    from keras_vmoe.models import upcycle
    from keras_vmoe.models.vision_moe.presets import add_preset_metadata
    from keras_vmoe.utils.atomic import atomic_directory

    name = name or os.path.basename(os.path.normpath(output))
    origin = os.path.abspath(source) if os.path.isdir(source) else str(source)
    entry = {
        "upcycled_from": origin,
        "upcycled_by": "keras-vmoe upcycle",
        **{k: v for k, v in upcycle_kwargs.items()},
    }
    description = (
        f"V-MoE upcycled from the dense ViT {origin} "
        f"({upcycle_kwargs['num_experts']} experts, {upcycle_kwargs['router']})."
    )
    with atomic_directory(output) as staging:
        model = upcycle(source, **upcycle_kwargs)
        model.save_to_preset(staging)
        if hasattr(model, "backbone"):
            add_preset_metadata(
                staging,
                model,
                name=name,
                description=description,
                weights="upcycled",
                source=entry,
            )
        else:
            _add_backbone_metadata(staging, name, description, entry)
    return model


def _add_backbone_metadata(folder, name, description, entry):
    path = os.path.join(folder, "metadata.json")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    meta.update(name=name, description=description, weights="upcycled", source=entry)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=4)
        f.write("\n")
