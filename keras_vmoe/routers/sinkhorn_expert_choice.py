"""Sinkhorn Expert Choice router (Liu et al. 2024, arXiv 2401.15969).

Specification: docs/routers.md, "Sinkhorn Expert Choice".
"""

from keras import ops

from keras_vmoe.ot import sinkhorn_plan
from keras_vmoe.routers.allocation import expert_choice
from keras_vmoe.routers.base import PresetRecipe
from keras_vmoe.routers.registry import register_router
from keras_vmoe.routers.sparse_router import (
    EXPERT_CHOICE_CAPACITY_FACTOR,
    DenseGatingRouter,
)
from keras_vmoe.utils.checks import check_positive_float, check_positive_int


@register_router("sinkhorn_expert_choice")
class SinkhornExpertChoiceRouter(DenseGatingRouter):
    """Each expert takes its top-C tokens on a balanced (Sinkhorn) plan.

    The noisy gating logits are turned into an entropic optimal-transport
    plan with kernel `exp(logits / epsilon)`, token marginals 1 and expert
    marginals `S / E` (see `keras_vmoe.ot.sinkhorn_plan`). Expert `e` fills
    its `C` slots with the tokens of largest plan value in column `e`, in
    decreasing order (ties: lower token index first). The combine weights
    are `softmax(noisy logits)`; no gradient flows through the plan and
    there is no auxiliary loss.

    Capacity counts `S` tokens: `C = ceil(S * factor / E)`.

    Paper: https://arxiv.org/abs/2401.15969.

    The gating logits, the Sinkhorn plan, each expert's top-C choice and
    the combine weights are computed in float32 whatever the dtype policy
    (see `Router`).

    Args:
        num_experts: int. Number of experts `E`.
        capacity_factor: float. Defaults to 2.0 (the compute of Token Choice
            with K=2 at factor 1).
        num_iters: int. Sinkhorn iterations. Defaults to 20.
        epsilon: float. Entropic regularisation of the plan. Defaults to 1.0.
        **kwargs: `eval_capacity_factor`, `capacity`, `capacity_multiple_of`,
            `noise_std`, `seed`, `kernel_initializer` and base layer
            arguments, see `DenseGatingRouter`.

    Example:
    >>> import numpy as np
    >>> router = SinkhornExpertChoiceRouter(num_experts=4)
    >>> routing = router(np.random.rand(2, 8, 16).astype("float32"))
    >>> routing.capacity  # ceil(8 * 2.0 / 4) = 4
    4
    """

    label = "Sinkhorn Expert Choice"

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="sinkhorn_ec",
            router_config={"capacity_factor": 2.0},
            images_per_group=8,
            description="Sinkhorn Expert Choice (capacity factor 2)",
        )

    def __init__(
        self,
        num_experts,
        capacity_factor=EXPERT_CHOICE_CAPACITY_FACTOR,
        num_iters=20,
        epsilon=1.0,
        **kwargs,
    ):
        super().__init__(num_experts, capacity_factor=capacity_factor, **kwargs)
        self.num_iters = check_positive_int("num_iters", num_iters)
        self.epsilon = check_positive_float("epsilon", epsilon)

    def call(self, x, training=False):
        _, noisy = self.gating_logits(x, training)  # (G, S, E)
        plan = sinkhorn_plan(noisy, self.num_iters, self.epsilon)  # (G, S, E)
        capacity = self.slots_per_expert(ops.shape(x)[1], training)
        return expert_choice(
            plan, capacity, combine_weights=ops.softmax(noisy, axis=-1)
        )

    def get_config(self):
        config = super().get_config()
        config.update({"num_iters": self.num_iters, "epsilon": self.epsilon})
        return config
