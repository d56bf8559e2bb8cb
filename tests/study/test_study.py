"""`keras-vmoe study`: equal-compute arithmetic, report, routing maps, CLI."""

import csv
import json
import math
import os
import re

import keras
import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.routers import (
    ROUTER_NAMES,
    SoftRouting,
    SparseRouting,
    TokenChoiceRouter,
    get_class,
)
from keras_vmoe.study import (
    DEFAULT,
    QUICK,
    StudyConfig,
    report,
    routing_maps,
)
from keras_vmoe.study import config as study_config

BACKEND = keras.backend.backend()


# --------------------------------------------------------------------------
# Equal compute, worked out by hand.
# --------------------------------------------------------------------------
def test_default_equal_compute_by_hand():
    # 28x28 images, patch 7 -> 4*4 = 16 patches + class token = 17 tokens;
    # 4 images per group -> S = 68. K = 2, c = 1, E = 8:
    # C = ceil(68 * 2 * 1 / 8) = ceil(17) = 17 slots per expert: Token
    # Choice with K = 2 and capacity 17, Expert Choice with capacity 17,
    # Soft MoE with 17 slots per expert.
    # E * C = 136 slots per group = 2 per token.
    plan = study_config.equal_compute(DEFAULT)
    assert plan["tokens_per_group"] == 68
    assert plan["slots_per_expert"] == 17
    assert plan["slots_per_group"] == 136
    assert plan["slots_per_token"] == 2.0
    assert plan["expert_hidden_dim"] == 64  # 128 / K
    configs = plan["router_configs"]
    assert set(configs) == set(ROUTER_NAMES)
    for name in ("softmax_token_choice", "sinkhorn_token_choice"):
        assert configs[name] == {
            "num_selected_experts": 2,
            "capacity": 17,
            "capacity_multiple_of": 1,
        }
    for name in (
        "softmax_expert_choice",
        "sinkhorn_expert_choice",
        "sparsity_constrained_expert_choice",
    ):
        assert configs[name] == {"capacity": 17, "capacity_multiple_of": 1}
    assert configs["soft"] == {"num_slots": 17}


@pytest.mark.parametrize(
    "config, slots_per_expert",
    [
        # c = 1.05: ceil(68 * 2 * 1.05 / 8) = ceil(17.85) = 18 (EC: 2.1).
        (DEFAULT.replace(capacity_factor=1.05), 18),
        # 3 images: S = 51, ceil(51 * 2 / 8) = ceil(12.75) = 13.
        (DEFAULT.replace(group_size=3, batch_size=126, eval_batch_size=150), 13),
        # Quick: S = 2 * 17 = 34, E = 4: ceil(34 * 2 / 4) = 17.
        (QUICK, 17),
    ],
)
def test_every_router_runs_the_same_slots(config, slots_per_expert):
    config.validate()
    plan = study_config.equal_compute(config)
    assert plan["slots_per_expert"] == slots_per_expert
    s = config.tokens_per_group
    for name in ROUTER_NAMES:
        router = get_class(name)(
            num_experts=config.num_experts, **plan["router_configs"][name]
        )
        capacity = router.slots_per_expert(s, training=True)
        assert router.slots_per_expert(s, training=False) == capacity  # eval: same
        assert capacity == slots_per_expert, name
        if isinstance(router, TokenChoiceRouter):
            assert router.num_selected_experts == config.num_selected_experts


def test_analytic_flops_are_matched():
    from keras_vmoe.models.vision_moe.cost import backbone_flops

    dense = backbone_flops(study_config.backbone_config(DEFAULT, "dense"))
    for name in ROUTER_NAMES:
        flops = backbone_flops(study_config.backbone_config(DEFAULT, name))
        extra = flops - dense
        # Sparse routers add only the gating matmul: 2 MoE layers x 17 tokens
        # x d=64 x E=8 MACs x 2 = 34,816 FLOPs per image.
        if name != "soft":
            assert extra == 2 * 2 * 17 * 64 * 8, name
        else:  # Soft MoE: logits, dispatch, combine over 136 slots per group.
            assert extra == 2 * 2 * 3 * 17 * 64 * 136, name


def test_bad_study_settings_are_rejected():
    with pytest.raises(ValueError, match="multiple of the routing group"):
        DEFAULT.replace(batch_size=130).validate()
    with pytest.raises(ValueError, match="patch_size"):
        DEFAULT.replace(patch_size=5).validate()
    with pytest.raises(ValueError, match="epochs"):
        StudyConfig(epochs=0).validate()


# --------------------------------------------------------------------------
# Report arithmetic, with hand numbers.
# --------------------------------------------------------------------------
def test_mean_std_by_hand():
    # mean 0.7; sample std = sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1)) = 0.2.
    assert report.mean_std([0.5, 0.7, 0.9]) == (0.7, 0.2)
    # 1 and 4: mean 2.5, std = sqrt((2.25 + 2.25) / 1) = 2.1213...
    mean, std = report.mean_std([1.0, None, 4.0])
    assert mean == 2.5 and math.isclose(std, math.sqrt(4.5))
    assert report.mean_std([0.3]) == (0.3, None)
    assert report.mean_std([]) == (None, None)


def _fake_run(model, seed, acc, shot10, loss, dropped=None):
    return {
        "model": model,
        "seed": seed,
        "test_accuracy": acc,
        "fewshot": {1: 0.1, 10: shot10},
        "images_per_second": 100.0 * (seed + 1),
        "gflops_per_image": 0.005,
        "fraction_tokens_dropped": dropped,
        "load_imbalance": None if dropped is None else 1.5,
        "history": {"loss": loss, "accuracy": [0.1] * len(loss)},
    }


def test_summary_table_and_files(tmp_path):
    runs = [
        _fake_run("dense", 0, 0.60, 0.40, [2.0, 1.0]),
        _fake_run("dense", 1, 0.80, 0.50, [2.2, 0.6]),
        _fake_run("soft", 0, 0.70, 0.45, [2.1, 0.9], dropped=0.0),
    ]
    summary = report.summarize(runs)
    dense = summary["dense"]
    assert dense["seeds"] == 2
    assert dense["test_accuracy"]["mean"] == 0.7
    # sample std of (0.6, 0.8) = |0.8 - 0.6| / sqrt(2) = 0.14142...
    assert math.isclose(dense["test_accuracy"]["std"], 0.2 / math.sqrt(2))
    # 100 and 200 images/s: std = 100 / sqrt(2) = 70.71...
    assert dense["images_per_second"]["mean"] == 150.0
    assert math.isclose(dense["images_per_second"]["std"], 100 / math.sqrt(2))
    assert dense["fraction_tokens_dropped"] == {"mean": None, "std": None}
    assert dense["loss_curve"] == [2.1, 0.8]
    assert summary["soft"]["test_accuracy"] == {"mean": 0.7, "std": None}

    table = report.format_table(summary).splitlines()
    assert table[0].split()[:4] == ["model", "seeds", "test", "acc"]
    assert table[1].split()[:5] == ["dense", "2", "0.700", "±", "0.141"]
    assert table[2].split()[:3] == ["soft", "1", "0.700"]
    assert table[1].split()[-2:] == ["-", "-"]  # dense: no dropped/imbalance

    paths = report.write_results(str(tmp_path), {"note": "x"}, runs, summary)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["settings"] == {"note": "x"} and len(data["runs"]) == 3
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in rows] == [
        ("dense", "0"),
        ("dense", "1"),
        ("soft", "0"),
    ]
    assert rows[1]["fewshot_10shot"] == "0.5" and rows[0]["load_imbalance"] == ""
    with open(paths["summary_csv"]) as f:
        summary_rows = list(csv.DictReader(f))
    assert summary_rows[0]["test_accuracy_mean"] == "0.7"
    assert summary_rows[1]["test_accuracy_std"] == ""


def test_plots_of_a_two_seed_summary(tmp_path):
    from keras_vmoe.study import plots

    runs = [
        _fake_run("dense", 0, 0.60, 0.40, [2.0, 1.0]),
        _fake_run("dense", 1, 0.80, 0.50, [2.2, 0.6]),
        _fake_run("soft", 0, 0.70, 0.45, [2.1, 0.9], dropped=0.0),
        _fake_run("soft", 1, 0.72, 0.47, [2.0, 0.8], dropped=0.0),
    ]
    # Two 28x28 images; soft sends the 4x4 patches to experts 0..3 by row,
    # with one patch unrouted (-1, grey).
    maps = np.repeat(np.arange(4)[None, :, None], 4, axis=2).repeat(2, axis=0)
    maps[0, 0, 0] = -1
    images = np.linspace(-1, 1, 2 * 28 * 28, dtype="float32").reshape(2, 28, 28, 1)
    paths = plots.write_plots(
        str(tmp_path), report.summarize(runs), {"soft": maps}, images, 4
    )
    assert sorted(paths) == ["accuracy", "routing", "training_curves"]
    for path in paths.values():
        _check_png(tmp_path / os.path.basename(path))


# --------------------------------------------------------------------------
# Routing maps.
# --------------------------------------------------------------------------
def test_expert_per_token_sparse_and_soft():
    # 1 group of 4 tokens, 2 experts with 2 slots. Expert 0 holds tokens 0
    # and 1 (weights .2, .9), expert 1 holds token 0 (weight .8); token 2 is
    # in no slot (dropped), token 3's slot is masked off.
    slot_token = np.array([[[0, 1], [0, 3]]])
    mask = np.array([[[1, 1], [1, 0]]], "float32")
    weight = np.array([[[0.2, 0.9], [0.8, 0.0]]], "float32")
    routing = SparseRouting(slot_token, mask, weight, num_tokens=4)
    assert routing_maps.expert_per_token(routing).tolist() == [[1, 0, -1, -1]]
    # Soft: 1 group, 2 tokens, 2 experts x 1 slot; the largest dispatch
    # weight of token 0 is in expert 1's slot, of token 1 in expert 0's.
    dispatch = np.array([[[[0.3], [0.6]], [[0.7], [0.4]]]], "float32")
    soft = SoftRouting(dispatch, dispatch)
    assert routing_maps.expert_per_token(soft).tolist() == [[1, 0]]


# --------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--routers", "softmax,soft"], "unknown router 'softmax'"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0."),
        (["--epochs", "0"], "--epochs must be >= 1, got 0."),
        (["--batch-size", "30"], "multiple of the routing group"),
    ],
)
def test_bad_arguments_exit_2(args, message, tmp_path, capsys):
    assert cli.main(["study", "--output", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-vmoe study: error: ") and "\n" not in err
    assert message in err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_unwritable_output_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert cli.main(["study", "--quick", "--output", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-vmoe study: error: cannot write to --output")
    assert "\n" not in err


def test_quick_xla_flag_is_scoped(monkeypatch):
    from keras_vmoe.cli import study as command

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with command._fast_xla_compilation(True):
        inside = os.environ["XLA_FLAGS"]
    after = os.environ["XLA_FLAGS"]
    assert after == "--xla_force_host_platform_device_count=8"
    if BACKEND == "jax":
        assert inside.endswith(" --xla_backend_optimization_level=0")
    else:
        assert inside == after


def _check_png(path):
    import matplotlib.image

    assert path.stat().st_size > 5_000, path
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and min(image.shape[:2]) > 200, image.shape
    assert image[..., :3].std() > 0.01  # not a blank canvas


# JAX and TensorFlow run the whole quick study (7 models; JAX about 80 s of
# compilation on a cold cache, 30 s warm); torch, slow per step in eager
# mode, runs four models.
if BACKEND in ("jax", "tensorflow"):
    QUICK_MODELS = study_config.model_names()
else:
    QUICK_MODELS = ("dense", "softmax_token_choice", "softmax_expert_choice", "soft")


# Fields that do not apply to the dense ViT (it has no MoE layer).
MOE_ONLY_FIELDS = ("fraction_tokens_dropped", "load_imbalance", "slots_per_group")


def _assert_all_finite(value, where):
    """Every number under `value` is finite; `None` is allowed nowhere.

    The report writes NaN as JSON `null`, so a `None` is a failure too.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_all_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _assert_all_finite(item, f"{where}[{index}]")
    elif not isinstance(value, str):
        assert isinstance(value, (int, float)), f"{where} = {value!r}"
        assert math.isfinite(value), f"{where} = {value!r}"


def test_quick_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    routers = ",".join(m for m in QUICK_MODELS)
    assert (
        cli.main(["study", "--quick", "--routers", routers, "--output", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    # One progress line per model: which model and epoch, and the time left.
    for index, model in enumerate(QUICK_MODELS, 1):
        line = f"[{index}/{len(QUICK_MODELS)}] {model} seed 0  epoch 1/1  loss "
        assert line in printed, line
    assert re.search(r"\(study: (\d+m\d\ds|\d+s) left\)\n", printed), printed
    assert "Equal compute: every router fills E x C = 4 x 17 = 68" in printed
    for model in QUICK_MODELS:
        assert f"\n{model} " in printed  # a table row

    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == list(QUICK_MODELS)
    assert results["settings"]["backend"] == BACKEND
    plan = results["settings"]["equal_compute"]
    # Quick: S = 2 images x 17 tokens = 34; E = 4, K = 2, c = 1:
    # C = ceil(34 * 2 / 4) = 17 per expert, 68 slots per group.
    assert plan["slots_per_expert"] == 17 and plan["slots_per_group"] == 68
    assert "dense ViT matches K = 2" in plan["statement"]
    for run in results["runs"]:
        # Every field of every run is a finite number (those of the MoE
        # layers are absent, None, for the dense ViT only).
        moe_only = MOE_ONLY_FIELDS if run["model"] == "dense" else ()
        _assert_all_finite(
            {k: v for k, v in run.items() if k not in moe_only}, run["model"]
        )
        assert (run["routing_statistics"] == {}) == (run["model"] == "dense")
        for name in ("params", "train_seconds", "seconds", "train_images_per_epoch"):
            assert run[name] > 0, (run["model"], name)
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert set(run["fewshot"]) == {"1", "5", "10", "25"}
        assert all(0.0 <= a <= 1.0 for a in run["fewshot"].values())
        assert len(run["history"]["loss"]) == 1
        assert run["images_per_second"] > 0 and run["gflops_per_image"] > 0
        if run["model"] == "dense":
            assert run["slots_per_group"] is None
            assert run["fraction_tokens_dropped"] is None
        else:
            # The slots the last MoE layer actually ran at evaluation.
            assert run["slots_per_group"] == 68, run["model"]
            assert 0.0 <= run["fraction_tokens_dropped"] <= 1.0
            assert run["load_imbalance"] >= 1.0 - 1e-6
        if run["model"] == "soft":
            assert run["fraction_tokens_dropped"] == 0.0

    for model, entry in results["summary"].items():
        moe_only = MOE_ONLY_FIELDS if model == "dense" else ()
        means = {k: v["mean"] for k, v in entry.items() if isinstance(v, dict)}
        assert entry["seeds"] == 1
        _assert_all_finite({k: v for k, v in means.items() if k not in moe_only}, model)

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == list(QUICK_MODELS)
    assert all(r["seed"] == "0" for r in rows)
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    for name in ("accuracy.png", "training_curves.png", "routing.png"):
        _check_png(out / name)


def test_dense_model_learns_an_easy_subset(tmp_path):
    from keras_vmoe.study import run_study

    # Birds vs giraffes (Animal-MNIST classes 1 and 6), 512 training images,
    # 3 epochs of the quick model: chance is 0.5.
    config = QUICK.replace(classes=(1, 6), train_size=512, epochs=3)
    result = run_study(config, ["dense"], seeds=1, output_dir=str(tmp_path))
    run = result["runs"][0]
    assert result["settings"]["upstream"]["classes"] == ["bird", "giraffe"]
    assert run["test_accuracy"] > 0.75, run["test_accuracy"]
    assert run["history"]["loss"][-1] < run["history"]["loss"][0]


def test_the_study_compiles_with_the_vmoe_recipe():
    """`compile_with_recipe` gives the numbers of the study's own settings.

    Adam(0.9, 0.999, clipnorm 1), decay `weight_decay` on every kernel and
    nothing else, linear warmup to `learning_rate` then linear decay to
    1e-5, softmax cross-entropy.
    """
    from keras_vmoe.study import runner
    from keras_vmoe.training import SoftmaxCrossEntropy, WarmupLinearDecay

    config = QUICK
    model = runner.build_model(config, "softmax_token_choice", num_classes=4)
    runner._compile(model, config, total_steps=50)
    opt = model.optimizer
    assert (opt.beta_1, opt.beta_2, opt.global_clipnorm) == (0.9, 0.999, 1.0)
    for variable in model.trainable_variables:
        expected = config.weight_decay if variable.path.endswith("kernel") else 0.0
        assert opt.weight_decay_rate_for(variable.path) == expected, variable.path
    schedule = opt._learning_rate
    assert isinstance(schedule, WarmupLinearDecay)
    warmup = study_config.warmup_steps(config, 50)  # 5
    peak, end = config.learning_rate, 1e-5
    for step, value in (
        (0, 0.0),
        (2, peak * 2 / warmup),
        (warmup, peak),
        (30, end + (peak - end) * (50 - 30) / (50 - warmup)),
        (50, end),
    ):
        assert float(schedule(step)) == pytest.approx(value, rel=1e-5, abs=1e-9)
    assert isinstance(model.loss, SoftmaxCrossEntropy)
    assert model.loss.from_logits
