"""List the built-in presets with their parameter count and FLOPs per image.

    keras-vmoe presets [--filter TEXT] [--json]

The numbers come from each preset's `metadata.json` (computed from the
config by `keras_vmoe.models.vision_moe.cost`, nothing is built): `parameter_count`
and `flops_per_image` are the backbone's (forward pass, 2 x multiply-
accumulates; experts are charged for every slot at the training capacity
factor); the `--json` output also has the classifier's (with the
1000-class head).
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


def run(args):
    from keras_vmoe.cli.errors import UsageError
    from keras_vmoe.models import list_presets

    presets = list_presets()
    if args.filter:
        presets = {k: v for k, v in presets.items() if args.filter in k}
        if not presets:
            raise UsageError(f"--filter: no preset name contains {args.filter!r}.")
    if args.json:
        print(
            json.dumps(
                {k: {c: v.get(c) for c in COLUMNS} for k, v in presets.items()},
                indent=2,
            )
        )
        return 0
    print(preset_table(presets))
    print(
        f"{len(presets)} presets. params and GFLOPs/image: backbone, forward pass "
        "(2 x multiply-accumulates); load one with "
        "keras_vmoe.models.from_preset(NAME, num_classes=...)."
    )
    return 0
