"""tools/readme_study_results.py: the README's study results from results.json."""

import dataclasses
import importlib.util
import json
import os

import keras
import pytest

from keras_vmoe.study import DEFAULT
from keras_vmoe.study.verdict import study_verdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="text and file handling only: the same on every backend, run once",
)


def _load_tool():
    path = os.path.join(ROOT, "tools", "readme_study_results.py")
    spec = importlib.util.spec_from_file_location("readme_study_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()

# Test and 10-shot accuracy per model for seeds 0 and 1.
SCORES = {
    "dense": ((0.70, 0.72), (0.30, 0.32)),
    "softmax_token_choice": ((0.74, 0.75), (0.31, 0.35)),
    "softmax_expert_choice": ((0.73, 0.76), (0.29, 0.31)),
    "soft": ((0.75, 0.77), (0.28, 0.30)),
}


def _settings(seeds):
    config = json.loads(json.dumps(dataclasses.asdict(DEFAULT.replace(seeds=seeds))))
    return {
        "backend": "jax",
        "models": list(SCORES),
        "seeds": seeds,
        "config": config,
        "upstream": {
            "dataset": "animal_mnist",
            "train_images": 8000,
            "test_images": 2000,
        },
        "fewshot": {"draws": 5},
        "wall_seconds": 372.4,
    }


def _results():
    runs = [
        {
            "model": model,
            "seed": seed,
            "test_accuracy": acc[seed],
            "fewshot": {"10": shot[seed]},  # JSON keys are strings
            "history": {"loss": [1.5, 1.0]},
        }
        for model, (acc, shot) in SCORES.items()
        for seed in (0, 1)
    ]
    return {"settings": _settings(2), "runs": runs}


def _output(tmp_path):
    out = tmp_path / "study_output"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(_results()))
    for index, name in enumerate(tool.PLOTS):
        (out / name).write_bytes(b"\x89PNG" + bytes([index]))
    return out


README = "# Title\n\nBefore.\n\n{start}\nold results\n{end}\n\nAfter.\n"


def test_the_block_is_written_from_the_runs(tmp_path):
    out = _output(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README.format(start=tool.START, end=tool.END))
    images = tmp_path / "img"
    argv = [str(out), "--machine", "a test machine", "--readme", str(readme)]
    argv += ["--images", str(images)]
    assert tool.main(argv) == 0
    text = readme.read_text()
    head, rest = text.split(tool.START + "\n")
    block, tail = rest.split("\n" + tool.END)
    assert head == "# Title\n\nBefore.\n\n" and tail == "\n\nAfter.\n"
    assert "old results" not in block
    # Two seeds is not the default study (4 seeds); the wall time is the
    # study's own 372.4 s.
    assert (
        "From one run of a study on jax (`keras-vmoe study`: 4 models x 2 seeds x "
        "3 epochs of 8,000 Animal-MNIST images in batches of 128 in 4 passes of "
        "32) on a test machine, in 6m12s of wall time." in block
    )
    # dense: test accuracy (0.70 + 0.72) / 2 = 0.71, std 0.02 / sqrt(2) =
    # 0.014; 10-shot 0.31 ± 0.014; no throughput or routing numbers given.
    assert "| dense | 2 | 0.710 ± 0.014 | 0.310 ± 0.014 | - | - | - | - | - |" in block
    # soft - dense, test accuracy: 0.75 - 0.70 = 0.77 - 0.72 = 0.05 on both
    # seeds, so the interval is [+0.050, +0.050] and excludes 0 (bold).
    # soft - softmax TC: 0.01 and 0.02, mean 0.015, std 0.00707, half-width
    # t(0.975, 1 df) x std / sqrt(2) = 12.706 x 0.005 = 0.0635, so
    # [-0.049, +0.079]. 10-shot: soft - dense -0.02 twice (bold, below 0);
    # soft - TC -0.03 and -0.05: mean -0.040, half-width 12.706 x 0.01 =
    # 0.127, so [-0.167, +0.087].
    assert (
        "| soft | **+0.050 [+0.050, +0.050]** | +0.015 [-0.049, +0.079] | "
        "**-0.020 [-0.020, -0.020]** | -0.040 [-0.167, +0.087] |" in block
    )
    # The smallest resolvable difference in test accuracy: the six
    # half-widths are 0.0635 (TC - dense, EC - dense: 0.03 and 0.04 apart
    # by 0.01; dense - TC; soft - TC), 0.127 (EC - TC: -0.01, +0.01) and 0
    # (soft - dense): median 0.0635, range 0 to 0.127.
    assert "0.064 in test accuracy (0.000 to 0.127)" in block
    verdict = study_verdict(_results()["runs"], 0.95)["text"]
    assert f"**Verdict** (computed from the intervals): {verdict}" in block
    assert verdict.startswith("test accuracy: above the dense ViT: soft +0.050")
    for index, name in enumerate(tool.PLOTS):
        assert (images / name).read_bytes() == b"\x89PNG" + bytes([index])
    # Running it again changes nothing.
    assert tool.main(argv) == 0
    assert readme.read_text() == text


def test_the_default_study_is_named_as_make_demo():
    settings = _settings(4)
    text = tool.describe_run(settings, "a quiet machine", "5m00s")
    assert text.startswith(
        "From one run of the default study (`keras-vmoe --backend jax study`, what "
        "`make demo` runs: 4 models x 4 seeds x 3 epochs of 8,000 Animal-MNIST "
        "images in batches of 128 in 4 passes of 32) on a quiet machine, in 5m00s"
    )


def test_missing_markers_or_plots_change_nothing(tmp_path, capsys):
    out = _output(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# No markers\n")
    argv = [str(out), "--machine", "m", "--readme", str(readme)]
    argv += ["--images", str(tmp_path / "img")]
    assert tool.main(argv) == 1
    assert "must hold exactly one <!-- study-results:start --> line" in (
        capsys.readouterr().err
    )
    assert readme.read_text() == "# No markers\n"
    readme.write_text(README.format(start=tool.START, end=tool.END))
    (out / "routing.png").unlink()
    assert tool.main(argv) == 1
    assert "has no routing.png" in capsys.readouterr().err
    assert "old results" in readme.read_text()


def test_the_readme_has_the_markers():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.count(tool.START) == 1 and text.count(tool.END) == 1
    assert text.index(tool.START) > text.index("### Router study results")
    for name in tool.PLOTS:  # the plots the README shows are the tool's
        assert f"(guides/img/router_study/{name})" in text
