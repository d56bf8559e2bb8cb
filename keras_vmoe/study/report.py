"""The study's report: mean and std over seeds, tables, JSON and CSV files.

`results.json` holds the settings (with the equal-compute statement), the
per-model summary, every run (per seed), the paired differences against the
baselines with their intervals, and the verdict; `results.csv` has one row
per run (model, seed), `summary.csv` one row per model with means and stds,
and `differences.csv` one row per (model, baseline, metric) with the mean
paired difference and its interval.
"""

import csv
import json
import math
import os

import numpy as np

# Per-run scalar metrics, in table and CSV order (few-shot columns follow).
METRICS = (
    "test_accuracy",
    "fewshot_10shot",
    "images_per_second",
    "gflops_per_image",
    "fraction_tokens_dropped",
    "load_imbalance",
    "slots_per_group",
    "images_per_group",
    "tokens_per_slot",
    "max_dispatch_weight",
    "params",
    "train_seconds",
)
# (header, metric, format) of the printed table.
TABLE_COLUMNS = (
    ("test acc", "test_accuracy", "{:.3f}"),
    ("10-shot acc", "fewshot_10shot", "{:.3f}"),
    ("images/s", "images_per_second", "{:.0f}"),
    ("GFLOPs/img", "gflops_per_image", "{:.5f}"),
    ("dropped", "fraction_tokens_dropped", "{:.3f}"),
    ("imbalance", "load_imbalance", "{:.2f}"),
    ("tokens/slot", "tokens_per_slot", "{:.1f}"),
)
# (header, baseline, metric) of the paired-differences table.
DIFFERENCE_COLUMNS = (
    ("test acc - dense", "dense", "test_accuracy"),
    ("test acc - softmax TC", "softmax_token_choice", "test_accuracy"),
    ("10-shot - dense", "dense", "fewshot_10shot"),
    ("10-shot - softmax TC", "softmax_token_choice", "fewshot_10shot"),
)


def mean_std(values):
    """Mean and sample standard deviation (ddof=1) of the non-missing values.

    Args:
        values: sequence of float or None.

    Returns:
        `(mean, std)`: `std` is None with fewer than two values; both are
        None with none.

    Example:
    >>> mean_std([0.5, 0.7, 0.9])  # std = sqrt((0.04 + 0 + 0.04) / 2) = 0.2
    (0.7, 0.2)
    >>> mean_std([0.5]), mean_std([None])
    ((0.5, None), (None, None))
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None, None
    mean = float(np.mean(kept))
    if len(kept) < 2:
        return round(mean, 12), None
    return round(mean, 12), round(float(np.std(kept, ddof=1)), 12)


def flat_run(run):
    """The scalar metrics of one run, with `fewshot_{shot}shot` keys."""
    row = {"model": run["model"], "seed": run["seed"]}
    for shot, accuracy in sorted(run["fewshot"].items()):
        row[f"fewshot_{shot}shot"] = accuracy
    for name in METRICS:
        row.setdefault(name, run.get(name))
    return row


def summarize(runs):
    """Mean and std over seeds of every metric, per model, in run order.

    Args:
        runs: list of run dicts (`train_and_evaluate` results).

    Returns:
        dict `{model: {"seeds": n, metric: {"mean": m, "std": s}, ...,
        "loss_curve": mean loss per epoch}}`.

    Example:
    >>> runs = [{"model": "soft", "seed": s, "fewshot": {10: a},
    ...          "test_accuracy": a, "history": {"loss": [2.0, l]}}
    ...         for s, a, l in [(0, 0.6, 1.0), (1, 0.8, 0.5)]]
    >>> summary = summarize(runs)["soft"]
    >>> summary["test_accuracy"]["mean"], round(summary["test_accuracy"]["std"], 4)
    (0.7, 0.1414)
    >>> summary["loss_curve"]
    [2.0, 0.75]
    """
    by_model = {}
    for run in runs:
        by_model.setdefault(run["model"], []).append(run)
    summary = {}
    for model, model_runs in by_model.items():
        rows = [flat_run(r) for r in model_runs]
        entry = {"seeds": len(rows)}
        for key in rows[0]:
            if key in ("model", "seed"):
                continue
            mean, std = mean_std([row.get(key) for row in rows])
            entry[key] = {"mean": mean, "std": std}
        curves = [r["history"]["loss"] for r in model_runs if "history" in r]
        if curves:
            length = min(len(c) for c in curves)
            entry["loss_curve"] = [
                round(float(np.mean([c[i] for c in curves])), 12) for i in range(length)
            ]
        summary[model] = entry
    return summary


def _cell(stat, fmt):
    if stat is None or stat["mean"] is None:
        return "-"
    text = fmt.format(stat["mean"])
    if stat["std"] is not None:
        text += " ± " + fmt.format(stat["std"])
    return text


def format_table(summary):
    """The summary as an aligned text table (mean ± std over seeds).

    Example:
    >>> print(format_table({"dense": {"seeds": 1,
    ...     "test_accuracy": {"mean": 0.8, "std": None}}}))  # doctest: +NORMALIZE_WHITESPACE
    model  seeds  test acc  10-shot acc  images/s  GFLOPs/img  dropped  imbalance  tokens/slot
    dense      1     0.800            -         -           -        -          -            -
    """
    return _aligned(*_table_cells(summary))


def _table_cells(summary):
    """The header and the rows of cells (strings) of the per-model table."""
    header = ["model", "seeds"] + [title for title, _, _ in TABLE_COLUMNS]
    rows = [
        [model, str(entry["seeds"])]
        + [_cell(entry.get(metric), fmt) for _, metric, fmt in TABLE_COLUMNS]
        for model, entry in summary.items()
    ]
    return header, rows


def _aligned(header, rows):
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest)

    return "\n".join([line(header)] + [line(r) for r in rows])


def _difference_cell(entry):
    if entry is None:
        return "-"
    if entry["low"] is None:
        return f"{entry['mean']:+.3f}"
    mark = "*" if entry["resolved"] else " "
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]{mark}"


def format_differences(comparisons, models):
    """The paired differences as a table: mean [interval], `*` where resolved.

    Args:
        comparisons: dict from `verdict.paired_comparisons`.
        models: sequence of model names, in table order.

    Example:
    >>> cmp = {"soft": {"dense": {"test_accuracy": {"mean": 0.01,
    ...     "low": -0.02, "high": 0.04, "resolved": False}}}}
    >>> print(format_differences(cmp, ["dense", "soft"]).splitlines()[2])
    ... # doctest: +NORMALIZE_WHITESPACE
    soft   +0.010 [-0.020, +0.040]   -   -   -
    """
    header = ["model"] + [title for title, _, _ in DIFFERENCE_COLUMNS]
    rows = []
    for model in models:
        by_baseline = comparisons.get(model, {})
        rows.append(
            [model]
            + [
                _difference_cell(by_baseline.get(baseline, {}).get(metric))
                for _, baseline, metric in DIFFERENCE_COLUMNS
            ]
        )
    return _aligned(header, rows)


def _markdown(header, rows, align_first="---"):
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join([align_first] + ["---:"] * (len(header) - 1)) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(summary):
    """`format_table` as a Markdown table (mean ± std over seeds).

    Example:
    >>> print(markdown_table({"dense": {"seeds": 2,
    ...     "test_accuracy": {"mean": 0.8, "std": 0.01}}}))
    | model | seeds | test acc | 10-shot acc | images/s | GFLOPs/img | dropped | imbalance | tokens/slot |
    | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
    | dense | 2 | 0.800 ± 0.010 | - | - | - | - | - | - |
    """
    return _markdown(*_table_cells(summary))


def markdown_differences(comparisons, models):
    """`format_differences` as a Markdown table, in bold where resolved.

    Example:
    >>> cmp = {"soft": {"dense": {"test_accuracy": {"mean": 0.03,
    ...     "low": 0.01, "high": 0.05, "resolved": True}}}}
    >>> print(markdown_differences(cmp, ["dense", "soft"]).splitlines()[-1])
    | soft | **+0.030 [+0.010, +0.050]** | - | - | - |
    """
    header = ["model"] + [title for title, _, _ in DIFFERENCE_COLUMNS]
    rows = []
    for model in models:
        by_baseline = comparisons.get(model, {})
        cells = [model]
        for _, baseline, metric in DIFFERENCE_COLUMNS:
            entry = by_baseline.get(baseline, {}).get(metric)
            text = _difference_cell(entry).rstrip("* ")
            if entry is not None and entry.get("resolved"):
                text = f"**{text}**"
            cells.append(text)
        rows.append(cells)
    return _markdown(header, rows)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_results(output_dir, settings, runs, summary, comparisons=None, verdict=None):
    """Writes `results.json`, `results.csv`, `summary.csv`, `differences.csv`.

    Args:
        output_dir: str. An existing directory.
        settings: dict. Study settings (JSON-serialisable).
        runs: list of run dicts (arrays such as `expert_maps` are left out).
        summary: dict from `summarize`.
        comparisons: dict from `verdict.paired_comparisons` or None.
        verdict: dict from `verdict.study_verdict` or None.

    Returns:
        dict of file kind -> path.

    Example:

    ```python
    write_results("study_output", settings, runs, summarize(runs))
    ```
    """
    paths = {
        "json": os.path.join(output_dir, "results.json"),
        "csv": os.path.join(output_dir, "results.csv"),
        "summary_csv": os.path.join(output_dir, "summary.csv"),
        "differences_csv": os.path.join(output_dir, "differences.csv"),
    }
    comparisons = comparisons or {}
    clean_runs = [{k: v for k, v in run.items() if k != "expert_maps"} for run in runs]
    with open(paths["json"], "w") as f:
        json.dump(
            _json_ready(
                {
                    "settings": settings,
                    "summary": summary,
                    "comparisons": comparisons,
                    "verdict": verdict,
                    "runs": clean_runs,
                }
            ),
            f,
            indent=2,
        )
        f.write("\n")
    rows = [flat_run(run) for run in runs]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(
            {k: ("" if v is None else v) for k, v in row.items()} for row in rows
        )
    metric_names = [k for k in fields if k not in ("model", "seed")]
    with open(paths["summary_csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["model", "seeds"]
            + [f"{m}_{s}" for m in metric_names for s in ("mean", "std")]
        )
        for model, entry in summary.items():
            cells = [model, entry["seeds"]]
            for m in metric_names:
                stat = entry.get(m) or {"mean": None, "std": None}
                cells += ["" if stat[s] is None else stat[s] for s in ("mean", "std")]
            writer.writerow(cells)
    fields = ("model", "baseline", "metric", "mean", "low", "high", "half_width")
    fields += ("num_pairs", "confidence", "resolved")
    with open(paths["differences_csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for model, by_baseline in comparisons.items():
            for baseline, by_metric in by_baseline.items():
                for metric, entry in by_metric.items():
                    cells = [model, baseline, metric]
                    cells += [entry.get(k) for k in fields[3:]]
                    writer.writerow(["" if c is None else c for c in cells])
    return paths
