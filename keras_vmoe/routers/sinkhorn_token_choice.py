"""Sinkhorn Token Choice router (Liu et al. 2024, arXiv 2401.15969).

Specification: docs/routers.md, "Sinkhorn Token Choice".
"""

from keras import ops

from keras_vmoe.ot import sinkhorn_plan
from keras_vmoe.routers.allocation import token_choice
from keras_vmoe.routers.base import PresetRecipe
from keras_vmoe.routers.registry import register_router
from keras_vmoe.routers.sparse_router import (
    TOKEN_CHOICE_CAPACITY_FACTOR,
    TokenChoiceRouter,
)
from keras_vmoe.utils.checks import check_positive_float, check_positive_int


@register_router("sinkhorn_token_choice")
class SinkhornTokenChoiceRouter(TokenChoiceRouter):
    """Each token picks its top-K experts on a balanced (Sinkhorn) plan.

    The (noisy) gating logits are turned into an entropic optimal-transport
    plan with kernel `exp(logits / epsilon)`, token marginals 1 and expert
    marginals `S / E` (`num_iters` Sinkhorn iterations from `u = v = 1`, see
    `keras_vmoe.ot.sinkhorn_plan`). Token Choice then runs on the plan: each
    token picks its top-K experts by plan value, first choices before second
    choices, and with batch priority routing tokens with a larger maximum
    plan value go first. The combine weights are `softmax(clean logits)` at
    the chosen pairs, so the gating kernel learns through them; no gradient
    flows through the plan. No auxiliary loss by default.

    Capacity counts `S * K` token choices: `C = ceil(S * K * factor / E)`.

    Paper: https://arxiv.org/abs/2401.15969 (Sinkhorn: Cuturi 2013,
    https://arxiv.org/abs/1306.0895).

    The gating logits, the Sinkhorn plan, the top-K choices and the
    combine weights are computed in float32 whatever the dtype policy (see
    `Router`).

    Args:
        num_experts: int. Number of experts `E`.
        num_selected_experts: int. `K`, experts per token. Defaults to 2.
        capacity_factor: float. Defaults to 1.05.
        batch_priority: bool. Batch priority routing, by the maximum plan
            value of each token. Defaults to `False`.
        num_iters: int. Sinkhorn iterations. Defaults to 20.
        epsilon: float. Entropic regularisation of the plan. Defaults to 1.0.
        **kwargs: the auxiliary loss weights (all 0 by default, as in the
            reference), `eval_capacity_factor`, `capacity`,
            `capacity_multiple_of`, `noise_std`, `seed`, `kernel_initializer`
            and base layer arguments, see `TokenChoiceRouter` and
            `DenseGatingRouter`.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> router = SinkhornTokenChoiceRouter(num_experts=4)
    >>> routing = router(np.random.rand(2, 8, 16).astype("float32"))
    >>> routing.capacity  # ceil(8 * 2 * 1.05 / 4) = 5 -> 8
    8
    >>> float(ops.convert_to_numpy(routing.slot_mask).sum())  # 2 * 8 * K kept
    32.0
    """

    label = "Sinkhorn Token Choice"

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="sinkhorn_tc",
            router_config={"num_selected_experts": 2, "capacity_factor": 1.05},
            images_per_group=8,
            description="Sinkhorn Token Choice (K=2, capacity factor 1.05)",
        )

    def __init__(
        self,
        num_experts,
        num_selected_experts=2,
        capacity_factor=TOKEN_CHOICE_CAPACITY_FACTOR,
        batch_priority=False,
        num_iters=20,
        epsilon=1.0,
        **kwargs,
    ):
        super().__init__(
            num_experts,
            num_selected_experts=num_selected_experts,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
            **kwargs,
        )
        self.num_iters = check_positive_int("num_iters", num_iters)
        self.epsilon = check_positive_float("epsilon", epsilon)

    def call(self, x, training=False):
        clean, noisy = self.gating_logits(x, training)  # (G, S, E) each
        plan = sinkhorn_plan(noisy, self.num_iters, self.epsilon)  # (G, S, E)
        k = self.num_selected_experts
        capacity = self.slots_per_expert(ops.shape(x)[1], training)
        routing = token_choice(
            plan,
            k,
            capacity,
            self.batch_priority,
            combine_weights=ops.softmax(clean, axis=-1),
        )
        return routing.with_auxiliary_loss(*self.auxiliary_loss(clean, noisy, training))

    def get_config(self):
        config = super().get_config()
        config.update({"num_iters": self.num_iters, "epsilon": self.epsilon})
        return config
