"""Paired differences of the study's models and the verdict, by hand."""

import csv
import json
import math

import pytest

from keras_vmoe.study import report, verdict

T_975_3DOF = 3.182446  # scipy.stats.t.ppf(0.975, 3)

# Four seeds. Test accuracy: Softmax Token Choice is above the dense ViT on
# every seed, Soft MoE is not; 10-shot accuracy: nothing separates.
TEST = {
    "dense": (0.80, 0.82, 0.81, 0.79),
    "softmax_token_choice": (0.81, 0.84, 0.82, 0.81),
    "soft": (0.80, 0.83, 0.80, 0.80),
}
TEN_SHOT = {
    "dense": (0.40, 0.42, 0.38, 0.40),
    "softmax_token_choice": (0.41, 0.40, 0.39, 0.40),
    "soft": (0.39, 0.43, 0.37, 0.41),
}


def _runs():
    return [
        {
            "model": model,
            "seed": seed,
            "test_accuracy": TEST[model][seed],
            "fewshot": {10: TEN_SHOT[model][seed]},
            "history": {"loss": [1.0]},
        }
        for model in TEST
        for seed in range(4)
    ]


def test_paired_intervals_by_hand():
    comparisons = verdict.paired_comparisons(_runs(), confidence=0.95)
    # Token Choice - dense: 0.01, 0.02, 0.01, 0.02. Mean 0.015; sample std
    # sqrt(4 * 0.005^2 / 3) = 0.0057735; standard error 0.0057735 / 2 =
    # 0.0028868; half-width 3.182446 * 0.0028868 = 0.0091869.
    tc = comparisons["softmax_token_choice"]["dense"]["test_accuracy"]
    assert tc["mean"] == pytest.approx(0.015)
    assert tc["half_width"] == pytest.approx(T_975_3DOF * math.sqrt(1e-4 / 3) / 2)
    assert tc["low"] == pytest.approx(0.015 - 0.0091869, abs=1e-7)
    assert tc["high"] == pytest.approx(0.015 + 0.0091869, abs=1e-7)
    assert tc["resolved"] and tc["num_pairs"] == 4
    # Soft - dense: 0, 0.01, -0.01, 0.01. Mean 0.0025; squared deviations
    # 0.0025^2 + 0.0075^2 + 0.0125^2 + 0.0075^2 = 0.000275; std
    # sqrt(0.000275 / 3) = 0.0095743; half-width 3.182446 * 0.0095743 / 2
    # = 0.0152349: [-0.0127349, 0.0177349], not resolved.
    soft = comparisons["soft"]["dense"]["test_accuracy"]
    assert soft["mean"] == pytest.approx(0.0025)
    assert soft["low"] == pytest.approx(-0.0127349, abs=1e-7)
    assert soft["high"] == pytest.approx(0.0177349, abs=1e-7)
    assert not soft["resolved"]
    # Soft - Token Choice: -0.01, -0.01, -0.02, -0.01. Mean -0.0125; std
    # sqrt((3 * 0.0025^2 + 0.0075^2) / 3) = 0.005; half-width
    # 3.182446 * 0.005 / 2 = 0.0079561: [-0.0204561, -0.0045439].
    soft_tc = comparisons["soft"]["softmax_token_choice"]["test_accuracy"]
    assert soft_tc["mean"] == pytest.approx(-0.0125)
    assert soft_tc["low"] == pytest.approx(-0.0204561, abs=1e-7)
    assert soft_tc["high"] == pytest.approx(-0.0045439, abs=1e-7)
    assert soft_tc["resolved"]
    # The dense ViT is compared with Token Choice too; no model with itself.
    assert set(comparisons["dense"]) == {"softmax_token_choice"}
    assert set(comparisons["softmax_token_choice"]) == {"dense"}
    # Smallest resolvable difference: the half-widths 0.0091869 (dense vs
    # TC and TC vs dense), 0.0152349 and 0.0079561; median 0.0091869.
    res = verdict.resolution(comparisons, "test_accuracy")
    assert res["median"] == pytest.approx(0.0091869, abs=1e-7)
    assert res["min"] == pytest.approx(0.0079561, abs=1e-7)
    assert res["max"] == pytest.approx(0.0152349, abs=1e-7)


def test_verdict_follows_the_intervals():
    result = verdict.study_verdict(_runs())
    test = result["metrics"]["test_accuracy"]
    # Token Choice beats the dense ViT, so a ranking may be read: only the
    # pair whose interval excludes 0 is stated (Token Choice > Soft MoE by
    # 0.0125 [0.0045439, 0.0204561]).
    assert test["moe_beats_dense"] is True
    assert [(p["better"], p["worse"]) for p in test["ranking"]] == [
        ("softmax_token_choice", "soft")
    ]
    pair = test["ranking"][0]
    assert pair["mean"] == pytest.approx(0.0125)
    assert pair["low"] == pytest.approx(0.0045439, abs=1e-7)
    assert pair["high"] == pytest.approx(0.0204561, abs=1e-7)
    assert "above the dense ViT: softmax_token_choice +0.015" in test["text"]
    # 10-shot: Token Choice - dense = 0.01, -0.02, 0.01, 0 and Soft - dense
    # = -0.01, 0.01, -0.01, 0.01 both have mean 0: nothing lies above 0.
    shot = result["metrics"]["fewshot_10shot"]
    assert shot["moe_beats_dense"] is False and shot["ranking"] == []
    assert shot["text"].startswith(
        "10-shot accuracy: the MoE models do not beat the dense model here, so "
        "the ranking cannot be read"
    )
    assert result["text"] == test["text"] + " " + shot["text"]


def test_one_seed_gives_no_verdict():
    runs = [r for r in _runs() if r["seed"] == 0]
    result = verdict.study_verdict(runs)
    assert result["metrics"]["test_accuracy"]["text"] == (
        "test accuracy: one seed, no interval, so no verdict."
    )
    comparisons = verdict.paired_comparisons(runs)
    entry = comparisons["soft"]["dense"]["test_accuracy"]
    assert entry["low"] is None and entry["half_width"] is None
    assert entry["mean"] == pytest.approx(0.0)


def test_differences_in_the_table_and_files(tmp_path):
    runs = _runs()
    comparisons = verdict.paired_comparisons(runs)
    table = report.format_differences(comparisons, list(TEST)).splitlines()
    assert table[0].split()[:5] == ["model", "test", "acc", "-", "dense"]
    # Token Choice - dense: +0.015 [+0.006, +0.024], resolved (*).
    assert table[2].split()[:4] == [
        "softmax_token_choice",
        "+0.015",
        "[+0.006,",
        "+0.024]*",
    ]
    summary = report.summarize(runs)
    report.write_results(
        str(tmp_path), {}, runs, summary, comparisons, verdict.study_verdict(runs)
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 12  # per-seed rows
    entry = data["comparisons"]["soft"]["softmax_token_choice"]["test_accuracy"]
    assert entry["low"] == pytest.approx(-0.0204561, abs=1e-7)
    assert data["verdict"]["metrics"]["test_accuracy"]["moe_beats_dense"] is True
    with open(tmp_path / "differences.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(
        r
        for r in rows
        if (r["model"], r["baseline"], r["metric"])
        == ("soft", "dense", "test_accuracy")
    )
    assert float(row["high"]) == pytest.approx(0.0177349, abs=1e-7)
    assert row["resolved"] == "False" and row["num_pairs"] == "4"
