"""`keras-vmoe study` on a device mesh: the plan, the flags, the same results.

The test session has 8 simulated CPU devices (tests/conftest.py). The mesh
plans and the flags need no device and run on every backend; the runs on
the mesh run on the JAX backend only (`keras.distribution` shards on JAX).
"""

import json
import os
import re

import keras
import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.cli import study as command
from keras_vmoe.cli.errors import UsageError
from keras_vmoe.distribution import EXPERT_WEIGHTS
from keras_vmoe.study import DEFAULT, QUICK

BACKEND = keras.backend.backend()
JAX_ONLY = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution shards on the JAX backend only"
)
SPARSE = "softmax_token_choice"


def _eight_devices():
    import jax

    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")


# ---------------------------------------------------------------------------
# Every backend: the plan and the flags (no device involved).
# ---------------------------------------------------------------------------


def test_each_model_gets_its_mesh():
    # The quick study: 4 experts; groups of 2 images (sparse routers) and of
    # 1 (Soft MoE); batches of 32 (training) and 128 (evaluation). On 8
    # devices the expert axis is gcd(8, 4) = 4, the batch axis 8 / 4 = 2;
    # the dense ViT, which has no experts, is data parallel on all 8.
    meshes = command.plan_meshes(QUICK.replace(models=("dense", SPARSE, "soft")), 8)
    assert meshes == {
        "dense": {"batch": 8, "expert": 1},
        SPARSE: {"batch": 2, "expert": 4},
        "soft": {"batch": 2, "expert": 4},
    }
    # The default study, 8 experts: expert axis 8, batch axis 1.
    assert command.plan_meshes(DEFAULT, 8)[SPARSE] == {"batch": 1, "expert": 8}
    # --mesh sets the MoE models' mesh; the dense ViT stays data parallel.
    meshes = command.plan_meshes(
        QUICK.replace(models=("dense", SPARSE)), 8, {"batch": 4, "expert": 2}
    )
    assert meshes == {
        "dense": {"batch": 8, "expert": 1},
        SPARSE: {"batch": 4, "expert": 2},
    }


@pytest.mark.parametrize(
    "config, devices, spec, message",
    [
        (QUICK, 8, {"batch": 2, "expert": 2}, "has 4 devices; this machine has 8"),
        (
            QUICK,
            8,
            {"batch": 1, "expert": 8},
            f"{SPARSE}: 4 experts cannot be sharded on an expert axis of 8",
        ),
        # An expert axis of 1 over 8 devices would copy every expert 8 times.
        (QUICK, 8, {"batch": 8, "expert": 1}, "would replicate the 4 experts"),
        # 3 devices, 4 experts: gcd 1, no expert axis but 1 fits.
        (
            QUICK.replace(models=(SPARSE,)),
            3,
            None,
            f"{SPARSE}: the mesh chosen for 3 devices (batch=3, expert=1) would "
            "replicate the 4 experts",
        ),
        # 36 images on the dense ViT's 8 batch shards: 4.5 each.
        (
            QUICK.replace(batch_size=36),
            8,
            None,
            "dense: --batch-size 36 must split into 8 batch shards",
        ),
        # Batches of 40 (5 images per shard) in 2 training passes of 20:
        # 2.5 images on each of the dense ViT's 8 batch shards.
        (
            QUICK.replace(batch_size=40, micro_batch_size=20),
            8,
            None,
            "dense: the training batch of 40 images runs in 2 passes of 20 (at "
            "most micro_batch_size 20), which must split into 8 batch shards",
        ),
        # 100 evaluation images on 8 batch shards: 12.5 each.
        (
            QUICK.replace(eval_batch_size=100),
            8,
            None,
            "dense: the evaluation batch of 100 images must split into 8 batch "
            "shards of whole routing groups of 1 images (a multiple of 8)",
        ),
        # 130 = 65 groups of 2 images: not 2 batch shards of whole groups.
        (
            QUICK.replace(eval_batch_size=130, models=(SPARSE,)),
            8,
            None,
            "a multiple of 4",
        ),
    ],
)
def test_bad_meshes_are_refused(config, devices, spec, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        command.plan_meshes(config.validate(), devices, spec)


def _args(*flags):
    return cli.build_parser().parse_args(["study", *flags])


def test_mesh_flags():
    assert command.mesh_flags(_args()) is None
    assert command.mesh_flags(_args("--no-distribution")) is None
    with pytest.raises(UsageError, match="--mesh must be batch=B,expert=E"):
        command.mesh_flags(_args("--mesh", "model=2"))
    with pytest.raises(UsageError, match="cannot go with --mesh"):
        command.mesh_flags(_args("--mesh", "batch=2", "--no-distribution"))
    if BACKEND == "jax":
        assert command.mesh_flags(_args("--mesh", "expert=4,batch=2")) == {
            "batch": 2,
            "expert": 4,
        }
    else:
        with pytest.raises(UsageError, match="--mesh needs the JAX backend"):
            command.mesh_flags(_args("--mesh", "batch=2"))
    # Without JAX, or with --no-distribution, nothing is distributed.
    assert command.make_distributions(QUICK, off=True) is None


@pytest.mark.parametrize(
    "mesh, message, needs_jax",
    [
        ("batch=1,expert=8", "4 experts cannot be sharded on an expert axis of 8", 1),
        ("batch=2,expert=x", "--mesh: expert must be an integer, got 'x'.", 0),
    ],
)
def test_bad_mesh_exits_2_before_training(mesh, message, needs_jax, tmp_path, capsys):
    if BACKEND == "jax":
        _eight_devices()
    elif needs_jax:
        message = "--mesh needs the JAX backend"
    out = tmp_path / "out"
    argv = ["study", "--quick", "--mesh", mesh, "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-vmoe study: error: ") and "\n" not in err
    assert message in err
    assert not out.exists() or not list(out.iterdir())  # nothing trained


# ---------------------------------------------------------------------------
# JAX, 8 simulated devices.
# ---------------------------------------------------------------------------


@JAX_ONLY
@pytest.mark.parametrize(
    "flags, meshes",
    [
        ([], {"dense": (8, 1), SPARSE: (2, 4)}),
        (["--mesh", "batch=4,expert=2"], {"dense": (8, 1), SPARSE: (4, 2)}),
        (["--no-distribution"], None),
    ],
)
def test_the_command_trains_each_model_on_its_mesh(
    flags, meshes, monkeypatch, tmp_path
):
    _eight_devices()
    from keras_vmoe.study import experiment

    seen = {}

    def fake_run_study(config, output_dir, distributions=None):
        seen["distributions"] = distributions

    monkeypatch.setattr(experiment, "run_study", fake_run_study)
    argv = ["study", "--quick", "--routers", f"dense,{SPARSE}", *flags]
    assert cli.main([*argv, "--output", str(tmp_path)]) == 0
    distributions = seen["distributions"]
    if meshes is None:
        assert distributions is None
        return
    assert {
        name: tuple(d.device_mesh.shape) for name, d in distributions.items()
    } == meshes
    for distribution in distributions.values():
        assert isinstance(distribution, keras.distribution.ModelParallel)
        assert tuple(distribution.device_mesh.axis_names) == ("batch", "expert")
        assert distribution.batch_dim_name == "batch"


# A tiny study: one sparse router, 64 training images (2 steps of 32), 50
# test images and a few-shot pool and test set of 64 digits each, evaluated
# in batches of 64: the test set is one short batch (50 images, 25 groups
# of 2, which do not split into whole groups on the 2 batch shards: the
# predict function must still give the same outputs). With augmentation:
# the study augments one batch at a time, so both runs see the same images.
TINY = QUICK.replace(
    models=(SPARSE,),
    train_size=64,
    test_size=50,
    fewshot_train_size=64,
    fewshot_test_size=64,
    shots=(1, 2),
    fewshot_draws=1,
    eval_batch_size=64,
)


@JAX_ONLY
def test_study_on_eight_devices_equals_one_device(built_models, tmp_path):
    _eight_devices()
    from keras_vmoe.study import experiment

    distributions = command.make_distributions(TINY)
    assert tuple(distributions[SPARSE].device_mesh.shape) == (2, 4)
    built = built_models
    results = {}
    for name, given in (("single", None), ("mesh", distributions)):
        (tmp_path / name).mkdir()
        result = experiment.run_study(
            TINY, output_dir=str(tmp_path / name), distributions=given
        )
        results[name] = result["runs"][0]
    single, mesh = results["single"], results["mesh"]

    # The live expert weights of the mesh run are sharded on the expert
    # axis (4 experts, 1 per device of each batch row), those of the
    # single run are not sharded at all.
    for model, expected in zip(built, (None, "expert")):
        experts = [w for w in model.weights if w.path.endswith(tuple(EXPERT_WEIGHTS))]
        assert len(experts) == len(EXPERT_WEIGHTS)  # one MoE layer
        for w in experts:
            spec = getattr(w.value.sharding, "spec", (None,))
            assert spec[0] == expected, (w.path, spec)
            if expected:
                shards = w.value.addressable_shards
                assert {s.data.shape[0] for s in shards} == {1}, w.path

    # Same run: the mesh computes the same function, summing in another
    # order. float32 rounding of a 2-step run on 64 images: the losses
    # agree to 1e-5 relative (seen: equal to the last digit); the
    # accuracies count the same images (a flip would need a logit margin
    # below 1e-5); the routing statistics average the same 0/1 decisions.
    np.testing.assert_allclose(
        mesh["history"]["loss"], single["history"]["loss"], rtol=1e-5
    )
    assert mesh["history"]["accuracy"] == single["history"]["accuracy"]
    assert mesh["test_accuracy"] == single["test_accuracy"]
    assert mesh["fewshot"] == single["fewshot"]
    for key in ("fraction_tokens_dropped", "load_imbalance"):
        np.testing.assert_allclose(mesh[key], single[key], rtol=1e-5, err_msg=key)
    assert mesh["slots_per_group"] == single["slots_per_group"] == 4 * 16
    # The eager routing pass: the same expert for every patch.
    assert mesh["expert_maps"].shape == (TINY.routing_images, 4, 4)
    np.testing.assert_array_equal(mesh["expert_maps"], single["expert_maps"])

    with open(tmp_path / "mesh" / "results.json") as f:
        assert json.load(f)["settings"]["meshes"] == {SPARSE: {"batch": 2, "expert": 4}}
    with open(tmp_path / "single" / "results.json") as f:
        assert "meshes" not in json.load(f)["settings"]
    assert os.path.exists(tmp_path / "mesh" / "routing.png")
