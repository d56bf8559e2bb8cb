"""List the built-in presets with their parameter count and FLOPs per image.

    keras-vmoe presets [--filter TEXT] [--json]

The numbers come from each preset's `metadata.json` (computed from the
config by `keras_vmoe.models.vision_moe.cost`, nothing is built), read
without importing Keras: `parameter_count`
and `flops_per_image` are the backbone's (forward pass, 2 x multiply-
accumulates; experts are charged for every slot at the training capacity
factor); the `--json` output also has the classifier's (with the
1000-class head).

A second section lists the official V-MoE checkpoints released by
google-research/vmoe (`keras_vmoe.convert.released`): they are not presets
but convert into one with `keras-vmoe convert` once downloaded. Their sizes
come from their vmoe configs through the converter's config mapping (with
their own heads), precomputed in `keras_vmoe.cli.released_sizes`; E3 ensembles are listed as not convertible. In the
`--json` output they are entries with `"kind": "released_vmoe_checkpoint"`.
"""

import json

COLUMNS = (
    "parameter_count",
    "flops_per_image",
    "classifier_parameter_count",
    "classifier_flops_per_image",
    "router",
    "num_experts",
    "moe_layers",
    "sequence_length",
    "description",
)


def add_arguments(parser):
    parser.add_argument(
        "--filter", default=None, help="Only presets whose name contains this text."
    )
    parser.add_argument(
        "--json", action="store_true", help="Print {name: metadata} as JSON."
    )


def human(number, unit=""):
    """`157034504` -> `"157.0M"`; `3.2e9` -> `"3.24G"`.

    Example:
    >>> human(157_034_504), human(3_235_053_568), human(950)
    ('157.0M', '3.24G', '950')
    """
    for scale, suffix, digits in (
        (1e12, "T", 2),
        (1e9, "G", 2),
        (1e6, "M", 1),
        (1e3, "K", 1),
    ):
        if abs(number) >= scale:
            return f"{number / scale:.{digits}f}{suffix}{unit}"
    return f"{number:g}{unit}"


def preset_table(presets):
    """The text table of `{name: metadata}`, one preset per line.

    Example:
    >>> meta = {"parameter_count": 5_000_000, "flops_per_image": 2e9,
    ...         "router": None, "num_experts": None}
    >>> print(preset_table({"tiny": meta}))
    name  params  GFLOPs/image  router  experts
    tiny    5.0M          2.00  dense         -
    """
    rows = [("name", "params", "GFLOPs/image", "router", "experts")]
    for name, meta in presets.items():
        rows.append(
            (
                name,
                human(meta["parameter_count"]),
                f"{meta['flops_per_image'] / 1e9:.2f}",
                meta.get("router") or "dense",
                str(meta.get("num_experts") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            row[1].rjust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].ljust(widths[3]),
            row[4].rjust(widths[4]),
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def released_entries(names=None):
    """`{name: entry}` of the released V-MoE checkpoints, for the listing.

    Each entry has the checkpoint's description, where to get it, whether it
    converts and with which command, and, for a convertible one, the
    backbone's parameters and FLOPs per image (and the classifier's, with
    the checkpoint's own head), computed from its vmoe config through the
    converter's config mapping (nothing is built or downloaded) and stored
    in `keras_vmoe.cli.released_sizes`, so that listing needs no Keras.

    Args:
        names: iterable of str or None. Only these. Defaults to all.

    Example:
    >>> entry = released_entries()["vmoe_b16_imagenet21k_randaug_strong"]
    >>> entry["convertible"], entry["num_experts"], entry["image_size"]
    (True, 8, 224)
    """
    from keras_vmoe.cli.released_sizes import RELEASED_SIZES
    from keras_vmoe.convert.released import RELEASED_CHECKPOINTS

    entries = {}
    for name, record in RELEASED_CHECKPOINTS.items():
        if names is not None and name not in names:
            continue
        entry = {
            "kind": "released_vmoe_checkpoint",
            "convertible": record.supported,
            "description": record.description,
            "dataset": record.dataset,
            "image_size": record.image_size,
            "prefix": record.prefix,
            "download_command": record.download_command,
            "convert_command": record.convert_command,
            "config_source": record.config_source,
            "notes": list(record.notes),
        }
        if record.supported:
            entry.update(RELEASED_SIZES[name])
        entries[name] = entry
    return entries


def released_table(entries):
    """The text table of the released checkpoints.

    Example:
    >>> print(released_table({"tiny": {"convertible": False, "image_size": 128}}))
    name  params  GFLOPs/image  router  experts  image  convert
    tiny       -             -  -             -    128  no (E3 ensemble)
    """
    rows = [("name", "params", "GFLOPs/image", "router", "experts", "image", "convert")]
    for name, entry in entries.items():
        if entry["convertible"]:
            sizes = (
                human(entry["parameter_count"]),
                f"{entry['flops_per_image'] / 1e9:.2f}",
                entry["router"],
                str(entry["num_experts"]),
            )
        else:
            sizes = ("-", "-", "-", "-")
        convert = "yes" if entry["convertible"] else "no (E3 ensemble)"
        rows.append((name, *sizes, str(entry["image_size"]), convert))
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    right = (False, True, True, False, True, True, False)
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if r else cell.ljust(width)
            for cell, width, r in zip(row, widths, right)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args):
    from keras_vmoe.cli.errors import UsageError
    from keras_vmoe.convert.released import RELEASED_CHECKPOINTS
    from keras_vmoe.utils.preset_files import list_preset_metadata

    presets = list_preset_metadata()
    released = list(RELEASED_CHECKPOINTS)
    if args.filter:
        presets = {k: v for k, v in presets.items() if args.filter in k}
        released = [k for k in released if args.filter in k]
        if not presets and not released:
            raise UsageError(f"--filter: no preset name contains {args.filter!r}.")
    entries = released_entries(released)
    if args.json:
        listing = {k: {c: v.get(c) for c in COLUMNS} for k, v in presets.items()}
        listing.update(entries)
        print(json.dumps(listing, indent=2))
        return 0
    if presets:
        print(preset_table(presets))
        print(
            f"{len(presets)} presets. params and GFLOPs/image: backbone, forward pass "
            "(2 x multiply-accumulates); load one with "
            "keras_vmoe.models.from_preset(NAME, num_classes=...)."
        )
    if entries:
        if presets:
            print()
        print(
            "Official V-MoE checkpoints (google-research/vmoe, gs://vmoe_checkpoints/), "
            "convertible into presets:"
        )
        print(released_table(entries))
        convertible = sum(entry["convertible"] for entry in entries.values())
        print(
            f"{len(entries)} released checkpoints, {convertible} convertible. Download "
            "one with `gsutil -m cp 'gs://vmoe_checkpoints/NAME.*' checkpoints/`, then "
            "`keras-vmoe convert --checkpoint checkpoints/NAME --config NAME "
            "--output DIR`."
        )
    return 0
