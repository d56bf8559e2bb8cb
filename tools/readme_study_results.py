"""Writes a router study's results into README.md and copies its plots.

    python tools/readme_study_results.py study_output \\
        --machine "2-core Intel Xeon, 23 GB, load average 0.1" --wall-time 6m12s

Reads `results.json` of a `keras-vmoe study` output folder and rewrites the
part of README.md between the lines `<!-- study-results:start -->` and
`<!-- study-results:end -->` (section "Router study results"): what was
run and on which machine, with its wall time; the table of per-model means
± std over the seeds; the paired differences against the dense ViT and
Softmax Token Choice with their intervals (bold where an interval excludes
0); the smallest difference the run resolves; and the verdict. The
summary, the differences, the resolution and the verdict are computed from
the runs in `results.json` by `keras_vmoe.study` itself (`summarize`,
`paired_comparisons`, `resolution`, `study_verdict`), as the study prints
them. The plots (`accuracy.png`, `differences.png`, `training_curves.png`,
`routing.png`) are copied to `guides/img/router_study/`, where the README
shows them. Everything outside the markers is left as it is.

The machine and the wall time are arguments because they are facts about
the run that `results.json` cannot vouch for (the load of a shared machine,
say); `--wall-time` defaults to the study's own `wall_seconds`.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
IMAGES = os.path.join(ROOT, "guides", "img", "router_study")
START = "<!-- study-results:start -->"
END = "<!-- study-results:end -->"
PLOTS = ("accuracy.png", "differences.png", "training_curves.png", "routing.png")
NOTE = (
    "<!-- Written by tools/readme_study_results.py from a study's results.json: "
    "edit the tool, not this block. -->"
)


def describe_run(settings, machine, wall_time):
    """The paragraph that says what was run, where, and how long it took."""
    from keras_vmoe.study import DEFAULT, StudyConfig

    config = settings["config"]
    upstream, fewshot = settings["upstream"], settings["fewshot"]
    seeds = settings["seeds"]
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    study = StudyConfig(  # JSON lists back to tuples
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in config.items()
            if k in fields
        }
    )
    passes = study.accumulation_steps
    in_passes = f" in {passes} passes of {study.batch_size // passes}"
    what = "the default study (`keras-vmoe --backend jax study`, what `make demo` runs"
    if study != DEFAULT or settings["backend"] != "jax":
        what = f"a study on {settings['backend']} (`keras-vmoe study`"
    dataset = upstream["dataset"]
    dataset = "Animal-MNIST" if dataset == "animal_mnist" else f"`{dataset}`"
    return (
        f"From one run of {what}: {len(settings['models'])} models x {seeds} "
        f"seeds x {study.epochs} epochs of {upstream['train_images']:,} {dataset} "
        f"images in batches of {study.batch_size}{in_passes if passes > 1 else ''}) "
        f"on {machine}, in {wall_time} of wall time. Means ± std over the "
        f'{seeds} seeds; "test acc" is {dataset} ({upstream["test_images"]:,} '
        'test images), "10-shot acc" the linear transfer to scikit-learn\'s '
        f"digits on frozen features, averaged over {fewshot['draws']} draws of "
        "the shots; dropped tokens, load imbalance and tokens per slot are "
        "measured on the test images, images/s on this machine."
    )


def results_block(results, machine, wall_time=None):
    """The Markdown between the markers, from a loaded `results.json`.

    Args:
        results: dict. The study's `results.json`.
        machine: str. The machine and its load, in words.
        wall_time: str or None. Defaults to the study's `wall_seconds`
            (e.g. `"6m12s"`).

    Returns:
        str, without the markers.
    """
    from keras_vmoe.study.progress import format_duration
    from keras_vmoe.study.report import (
        markdown_differences,
        markdown_table,
        summarize,
    )
    from keras_vmoe.study.verdict import (
        METRICS,
        paired_comparisons,
        resolution,
        study_verdict,
    )

    settings, runs = results["settings"], results["runs"]
    confidence = settings["config"]["confidence"]
    models = list(dict.fromkeys(run["model"] for run in runs))
    seeds = settings["seeds"]
    if wall_time is None:
        wall_time = format_duration(settings["wall_seconds"])
    summary = summarize(runs)
    comparisons = paired_comparisons(runs, confidence)
    resolved = []
    for metric, name in METRICS.items():
        r = resolution(comparisons, metric)
        if r["median"] is not None:
            resolved.append(
                f"{r['median']:.3f} in {name} ({r['min']:.3f} to {r['max']:.3f})"
            )
    verdict = study_verdict(runs, confidence)["text"]
    parts = [
        NOTE,
        describe_run(settings, machine, wall_time),
        markdown_table(summary),
        f"Paired differences over the {seeds} seeds, mean [{confidence:.0%} t "
        "interval]; in bold where the interval excludes 0:",
        markdown_differences(comparisons, models),
    ]
    if resolved:
        parts.append(
            "Smallest difference this run resolves (interval half-width, median "
            "over the comparisons, and its range): " + "; ".join(resolved) + "."
        )
    parts.append(f"**Verdict** (computed from the intervals): {verdict}")
    return "\n\n".join(parts)


def replace_block(text, block):
    """`text` with the lines between the markers replaced by `block`."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(
            f"README.md must hold exactly one {START} line and one {END} line."
        )
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def copy_plots(output_dir, images_dir):
    """Copies the study's plots into `images_dir`; returns the new paths."""
    missing = [p for p in PLOTS if not os.path.isfile(os.path.join(output_dir, p))]
    if missing:
        raise FileNotFoundError(
            f"{output_dir} has no {', '.join(missing)}: not a finished study output."
        )
    os.makedirs(images_dir, exist_ok=True)
    paths = []
    for name in PLOTS:
        paths.append(os.path.join(images_dir, name))
        shutil.copyfile(os.path.join(output_dir, name), paths[-1])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="The study's output folder (results.json).")
    parser.add_argument(
        "--machine",
        required=True,
        help="The machine and its load, in words, e.g. '2-core Intel Xeon, "
        "quiet (load average 0.1)'.",
    )
    parser.add_argument(
        "--wall-time",
        default=None,
        help="Wall time of the run, e.g. '6m12s' (default: the study's own).",
    )
    parser.add_argument("--readme", default=README, help="README to rewrite.")
    parser.add_argument(
        "--images", default=IMAGES, help="Folder the README's plots are in."
    )
    args = parser.parse_args(argv)
    path = os.path.join(args.output, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        text = replace_block(text, results_block(results, args.machine, args.wall_time))
        plots = copy_plots(args.output, args.images)
    except (OSError, ValueError, KeyError) as error:
        print(f"readme_study_results: {error}", file=sys.stderr)
        return 1
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"Rewrote the study results in {args.readme}; copied {len(plots)} plots.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
