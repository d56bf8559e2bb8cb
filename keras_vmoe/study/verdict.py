"""Paired comparisons between the study's models and the verdict they allow.

Every model is trained with the same seeds, and seed `s` fixes the data
order, the augmentation and the few-shot draws for all of them, so the
per-seed scores of two models are paired (`statistics.paired_difference`).
For each router the study reports its difference against the dense ViT and
against Softmax Token Choice, with a t interval, and the verdict is read off
those intervals only:

1. If no MoE model's interval against the dense ViT lies above 0, the MoE
   models do not beat the dense model here, and the ranking cannot be read
   (the experts bring nothing for a router to make better or worse).
2. Otherwise, a ranking is stated only between routers whose pairwise
   interval excludes 0; the others are tied at this resolution.

The half-width of an interval is the smallest difference the run can
resolve for that comparison (`statistics.half_width_of`).
"""

import itertools

import numpy as np

from keras_vmoe.study.report import flat_run
from keras_vmoe.study.statistics import paired_difference

DENSE = "dense"
TOKEN_CHOICE = "softmax_token_choice"
BASELINES = (DENSE, TOKEN_CHOICE)
# Metric -> its name in sentences.
METRICS = {"test_accuracy": "test accuracy", "fewshot_10shot": "10-shot accuracy"}


def per_seed(runs, model, metric):
    """`{seed: value}` of one model's metric (`flat_run` names)."""
    return {
        run["seed"]: flat_run(run).get(metric) for run in runs if run["model"] == model
    }


def compare(runs, model, baseline, metric, confidence=0.95):
    """`PairedDifference` of `model - baseline` over their common seeds.

    Returns None when they share no seed.

    Example (seeds 0-2: differences 0.02, 0.04, 0.00, see
    `paired_difference`):
    >>> runs = [{"model": m, "seed": s, "fewshot": {}, "test_accuracy": a}
    ...         for m, accs in (("a", (.82, .84, .80)), ("b", (.8, .8, .8)))
    ...         for s, a in enumerate(accs)]
    >>> d = compare(runs, "a", "b", "test_accuracy")
    >>> round(d.mean, 6), round(d.high - d.mean, 6)
    (0.02, 0.049683)
    """
    values = per_seed(runs, model, metric)
    base = per_seed(runs, baseline, metric)
    seeds = sorted(set(values) & set(base))
    if not seeds:
        return None
    return paired_difference(
        [values[s] for s in seeds], [base[s] for s in seeds], confidence
    )


def _models(runs):
    return list(dict.fromkeys(run["model"] for run in runs))


def paired_comparisons(runs, confidence=0.95, baselines=BASELINES, metrics=METRICS):
    """Every model against every baseline present, for every metric.

    Returns:
        dict `{model: {baseline: {metric: PairedDifference.as_dict() plus
        "half_width"}}}` (a model is not compared with itself).
    """
    models = _models(runs)
    result = {}
    for model in models:
        for baseline in baselines:
            if baseline == model or baseline not in models:
                continue
            for metric in metrics:
                d = compare(runs, model, baseline, metric, confidence)
                if d is None:
                    continue
                entry = d.as_dict()
                entry["half_width"] = None if d.low is None else d.high - d.mean
                entry["resolved"] = d.resolved
                result.setdefault(model, {}).setdefault(baseline, {})[metric] = entry
    return result


def _fmt(d):
    if d.low is None:
        return f"{d.mean:+.3f}"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def _metric_verdict(runs, metric, confidence):
    """The verdict on one metric: a dict with `text` and the pairs used."""
    name = METRICS.get(metric, metric)
    models = _models(runs)
    routers = [m for m in models if m != DENSE]
    seeds = max((len(per_seed(runs, m, metric)) for m in models), default=0)
    if seeds < 2:
        return {
            "text": f"{name}: one seed, no interval, so no verdict.",
            "moe_beats_dense": None,
            "ranking": [],
        }
    beats = None
    sentences = []
    if DENSE in models and routers:
        versus = {r: compare(runs, r, DENSE, metric, confidence) for r in routers}
        above = [r for r, d in versus.items() if d and d.resolved and d.mean > 0]
        below = [r for r, d in versus.items() if d and d.resolved and d.mean < 0]
        beats = bool(above)
        if not above:
            sentences.append(
                f"{name}: the MoE models do not beat the dense model here, so "
                "the ranking cannot be read (no interval against the dense ViT "
                "lies above 0)."
            )
            if below:
                sentences.append(
                    "Below the dense ViT: "
                    + ", ".join(f"{r} {_fmt(versus[r])}" for r in below)
                    + "."
                )
            return {
                "text": " ".join(sentences),
                "moe_beats_dense": False,
                "ranking": [],
            }
        sentences.append(
            f"{name}: above the dense ViT: "
            + ", ".join(f"{r} {_fmt(versus[r])}" for r in above)
            + "."
        )
    ranking = []
    for a, b in itertools.combinations(routers, 2):
        d = compare(runs, a, b, metric, confidence)
        if d is not None and d.resolved:
            winner, loser = (a, b) if d.mean > 0 else (b, a)
            sign = 1 if d.mean > 0 else -1
            ranking.append(
                {
                    "better": winner,
                    "worse": loser,
                    "mean": sign * d.mean,
                    "low": min(sign * d.low, sign * d.high),
                    "high": max(sign * d.low, sign * d.high),
                }
            )
    if len(routers) > 1:
        if ranking:
            sentences.append(
                "Routers that separate: "
                + "; ".join(
                    f"{p['better']} > {p['worse']} by {p['mean']:.3f} "
                    f"[{p['low']:.3f}, {p['high']:.3f}]"
                    for p in ranking
                )
                + "; the other pairs are tied at this resolution."
            )
        else:
            sentences.append(
                "No two routers separate: no ranking can be stated at this resolution."
            )
    return {"text": " ".join(sentences), "moe_beats_dense": beats, "ranking": ranking}


def resolution(comparisons, metric):
    """Half-widths of one metric's comparisons: `{"min", "median", "max"}`.

    The smallest difference this run resolves (median over the
    comparisons), and its range; `None` values without intervals.
    """
    widths = [
        by_metric[metric]["half_width"]
        for by_baseline in comparisons.values()
        for by_metric in by_baseline.values()
        if metric in by_metric and by_metric[metric]["half_width"] is not None
    ]
    if not widths:
        return {"min": None, "median": None, "max": None}
    return {
        "min": float(np.min(widths)),
        "median": float(np.median(widths)),
        "max": float(np.max(widths)),
    }


def study_verdict(runs, confidence=0.95, metrics=METRICS):
    """The verdict of a study, computed from its paired intervals.

    Args:
        runs: list of run dicts (`train_and_evaluate` results).
        confidence: float. Coverage of the intervals.
        metrics: dict of metric -> name; the first is the primary one.

    Returns:
        dict: `text` (the printed verdict, one sentence group per metric),
        and per metric `{text, moe_beats_dense, ranking}` under `metrics`.
    """
    per_metric = {m: _metric_verdict(runs, m, confidence) for m in metrics}
    return {
        "text": " ".join(v["text"] for v in per_metric.values()),
        "metrics": per_metric,
    }
