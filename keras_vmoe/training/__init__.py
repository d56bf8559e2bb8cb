"""The pre-training recipe: losses, optimiser, learning-rate schedules."""

from keras_vmoe.training.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy
from keras_vmoe.training.optimizer import (
    SOFT_MOE_WEIGHT_DECAY,
    VMOE_WEIGHT_DECAY,
    DecoupledWeightDecayAdam,
)
from keras_vmoe.training.recipe import (
    RECIPES,
    BackupAndRestoreWithRNG,
    compile_with_recipe,
    make_schedule,
    seed_state_variables,
    use_seeded_dropout,
)
from keras_vmoe.training.schedules import (
    PerUpdate,
    WarmupLinearDecay,
    WarmupRsqrtCooldown,
    warmup_cosine,
)
from keras_vmoe.training.upcycling import (
    apply_upcycling_options,
    freeze_non_expert_weights,
)

__all__ = [
    "BackupAndRestoreWithRNG",
    "RECIPES",
    "SoftmaxCrossEntropy",
    "compile_with_recipe",
    "make_schedule",
    "seed_state_variables",
    "use_seeded_dropout",
    "DecoupledWeightDecayAdam",
    "SOFT_MOE_WEIGHT_DECAY",
    "SigmoidCrossEntropy",
    "VMOE_WEIGHT_DECAY",
    "PerUpdate",
    "WarmupLinearDecay",
    "WarmupRsqrtCooldown",
    "warmup_cosine",
    "apply_upcycling_options",
    "freeze_non_expert_weights",
]
