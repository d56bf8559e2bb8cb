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
    # 28x28 images, patch 7 -> 4*4 = 16 patches, average pooling (no class
    # token) -> 16 tokens per image; sparse routers route 4 images per group
    # -> S = 64. K = 2, c = 1, E = 8: C = ceil(64 * 2 * 1 / 8) = 16 slots per
    # expert: Token Choice with K = 2 and capacity 16, Expert Choice with
    # capacity 16. E * C = 128 slots per group = 2 per token.
    plan = study_config.equal_compute(DEFAULT)
    assert DEFAULT.pooling == "gap" and DEFAULT.tokens_per_image == 16
    assert plan["tokens_per_group"] == 64
    assert plan["slots_per_expert"] == 16
    assert plan["slots_per_group"] == 128
    assert plan["slots_per_token"] == 2.0
    assert plan["expert_hidden_dim"] == 64  # 128 / K
    configs = plan["router_configs"]
    assert set(configs) == set(ROUTER_NAMES)
    for name in ("softmax_token_choice", "sinkhorn_token_choice"):
        assert configs[name] == {
            "num_selected_experts": 2,
            "capacity": 16,
            "capacity_multiple_of": 1,
        }
    for name in (
        "softmax_expert_choice",
        "sinkhorn_expert_choice",
        "sparsity_constrained_expert_choice",
    ):
        assert configs[name] == {"capacity": 16, "capacity_multiple_of": 1}
    # Soft MoE: 1 image per group (S = 16), 3 slots per expert (see
    # test_soft_moe_flops_match_the_sparse_routers).
    assert configs["soft"] == {"num_slots": 3}
    assert plan["soft"] == {
        "images_per_group": 1,
        "tokens_per_group": 16,
        "slots_per_expert": 3,
        "slots_per_image": 24.0,
    }
    for name in ROUTER_NAMES:
        args = study_config.backbone_config(DEFAULT, name)
        assert args["group_size"] == (1 if name == "soft" else 4), name
        assert args["identical_expert_init"] is True
        assert (args["use_class_token"], args["pooling"]) == (False, "gap")


@pytest.mark.parametrize(
    "config, slots_per_expert",
    [
        # c = 1.05: ceil(64 * 2 * 1.05 / 8) = ceil(16.8) = 17.
        (DEFAULT.replace(capacity_factor=1.05), 17),
        # 3 images: S = 48, ceil(48 * 2 / 8) = 12.
        (DEFAULT.replace(group_size=3, batch_size=126, eval_batch_size=150), 12),
        # Class token: 17 tokens, S = 68, ceil(68 * 2 / 8) = 17.
        (DEFAULT.replace(pooling="token"), 17),
        # Quick: S = 2 * 16 = 32, E = 4: ceil(32 * 2 / 4) = 16.
        (QUICK, 16),
    ],
)
def test_every_sparse_router_runs_the_same_slots(config, slots_per_expert):
    config.validate()
    plan = study_config.equal_compute(config)
    assert plan["slots_per_expert"] == slots_per_expert
    s = config.tokens_per_group
    for name in ROUTER_NAMES:
        if name == "soft":
            continue
        router = get_class(name)(
            num_experts=config.num_experts, **plan["router_configs"][name]
        )
        capacity = router.slots_per_expert(s, training=True)
        assert router.slots_per_expert(s, training=False) == capacity  # eval: same
        assert capacity == slots_per_expert, name
        if isinstance(router, TokenChoiceRouter):
            assert router.num_selected_experts == config.num_selected_experts


def test_soft_moe_flops_match_the_sparse_routers():
    from keras_vmoe.models.vision_moe.cost import backbone_flops

    flops = {
        name: backbone_flops(study_config.backbone_config(DEFAULT, name))
        for name in ("dense", *ROUTER_NAMES)
    }
    # Per image and MoE layer (2 of them), in multiply-accumulates: a sparse
    # router fills 128 slots per 4 images = 32 slots of 2 * d * h =
    # 2 * 64 * 64 = 8192 MACs, which replace the dense MLP's
    # 2 * 16 tokens * 64 * 128 = 262,144 MACs exactly, plus its gating
    # 16 * 64 * 8 = 8192 MACs. Soft MoE with P = 3 slots per expert fills
    # 24 slots of 8192 expert MACs plus 3 * S * d = 3 * 16 * 64 = 3072 MACs
    # of logits, dispatch and combine: 24 * 11,264 = 270,336 = 32 * 8192 +
    # 8192. FLOPs = 2 x MACs.
    for name in ROUTER_NAMES:
        assert flops[name] - flops["dense"] == 2 * 2 * 8192, name
    assert abs(flops["soft"] / flops["softmax_token_choice"] - 1) <= 0.03
    # With the old setting (17 slots per expert on groups of 4 images) Soft
    # MoE cost more: per slot 3 * 64 * 64 = 12,288 extra MACs, 34 slots per
    # image.
    plan = study_config.equal_compute(DEFAULT)
    assert plan["soft_flops_ratio"] == 1.0
    assert plan["flops_per_image"]["soft"] == flops["soft"]


def test_soft_moe_slot_count_comes_from_the_cost_model():
    # Quick: 16 tokens, d = 32, h = 32, E = 4. Per image and MoE layer, the
    # sparse routers fill 64 slots per 2 images = 32 slots of 2 * 32 * 32 =
    # 2048 MACs plus 16 * 32 * 4 = 2048 gating: 67,584 MACs. A Soft MoE slot
    # costs 2048 + 3 * 16 * 32 = 3584 MACs: P = 4 (16 slots) gives 57,344,
    # P = 5 (20 slots) 71,680, the closer. One MoE layer of 2 blocks; the
    # rest of the backbone is the same: patch embedding 16 * 49 * 32 =
    # 25,088, attention 2 * (4 * 16 * 32 * 32 + 2 * 16 * 16 * 32) = 163,840,
    # one dense MLP 2 * 16 * 32 * 64 = 65,536 MACs.
    slots, soft, sparse = study_config.soft_slots_for_equal_flops(QUICK)
    rest = 25_088 + 163_840 + 65_536
    assert slots == 5
    assert sparse == 2 * (rest + 67_584)
    assert soft == 2 * (rest + 71_680)
    # A tolerance below the 1.27% gap is refused with the numbers.
    with pytest.raises(ValueError, match="within 1%: the closest, 5 slots"):
        QUICK.replace(flops_tolerance=0.01).validate()


@pytest.mark.parametrize(
    "changes, passes",
    [
        ({}, 4),  # the default: 128 images in 4 passes of 32
        ({"micro_batch_size": None}, 1),
        ({"micro_batch_size": 128}, 1),
        ({"micro_batch_size": 64}, 2),
        # 100 images: 4 passes of 25 are not whole groups of 4; 5 of 20 are.
        ({"batch_size": 100}, 5),
        # 36 images, at most 16 per pass: 3 of 12.
        ({"batch_size": 36, "micro_batch_size": 16}, 3),
        # Passes smaller than a group of 4 images: one group each.
        ({"micro_batch_size": 2}, 32),
    ],
)
def test_training_passes_per_batch(changes, passes):
    config = DEFAULT.replace(**changes).validate()
    assert config.accumulation_steps == passes
    size = config.batch_size // passes
    assert size * passes == config.batch_size and size % config.group_size == 0


def test_bad_study_settings_are_rejected():
    with pytest.raises(ValueError, match="multiple of the routing group"):
        DEFAULT.replace(batch_size=130).validate()
    with pytest.raises(ValueError, match="micro_batch_size must be None or an int"):
        DEFAULT.replace(micro_batch_size=0).validate()
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


# TensorFlow runs the quick study's default models (dense, Softmax Token and
# Expert Choice, Soft MoE) with 2 seeds, so that every paired difference has
# an interval; JAX (the suite's longest backend) and torch (slow per step in
# eager mode) run the dense ViT and Soft MoE.
if BACKEND == "tensorflow":
    QUICK_MODELS = study_config.DEFAULT_MODELS
else:
    QUICK_MODELS = ("dense", "soft")
QUICK_SEEDS = 2


# Fields that do not apply to the dense ViT (it has no MoE layer), and
# those that apply to Soft MoE only (how sharp its dispatch is).
MOE_ONLY_FIELDS = ("fraction_tokens_dropped", "load_imbalance", "slots_per_group")
SOFT_ONLY_FIELDS = ("tokens_per_slot", "max_dispatch_weight")


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
    elif not isinstance(value, (str, bool)):
        assert isinstance(value, (int, float)), f"{where} = {value!r}"
        assert math.isfinite(value), f"{where} = {value!r}"


def _skipped_fields(model):
    skipped = MOE_ONLY_FIELDS if model == "dense" else ()
    return skipped + (SOFT_ONLY_FIELDS if model != "soft" else ())


def test_quick_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    routers = ",".join(m for m in QUICK_MODELS)
    argv = ["study", "--quick", "--routers", routers, "--seeds", str(QUICK_SEEDS)]
    argv.append("--no-distribution")  # the mesh runs are test_study_distributed.py's
    assert cli.main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # One progress line per run: which model, seed and epoch, and the time left.
    runs = [(m, s) for m in QUICK_MODELS for s in range(QUICK_SEEDS)]
    for index, (model, seed) in enumerate(runs, 1):
        line = f"[{index}/{len(runs)}] {model} seed {seed}  epoch 1/1  loss "
        assert line in printed, line
    assert re.search(r"\(study: (\d+m\d\ds|\d+s) left\)\n", printed), printed
    assert "Equal compute: every sparse router fills E x C = 4 x 16 = 64" in printed
    for model in QUICK_MODELS:
        assert f"\n{model} " in printed  # a table row
    assert "Smallest difference this run resolves in test accuracy: " in printed
    assert "\nVerdict: test accuracy: " in printed

    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == list(QUICK_MODELS)
    assert results["settings"]["backend"] == BACKEND
    plan = results["settings"]["equal_compute"]
    # Quick: S = 2 images x 16 tokens = 32; E = 4, K = 2, c = 1:
    # C = ceil(32 * 2 / 4) = 16 per expert, 64 slots per group. Soft MoE:
    # 1 image, 5 slots per expert (test_soft_moe_slot_count_comes_from_...).
    assert plan["slots_per_expert"] == 16 and plan["slots_per_group"] == 64
    assert plan["soft"]["slots_per_expert"] == 5
    assert "dense ViT matches K = 2" in plan["statement"]
    assert len(results["runs"]) == len(runs)
    for run in results["runs"]:
        # Every field of every run is a finite number (those of the MoE
        # layers are absent, None, for the dense ViT only).
        _assert_all_finite(
            {k: v for k, v in run.items() if k not in _skipped_fields(run["model"])},
            run["model"],
        )
        assert (run["routing_statistics"] == {}) == (run["model"] == "dense")
        assert (run["routing_sharpness"] != {}) == (run["model"] == "soft")
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
        elif run["model"] == "soft":
            # 1 image per group, 4 experts x 5 slots; every slot averages
            # between 1 and all 16 tokens of its image.
            assert run["images_per_group"] == 1 and run["slots_per_group"] == 20
            assert run["fraction_tokens_dropped"] == 0.0
            assert 1.0 <= run["tokens_per_slot"] <= 16.0
            assert 1 / 16 - 1e-6 <= run["max_dispatch_weight"] <= 1.0
        else:
            # The slots the last MoE layer actually ran at evaluation.
            assert run["images_per_group"] == 2 and run["slots_per_group"] == 64
            assert 0.0 <= run["fraction_tokens_dropped"] <= 1.0
            assert run["load_imbalance"] >= 1.0 - 1e-6
            assert run["tokens_per_slot"] is None

    for model, entry in results["summary"].items():
        means = {k: v["mean"] for k, v in entry.items() if isinstance(v, dict)}
        assert entry["seeds"] == QUICK_SEEDS
        _assert_all_finite(
            {k: v for k, v in means.items() if k not in _skipped_fields(model)}, model
        )

    # Paired differences: every model against the dense ViT (and, where it
    # runs, Softmax Token Choice), with an interval around the mean of the
    # per-seed differences.
    comparisons = results["comparisons"]
    by_seed = {(r["model"], r["seed"]): r["test_accuracy"] for r in results["runs"]}
    for model in QUICK_MODELS:
        if model == "dense":
            continue
        entry = comparisons[model]["dense"]["test_accuracy"]
        diffs = [by_seed[model, s] - by_seed["dense", s] for s in range(QUICK_SEEDS)]
        assert entry["mean"] == pytest.approx(np.mean(diffs), abs=1e-9)
        assert entry["num_pairs"] == QUICK_SEEDS
        assert entry["low"] <= entry["mean"] <= entry["high"]
    assert results["verdict"]["text"].startswith("test accuracy: ")

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in rows] == [(m, str(s)) for m, s in runs]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    with open(out / "differences.csv") as f:
        assert len(list(csv.DictReader(f))) >= 2 * (len(QUICK_MODELS) - 1)
    for name in (
        "accuracy.png",
        "training_curves.png",
        "routing.png",
        "differences.png",
    ):
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


def test_training_passes_see_the_images_of_their_batch():
    from keras_vmoe.study import runner
    from keras_vmoe.study.augment import augmentation

    # 24 distinct images, batches of 8 (3 per epoch) in 2 passes of 4: the
    # passes are the halves of the batches, in order, with the same random
    # flips and shifts. A new pipeline of the same seed repeats them all.
    x = np.arange(24 * 8 * 8, dtype="float32").reshape(24, 8, 8, 1)
    y = np.arange(24)

    def epochs(passes, seed=5):
        ds = runner._train_dataset(
            x, y, 8, seed, augmentation(8, max_shift=2, seed=seed), passes
        )
        return [[(a.numpy(), b.numpy()) for a, b in ds] for _ in range(2)]

    whole, split = epochs(1), epochs(2)
    for batches, passes in zip(whole, split):
        assert [len(b) for _, b in batches] == [8, 8, 8]
        assert [len(b) for _, b in passes] == [4] * 6
        for i, (images, labels) in enumerate(batches):
            np.testing.assert_array_equal(
                np.concatenate([passes[2 * i][0], passes[2 * i + 1][0]]), images
            )
            np.testing.assert_array_equal(
                np.concatenate([passes[2 * i][1], passes[2 * i + 1][1]]), labels
            )
    # Reshuffled and re-augmented every epoch; repeated by the seed.
    assert not np.array_equal(whole[0][0][1], whole[1][0][1])
    again = epochs(2)
    for first, second in zip(split, again):
        for (a, la), (b, lb) in zip(first, second):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
    other = epochs(2, seed=6)
    assert not np.array_equal(other[0][0][1], split[0][0][1])


def test_a_study_run_updates_once_per_batch(built_models):
    from keras_vmoe.study import runner
    from keras_vmoe.study.data import load_study_data

    # 128 training images in batches of 64, each in 2 passes of 32, for one
    # epoch: 4 passes and 2 optimizer updates (the schedule's steps).
    config = QUICK.replace(
        train_size=128,
        test_size=32,
        fewshot_train_size=64,
        fewshot_test_size=32,
        batch_size=64,
        micro_batch_size=32,
        eval_batch_size=32,
        shots=(1, 2),
        fewshot_draws=1,
    )
    assert config.accumulation_steps == 2
    built = built_models
    run = runner.train_and_evaluate(
        config, "dense", 0, load_study_data(config), routing_maps=False
    )
    optimizer = built[0].optimizer
    assert int(optimizer.iterations) == 2
    assert int(optimizer._iterations) == 4  # Keras counts the passes here
    assert run["train_images_per_epoch"] == 128
    assert len(run["history"]["loss"]) == 1
    assert np.isfinite(run["history"]["loss"][0])


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


# --------------------------------------------------------------------------
# The fair settings.
# --------------------------------------------------------------------------
def test_soft_moe_predictions_do_not_depend_on_the_test_order():
    from keras_vmoe.evaluation import predict_in_groups
    from keras_vmoe.study import runner

    # Untrained quick Soft MoE (1 image per group): the logits of a
    # reordered test set are the reordered logits.
    keras.utils.set_random_seed(0)
    model = runner.build_model(QUICK, "soft", num_classes=4)
    assert runner.model_group_size(model) == 1
    x = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype("float32")
    order = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    logits = predict_in_groups(model, x, 8, group_size=1)
    reordered = predict_in_groups(model, x[order], 8, group_size=1)
    np.testing.assert_allclose(reordered, logits[order], rtol=1e-5, atol=1e-6)


def test_augmentation_flips_and_shifts_by_whole_pixels():
    from keras_vmoe.study.augment import augmentation

    # Distinct pixel values, so each output can be matched to exactly one
    # flip and shift of its input (edges repeat the nearest pixel).
    rng = np.random.default_rng(1)
    images = rng.permutation(16 * 8 * 8).reshape(16, 8, 8, 1).astype("float32")
    out = np.asarray(augmentation(image_size=8, max_shift=2, seed=3)(images))

    def shifted(image, dy, dx):
        rows = np.clip(np.arange(8) - dy, 0, 7)
        cols = np.clip(np.arange(8) - dx, 0, 7)
        return image[rows][:, cols]

    found = []
    for o, image in zip(out, images):
        matches = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(o, shifted(image[:, ::-1] if flip else image, dy, dx))
        ]
        assert matches, "not a flip and shift of at most 2 pixels"
        found.append(matches[0])
    # Random per image: both flips and more than one shift occur.
    assert {f for f, _, _ in found} == {False, True}
    assert len({(dy, dx) for _, dy, dx in found}) > 1


def test_fewshot_accuracy_is_averaged_over_draws():
    from keras_vmoe.evaluation import fewshot_linear_accuracy
    from keras_vmoe.study import runner

    rng = np.random.default_rng(0)
    f_train, y_train = rng.normal(size=(60, 5)), np.arange(60) % 3
    f_test, y_test = rng.normal(size=(30, 5)), np.arange(30) % 3
    config = QUICK.replace(shots=(2,), fewshot_draws=3)
    mean = runner.fewshot_over_draws(f_train, y_train, f_test, y_test, config, seed=2)
    # Draws 0, 1, 2 of seed 2 use the shot seeds 2000, 2001, 2002.
    singles = [
        fewshot_linear_accuracy(
            f_train,
            y_train,
            f_test,
            y_test,
            shots=(2,),
            l2_regs=(config.fewshot_l2,),
            seed=2000 + d,
        )[2][config.fewshot_l2]
        for d in range(3)
    ]
    assert len(set(singles)) > 1  # the draws differ
    assert mean == {2: pytest.approx(sum(singles) / 3)}


def test_routing_sharpness_by_hand():
    from keras_vmoe.study.runner import routing_sharpness

    # 1 group of 4 tokens, 1 expert with 2 slots: slot 0 uniform (entropy
    # log 4: 4 tokens per slot, largest weight 1/4), slot 1 on tokens 0 and 1
    # equally (entropy log 2: 2 tokens, largest 1/2). Means: 3 tokens per
    # slot, largest weight 0.375, entropy ratio (log 4 + log 2) / 2 / log 4
    # = 0.75.
    w = np.array([[0.25, 0.5], [0.25, 0.5], [0.25, 0.0], [0.25, 0.0]], "float32")
    w = w.reshape(1, 4, 1, 2)
    sparse = SparseRouting(
        np.array([[[0]]]),
        np.ones((1, 1, 1), "float32"),
        np.ones((1, 1, 1), "float32"),
        num_tokens=4,
    )
    # Sparse routings have one token per slot: none reported.
    stats = routing_sharpness({"soft": SoftRouting(w, w), "sparse": sparse})
    assert stats == {
        "soft": {
            "tokens_per_slot": pytest.approx(3.0),
            "dispatch_entropy_ratio": pytest.approx(0.75),
            "max_dispatch_weight": pytest.approx(0.375),
            "tokens_per_group": 4,
        }
    }


def _write_image_folder(root, classes=("cat", "dog"), per_class=5):
    from PIL import Image

    for label, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(per_class):
            value = 40 * label + 10 * i  # class and index in the pixel value
            Image.new("L", (10, 10), color=value).save(root / name / f"{i:02d}.png")


def test_image_folder_dataset(tmp_path):
    from keras_vmoe.study.data import load_study_data

    _write_image_folder(tmp_path / "images")
    config = QUICK.replace(dataset=str(tmp_path / "images"), image_size=8)
    data = load_study_data(config)
    # 5 images per class: indices 0-3 train, index 4 (every fifth) test.
    assert data.class_names == ("cat", "dog")
    assert data.x_train.shape == (8, 8, 8, 1) and data.x_test.shape == (2, 8, 8, 1)
    # Constant images: value v becomes v / 127.5 - 1 after resizing.
    test_values = sorted(
        (int(y), round(float(x.mean()), 4)) for x, y in zip(data.x_test, data.y_test)
    )
    assert test_values == [(0, round(40 / 127.5 - 1, 4)), (1, round(80 / 127.5 - 1, 4))]
    assert sorted(data.y_train.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data.fewshot["x_train"].shape[1:] == (8, 8, 1)
    # RGB models get 3 channels, the few-shot digits too.
    rgb = load_study_data(config.replace(channels=3))
    assert rgb.x_train.shape[-1] == 3 and rgb.fewshot["x_test"].shape[-1] == 3


def test_dataset_errors_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    os.makedirs(empty / "only_class")
    out = str(tmp_path / "out")
    assert cli.main(["study", "--dataset", str(empty), "--output", out]) == 2
    assert "needs one subfolder per class" in capsys.readouterr().err
    missing = str(tmp_path / "missing" / "dir")
    assert cli.main(["study", "--dataset", missing, "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_scales_and_their_models():
    import argparse

    from keras_vmoe.cli import study as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    config = command.make_config(parser.parse_args([]))
    assert config == DEFAULT and config.seeds == 4
    # 3 epochs of batches of 128 images, each in 4 passes of 32.
    assert (config.epochs, config.batch_size, config.accumulation_steps) == (3, 128, 4)
    assert config.models == (
        "dense",
        "softmax_token_choice",
        "softmax_expert_choice",
        "soft",
    )
    gpu = command.make_config(parser.parse_args(["--scale", "gpu", "--seeds", "3"]))
    assert gpu == study_config.GPU.replace(seeds=3)
    assert gpu.models == study_config.model_names()  # every router
    # GPU scale: 49 tokens, d = 192, h = 384: Soft MoE within 3% as well.
    plan = study_config.equal_compute(gpu)
    assert abs(plan["soft_flops_ratio"] - 1) <= 0.03
    folder = command.make_config(
        parser.parse_args(["--dataset", "/x", "--routers", "soft,dense"])
    )
    assert (folder.dataset, folder.channels, folder.models) == (
        "/x",
        3,
        ("dense", "soft"),
    )


def test_tfds_dataset_by_name():
    from keras_vmoe.study.data import load_study_data

    # `digits` is prepared locally as a TFDS dataset: loaded by name like
    # any prepared TFDS dataset (train and test splits, label names).
    config = QUICK.replace(dataset="digits", train_size=100, test_size=50)
    data = load_study_data(config)
    assert data.class_names == tuple(str(i) for i in range(10))
    assert data.x_train.shape == (100, 28, 28, 1) and data.x_test.shape == (
        50,
        28,
        28,
        1,
    )
    assert set(data.y_test.tolist()) <= set(range(10))
