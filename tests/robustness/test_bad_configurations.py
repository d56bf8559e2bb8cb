"""Bad configurations fail early, with a message naming the argument.

One table: each row is a callable, the bad keyword arguments, the expected
exception type and a regex that the message must match (the argument's
name and what it accepts). Rows cover the routers, the layers, the models
and presets, the callbacks, the training helpers and the command line
(non-zero exit status, message on stderr naming the flag).
"""

import contextlib
import io

import keras
import numpy as np
import pytest

from keras_vmoe import cli, routers
from keras_vmoe.callbacks import FewShotEvaluator, RoutingStatistics
from keras_vmoe.layers import MlpExperts, MoE
from keras_vmoe.models import (
    ClassificationCrossEntropy,
    VisionMoEBackbone,
    VisionMoEImageClassifier,
    from_preset,
)
from keras_vmoe.training import (
    DecoupledWeightDecayAdam,
    SigmoidCrossEntropy,
    SoftmaxCrossEntropy,
    WarmupLinearDecay,
    WarmupRsqrtCooldown,
    compile_with_recipe,
    make_schedule,
    warmup_cosine,
)
from tests.models.tiny import TINY, tiny_moe


class Build:
    """A keyword value made when the row runs (layers need a fresh session)."""

    def __init__(self, make, *args, **kwargs):
        self.make, self.args, self.kwargs = make, args, kwargs

    def __call__(self):
        return self.make(*self.args, **self.kwargs)

    def __repr__(self):
        return f"Build({self.make.__name__})"


class CommandFailed(Exception):
    """`keras-vmoe` exited with a non-zero status; the message ends with stderr's."""


def keras_vmoe_command(argv):
    """Runs `keras-vmoe ARGV`; raises `CommandFailed(stderr)` unless it exits 0."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse errors
            status = exit_.code
    if status != 0:  # The error is the last line (argparse prints usage first).
        last = (stderr.getvalue().strip().splitlines() or [""])[-1]
        raise CommandFailed(f"exit status {status}: {last}")
    return status


def backbone(**kwargs):
    return VisionMoEBackbone(**{**TINY, **kwargs})


def moe_backbone(**kwargs):
    return VisionMoEBackbone(**{**tiny_moe("softmax_token_choice"), **kwargs})


def classifier(**kwargs):
    kwargs.setdefault("backbone", VisionMoEBackbone(**TINY))
    return VisionMoEImageClassifier(**{"num_classes": 3, **kwargs})


def tiny_keras_model():
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])


def _fewshot_datasets():
    rng = np.random.default_rng(0)
    split = (rng.random((8, 8, 8, 3), dtype=np.float32), np.arange(8) % 2)
    return {"toy": (split, split)}


DATASETS = Build(_fewshot_datasets)
TRAIN = ["train", "--preset", "vit_dense_s32_224", "--dataset", "digits"]
INT_AT_LEAST_1 = r"must be an int >= 1, got "
RATE = r"must be a number in \[0, 1\), got "

ROWS = [
    # === Routers ===
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=0), ValueError, "`num_experts` " + INT_AT_LEAST_1 + "0"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=None), ValueError, "`num_experts` " + INT_AT_LEAST_1 + "None"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts="many"), ValueError, "`num_experts` " + INT_AT_LEAST_1 + "'many'"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=4, num_selected_experts=5), ValueError, r"`num_selected_experts` \(5\) must be at most `num_experts` \(4\)"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=4, capacity_factor="big"), ValueError, r"`capacity_factor` \(a number > 0\) or an explicit `capacity` \(an int >= 1\); got capacity_factor='big'"),
    (routers.SoftmaxExpertChoiceRouter, dict(num_experts=4, capacity_factor=0.0), ValueError, r"`capacity_factor` \(a number > 0\).*capacity_factor=0\.0"),
    (routers.SoftmaxExpertChoiceRouter, dict(num_experts=4, capacity=0), ValueError, "`capacity` " + INT_AT_LEAST_1 + "0"),
    (routers.SoftmaxExpertChoiceRouter, dict(num_experts=4, capacity=8, eval_capacity_factor=2.0), ValueError, r"`eval_capacity_factor` only with `capacity_factor`, not with an explicit `capacity`"),
    (routers.SoftmaxExpertChoiceRouter, dict(num_experts=4, eval_capacity_factor=-1.0), ValueError, r"`eval_capacity_factor` must be a number > 0, got -1\.0"),
    (routers.SoftmaxExpertChoiceRouter, dict(num_experts=4, capacity_multiple_of=0), ValueError, "`capacity_multiple_of` " + INT_AT_LEAST_1 + "0"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=4, noise_std=-1.0), ValueError, r"`noise_std` must be a number >= 0, got -1\.0"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=4, batch_priority="yes"), ValueError, r"`batch_priority` must be True or False, got 'yes'"),
    (routers.SoftmaxTokenChoiceRouter, dict(num_experts=4, importance_loss_weight=-0.1), ValueError, r"`importance_loss_weight` must be a number >= 0, got -0\.1"),
    (routers.SinkhornTokenChoiceRouter, dict(num_experts=4, num_iters=0), ValueError, "`num_iters` " + INT_AT_LEAST_1 + "0"),
    (routers.SinkhornExpertChoiceRouter, dict(num_experts=4, epsilon=0.0), ValueError, r"`epsilon` must be a number > 0, got 0\.0"),
    (routers.SparsityConstrainedExpertChoiceRouter, dict(num_experts=4, learning_rate=-0.01), ValueError, r"`learning_rate` must be a number > 0, got -0\.01"),
    (routers.SparsityConstrainedExpertChoiceRouter, dict(num_experts=4, num_steps=2.5), ValueError, "`num_steps` " + INT_AT_LEAST_1 + r"2\.5"),
    (routers.SoftRouter, dict(num_experts=4, num_slots=1, capacity_factor=2.0), ValueError, r"at most one of `num_slots` and `capacity_factor`"),
    (routers.SoftRouter, dict(num_experts=4, capacity_factor="x"), ValueError, r"`capacity_factor` must be a number > 0, got 'x'"),
    (routers.get, dict(identifier="softmax_tokenchoice", num_experts=4), ValueError, r"Unknown router 'softmax_tokenchoice'\. Did you mean softmax_token_choice.*Known routers: softmax_token_choice, .*, soft\."),
    (routers.get, dict(identifier="soft", num_experts=4, num_slot=2), ValueError, r"unknown argument\(s\) \['num_slot'\] for router 'soft'\. Did you mean num_slots\? Accepted: .*num_slots"),
    # === Layers ===
    (MlpExperts, dict(num_experts=4, hidden_dim=0), ValueError, "`hidden_dim` " + INT_AT_LEAST_1 + "0"),
    (MlpExperts, dict(num_experts=4, hidden_dim=8, dropout_rate=1.0), ValueError, "`dropout_rate` " + RATE + r"1\.0"),
    (MlpExperts, dict(num_experts=4, hidden_dim=8, activation="nope"), ValueError, r"`activation` must be the name of a Keras activation \(e\.g\. 'gelu'.*or a callable, got 'nope'"),
    (MlpExperts, dict(num_experts=4, hidden_dim=8, identical_init="yes"), ValueError, r"`identical_init` must be True or False, got 'yes'"),
    (MoE, dict(router=Build(routers.SoftmaxExpertChoiceRouter, 4), experts=Build(MlpExperts, 4, 8), group_size=0), ValueError, "`group_size` " + INT_AT_LEAST_1 + "0"),
    (MoE, dict(router=Build(routers.SoftmaxExpertChoiceRouter, 4), experts=Build(MlpExperts, 8, 8), group_size=8), ValueError, r"`router` and `experts` disagree on the number of experts: 4 vs 8"),
    (MoE, dict(router="softmax_expert_choice", experts=Build(MlpExperts, 4, 8), group_size=8), ValueError, r"`router` must be a `keras_vmoe\.routers\.Router` layer \(e\.g\. `keras_vmoe\.routers\.get\(name, num_experts=\.\.\.\)` for a name in softmax_token_choice, .*, soft\), got 'softmax_expert_choice'"),
    (MoE, dict(router=Build(keras.layers.Dense, 4), experts=Build(MlpExperts, 4, 8), group_size=8), ValueError, r"`router` must be a `keras_vmoe\.routers\.Router` layer .*, got <Dense name=dense"),
    (MoE, dict(router=Build(routers.SoftmaxExpertChoiceRouter, 4), experts=Build(keras.layers.Dense, 4), group_size=8), ValueError, r"`experts` must be an experts layer with a `num_experts` attribute \(e\.g\. `keras_vmoe\.layers\.MlpExperts`\), got <Dense"),
    (MoE, dict(router=Build(routers.SoftmaxExpertChoiceRouter, 4), experts=Build(MlpExperts, 4, 8), group_size=8, use_einsum_dispatch="yes"), ValueError, r"`use_einsum_dispatch` must be True or False, got 'yes'"),
    # === Models and presets ===
    (backbone, dict(image_shape=(16, 16)), ValueError, r"`image_shape` must be \(height, width, channels\) of positive ints with data_format='channels_last', got \(16, 16\)"),
    (backbone, dict(image_shape=(18, 16, 3)), ValueError, r"\(18, 16\) \(`image_shape`\) must be divisible by the patch size \(4, 4\) \(`patch_size`\)"),
    (backbone, dict(patch_size=0), ValueError, r"`patch_size` must be an int >= 1 or a pair of them, got 0"),
    (backbone, dict(num_layers=0), ValueError, "`num_layers` " + INT_AT_LEAST_1 + "0"),
    (backbone, dict(num_heads=3), ValueError, r"hidden_dim=16 must be divisible by num_heads=3"),
    (backbone, dict(dropout_rate=1.5), ValueError, "`dropout_rate` " + RATE + r"1\.5"),
    (backbone, dict(attention_dropout=-0.1), ValueError, "`attention_dropout` " + RATE + r"-0\.1"),
    (backbone, dict(pooling="max"), ValueError, r"`pooling` must be 'token' or 'gap', got 'max'"),
    (backbone, dict(router="softmax"), ValueError, r"Unknown `router` 'softmax'\. Did you mean .*'softmax_token_choice'.*Known routers: .*'soft'\], or None"),
    (backbone, dict(moe_layers="every:2"), ValueError, r"`moe_layers='every:2'` needs a `router`"),
    (moe_backbone, dict(num_experts=0), ValueError, "`num_experts` " + INT_AT_LEAST_1 + "0"),
    (moe_backbone, dict(group_size=0), ValueError, "`group_size` " + INT_AT_LEAST_1 + "0"),
    (moe_backbone, dict(moe_layers="first:2"), ValueError, r"`moe_layers`: Unknown MoE placement 'first:2'\. Give a list of block indices.*'every:n'.*'last_odd:n'.*'last:n'"),
    (moe_backbone, dict(moe_layers=[5]), ValueError, r"`moe_layers`: MoE block index 5 is out of range for 2 blocks"),
    (moe_backbone, dict(router_config={"capacity_factr": 2.0}), ValueError, r"`router_config` has unknown argument\(s\) \['capacity_factr'\] for router 'softmax_token_choice'\. Did you mean capacity_factor\? Accepted: .*num_selected_experts"),
    (moe_backbone, dict(router_config=[("capacity_factor", 2.0)]), ValueError, r"`router_config` must be a dict of router arguments or None"),
    (moe_backbone, dict(router_config={"num_experts": 8}), ValueError, r"`router_config` must not set \['num_experts'\]: they are set for you \(e\.g\. `num_experts=` of the backbone\)"),
    (classifier, dict(num_classes=0), ValueError, "`num_classes` " + INT_AT_LEAST_1 + "0"),
    (classifier, dict(activation="relu"), ValueError, r"`activation` must be one of \(None, 'softmax', 'sigmoid'\), got 'relu'"),
    (classifier, dict(dropout=2.0), ValueError, "`dropout` " + RATE + r"2\.0"),
    (classifier, dict(representation_size=0), ValueError, "`representation_size` " + INT_AT_LEAST_1 + "0"),
    (classifier, dict(head_bias_init="zero"), ValueError, r"`head_bias_init` must be a finite number or None, got 'zero'"),
    (classifier, dict(backbone="vit"), ValueError, r"`backbone` must be a VisionMoEBackbone, got 'vit'"),
    (from_preset, dict(name_or_dir="vmoe_softmax_tc_b16_e23_224"), ValueError, r"Unknown preset 'vmoe_softmax_tc_b16_e23_224': not a built-in preset name and not a folder\. Did you mean: vmoe_softmax_tc_b16_e32_224"),
    (VisionMoEBackbone.from_preset, dict(preset="vit_dense_s32_224", num_layrs=2), ValueError, r"Unknown preset override 'num_layrs'\. Did you mean num_layers, .*\? Valid overrides: .*num_layers"),
    # === Callbacks ===
    (RoutingStatistics, dict(statistics=["load"]), ValueError, r"Unknown `statistics` \['load'\]; choose from \['auxiliary_loss', 'fraction_tokens_dropped', 'experts_per_token', 'load_imbalance'\]"),
    (RoutingStatistics, dict(statistics="auxiliary_loss"), ValueError, r"`statistics` must be a sequence of names, got 'auxiliary_loss'; choose from \['auxiliary_loss'"),
    (FewShotEvaluator, dict(datasets={}), ValueError, r"`datasets` must be a non-empty dict name -> \(train, test\)"),
    (FewShotEvaluator, dict(datasets=DATASETS, shots=(0,)), ValueError, r"`shots` must be positive ints, got \(0,\)"),
    (FewShotEvaluator, dict(datasets=DATASETS, shots=(1,), every_n_epochs=0), ValueError, r"`every_n_epochs` must be a positive int, got 0"),
    (FewShotEvaluator, dict(datasets=DATASETS, shots=(1,), l2_regs=(-1.0,)), ValueError, r"`l2_regs` must be a non-empty sequence of positive floats"),
    # === Training helpers ===
    (DecoupledWeightDecayAdam, dict(weight_decay_rules=[("kernel$", -0.1)]), ValueError, r"`weight_decay_rules` must be \(regex, rate >= 0\) pairs, got \('kernel\$', -0\.1\)"),
    (DecoupledWeightDecayAdam, dict(weight_decay_rules=[("kernel$", "big")]), ValueError, r"`weight_decay_rules` must be \(regex, rate >= 0\) pairs, got \('kernel\$', 'big'\)"),
    (DecoupledWeightDecayAdam, dict(weight_decay_rules="kernel$"), ValueError, r"`weight_decay_rules` must be a sequence of \(regex, rate >= 0\) pairs"),
    (DecoupledWeightDecayAdam, dict(weight_decay_rules=[("(", 0.1)]), ValueError, r"`weight_decay_rules` has a bad regex '\('"),
    (DecoupledWeightDecayAdam, dict(learning_rate=-1.0), ValueError, r"`learning_rate` must be a number > 0, got -1\.0"),
    (DecoupledWeightDecayAdam, dict(beta_1=1.5), ValueError, "`beta_1` " + RATE + r"1\.5"),
    (DecoupledWeightDecayAdam, dict(global_clipnorm=0.0), ValueError, r"`global_clipnorm` must be a number > 0, got 0\.0"),
    (WarmupLinearDecay, dict(peak_learning_rate=1e-3, total_steps=10, warmup_steps=10), ValueError, r"`warmup_steps` \(10\) must be less than `total_steps` \(10\)"),
    (WarmupLinearDecay, dict(peak_learning_rate=-1e-3, total_steps=100, warmup_steps=10), ValueError, r"`peak_learning_rate` must be a number > 0, got -0\.001"),
    (WarmupLinearDecay, dict(peak_learning_rate=1e-3, total_steps="many"), ValueError, "`total_steps` " + INT_AT_LEAST_1 + "'many'"),
    (WarmupLinearDecay, dict(peak_learning_rate=1e-3, total_steps=100, warmup_steps=10, end_learning_rate=-1.0), ValueError, r"`end_learning_rate` must be a number >= 0, got -1\.0"),
    (WarmupRsqrtCooldown, dict(peak_learning_rate=1.0, total_steps=100, warmup_steps=60, cooldown_steps=60), ValueError, r"`warmup_steps` \+ `cooldown_steps` \(60 \+ 60\) must not exceed `total_steps` \(100\)"),
    (warmup_cosine, dict(peak_learning_rate=1e-3, total_steps=100, warmup_steps=10, end_fraction=2.0), ValueError, r"`end_fraction` must be in \[0, 1\], got 2\.0"),
    (make_schedule, dict(schedule="exponential", peak_learning_rate=1e-3, total_steps=100), ValueError, r"`schedule` must be one of \('linear', 'rsqrt', 'cosine', 'constant'\), got 'exponential'"),
    (make_schedule, dict(schedule="cosine", peak_learning_rate=1e-3, total_steps=100, end_learning_rate=1.0), ValueError, r"`end_learning_rate` must be in \[0, peak_learning_rate\] for the cosine schedule, got 1\.0"),
    (compile_with_recipe, dict(model=Build(tiny_keras_model), recipe="adamw", total_steps=10), ValueError, r"`recipe` must be one of \['soft_moe', 'vmoe'\], got 'adamw'"),
    (compile_with_recipe, dict(model=Build(tiny_keras_model), recipe="vmoe", total_steps=10, loss="hinge"), ValueError, r"`loss` must be one of \('sigmoid', 'softmax'\), got 'hinge'"),
    (SigmoidCrossEntropy, dict(label_smoothing=1.0), ValueError, "`label_smoothing` " + RATE + r"1\.0"),
    (SoftmaxCrossEntropy, dict(label_smoothing="x"), ValueError, "`label_smoothing` " + RATE + "'x'"),
    (ClassificationCrossEntropy, dict(loss_type="hinge"), ValueError, r"`loss_type` must be one of \('softmax', 'sigmoid'\), got 'hinge'"),
    # === Command line ===
    (keras_vmoe_command, dict(argv=[*TRAIN, "--batch-size", "0"]), CommandFailed, r"exit status 2: keras-vmoe train: error: --batch-size must be >= 1, got 0\."),
    (keras_vmoe_command, dict(argv=[*TRAIN, "--epochs", "x"]), CommandFailed, r"exit status 2: keras-vmoe train: error: argument --epochs: invalid int value: 'x'"),
    (keras_vmoe_command, dict(argv=[*TRAIN, "--recipe", "adam"]), CommandFailed, r"exit status 2: keras-vmoe train: error: argument --recipe: invalid choice: '?adam'? \(choose from .*auto.*vmoe.*soft_moe"),
    (keras_vmoe_command, dict(argv=[*TRAIN, "--router", "bogus"]), CommandFailed, r"exit status 2: .*unknown --router 'bogus'; choose from softmax_token_choice, "),
    (keras_vmoe_command, dict(argv=[*TRAIN, "--label-smoothing", "1"]), CommandFailed, r"exit status 2: .*--label-smoothing must be in \[0, 1\), got 1\.0"),
    (keras_vmoe_command, dict(argv=[*TRAIN, "--override", "num_layers=0"]), CommandFailed, r"exit status 2: .*cannot build the model from --preset and --override: `num_layers` must be an int >= 1, got 0"),
    (keras_vmoe_command, dict(argv=["presets", "--filter", "zzz"]), CommandFailed, r"exit status 2: keras-vmoe presets: error: --filter: no preset name contains 'zzz'"),
    (keras_vmoe_command, dict(argv=["eval", "--preset", "vit_dense_s32_224", "--batch-size", "0"]), CommandFailed, r"exit status 2: keras-vmoe eval: error: --batch-size must be >= 1, got 0"),
    (keras_vmoe_command, dict(argv=["study", "--routers", "bogus"]), CommandFailed, r"exit status 2: .*unknown router 'bogus' in --routers; choose 'all' or from: dense, softmax_token_choice"),
    (keras_vmoe_command, dict(argv=["study", "--seeds", "0"]), CommandFailed, r"exit status 2: .*--seeds must be >= 1, got 0"),
    (keras_vmoe_command, dict(argv=["demo", "--steps", "0"]), CommandFailed, r"exit status 2: .*--steps must be >= 1, got 0"),
    (keras_vmoe_command, dict(argv=["--backend", "mxnet", "presets"]), CommandFailed, r"exit status 2: keras-vmoe: error: argument --backend: invalid choice: '?mxnet'? \(choose from .*jax.*tensorflow.*torch"),
]  # fmt: skip


def _row_id(row):
    make, kwargs, _, _ = row
    name = getattr(make, "__qualname__", repr(make))
    shown = kwargs.get("argv") or {
        k: v for k, v in kwargs.items() if k not in ("datasets", "model")
    }
    return f"{name}-{shown}"


@pytest.mark.parametrize(
    "make, kwargs, error, pattern", ROWS, ids=[_row_id(r) for r in ROWS]
)
def test_bad_configuration(tmp_path, monkeypatch, make, kwargs, error, pattern):
    monkeypatch.chdir(tmp_path)  # a command that wrongly ran writes here only
    kwargs = {k: v() if isinstance(v, Build) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=pattern):
        make(**kwargs)


def test_the_table_is_large_and_covers_every_area():
    assert len(ROWS) >= 30
    makers = {row[0] for row in ROWS}
    for required in (
        routers.SoftmaxTokenChoiceRouter,
        routers.SoftRouter,
        MoE,
        MlpExperts,
        VisionMoEBackbone.from_preset,
        from_preset,
        RoutingStatistics,
        FewShotEvaluator,
        DecoupledWeightDecayAdam,
        WarmupLinearDecay,
        SigmoidCrossEntropy,
        keras_vmoe_command,
    ):
        assert required in makers, required


def test_good_configurations_pass():
    """The valid neighbours of the rows build: the rows fail for their value."""
    routers.SoftmaxTokenChoiceRouter(num_experts=4, batch_priority=True)
    routers.get("soft", num_experts=4, num_slots=2)
    MlpExperts(num_experts=4, hidden_dim=8, activation="relu", dropout_rate=0.5)
    moe_backbone(router_config={"capacity_factor": 2.0}, moe_layers=[1])
    classifier(representation_size=4, dropout=0.5, head_bias_init=-1.0)
    RoutingStatistics(statistics=["auxiliary_loss"])
    DecoupledWeightDecayAdam(learning_rate=1e-3, beta_1=0.0, global_clipnorm=None)
    warmup_cosine(1e-3, 100, warmup_steps=10, end_fraction=1.0)
    SoftmaxCrossEntropy(label_smoothing=0.1)
    assert keras_vmoe_command(["presets", "--filter", "vit_dense_s32"]) == 0
