"""Softmax Token Choice router (V-MoE; Riquelme et al. 2021, arXiv 2106.05974)."""

from keras import ops

from keras_vmoe.routers.allocation import token_choice
from keras_vmoe.routers.base import PresetRecipe
from keras_vmoe.routers.registry import register_router
from keras_vmoe.routers.sparse_router import (
    TOKEN_CHOICE_CAPACITY_FACTOR,
    TokenChoiceRouter,
)


@register_router("softmax_token_choice")
class SoftmaxTokenChoiceRouter(TokenChoiceRouter):
    """Each token picks its top-K experts by softmax gate.

    `gates = softmax(noisy logits)`; Token Choice fills the slots (first
    choices before second choices; with batch priority routing, tokens with a
    larger top-1 gate first) and drops choices past capacity. A token's
    output is `sum_k gates[e_k] * f_{e_k}(x)` over its kept choices (the
    gates are not renormalised). Auxiliary losses keep the experts balanced.

    Capacity counts `S * K` token choices: `C = ceil(S * K * factor / E)`.

    The gating logits, the softmax gates, the top-K choices and the
    capacity cut-offs are computed in float32 whatever the dtype policy
    (see `Router`).

    Args:
        num_experts: int. Number of experts `E`.
        num_selected_experts: int. `K`, experts per token. Defaults to 2.
        capacity_factor: float. Defaults to 1.05.
        eval_capacity_factor: float. Defaults to `None` (same as training).
        batch_priority: bool. Batch priority routing. Defaults to `False`.
        importance_loss_weight: float. Defaults to 0.005.
        load_loss_weight: float. Applies only when noise is on. Defaults to
            0.005.
        gshard_loss_weight: float. Defaults to 0.
        z_loss_weight: float. Router z-loss on the clean logits. Defaults to 0.
        **kwargs: `eval_capacity_factor`, `capacity`, `capacity_multiple_of`,
            `noise_std`, `seed`, `kernel_initializer` and base layer
            arguments, see `TokenChoiceRouter` and `DenseGatingRouter`.

    Example:
    >>> import numpy as np
    >>> router = SoftmaxTokenChoiceRouter(num_experts=4)
    >>> routing = router(np.ones((2, 8, 16), "float32"))
    >>> tuple(routing.dispatch_tensor().shape)  # C = ceil(8*2*1.05/4) -> 8
    (2, 8, 4, 8)
    """

    label = "Softmax Token Choice"

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="softmax_tc",
            router_config={"num_selected_experts": 2, "capacity_factor": 1.05},
            images_per_group=8,
            description="Softmax Token Choice (K=2, capacity factor 1.05)",
        )

    def __init__(
        self,
        num_experts,
        num_selected_experts=2,
        capacity_factor=TOKEN_CHOICE_CAPACITY_FACTOR,
        batch_priority=False,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        gshard_loss_weight=0.0,
        z_loss_weight=0.0,
        **kwargs,
    ):
        super().__init__(
            num_experts,
            num_selected_experts=num_selected_experts,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
            gshard_loss_weight=gshard_loss_weight,
            z_loss_weight=z_loss_weight,
            **kwargs,
        )

    def call(self, x, training=False):
        clean, noisy = self.gating_logits(x, training)
        gates = ops.softmax(noisy, axis=-1)  # (G, S, E)
        k = self.num_selected_experts
        capacity = self.slots_per_expert(ops.shape(x)[1], training)
        routing = token_choice(gates, k, capacity, self.batch_priority)
        return routing.with_auxiliary_loss(*self.auxiliary_loss(clean, noisy, training))
