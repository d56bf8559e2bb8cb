"""Softmax Token Choice router (V-MoE; Riquelme et al. 2021, arXiv 2106.05974)."""

import keras
from keras import ops

from keras_vmoe.routers import losses
from keras_vmoe.routers.allocation import token_choice
from keras_vmoe.routers.base import (
    DenseGatingRouter,
    check_non_negative,
    check_positive_int,
)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftmaxTokenChoiceRouter(DenseGatingRouter):
    """Each token picks its top-K experts by softmax gate.

    `gates = softmax(noisy logits)`; Token Choice fills the slots (first
    choices before second choices; with batch priority routing, tokens with a
    larger top-1 gate first) and drops choices past capacity. A token's
    output is `sum_k gates[e_k] * f_{e_k}(x)` over its kept choices (the
    gates are not renormalised). Auxiliary losses keep the experts balanced.

    Capacity counts `S * K` token choices: `C = ceil(S * K * factor / E)`.

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
        **kwargs: `capacity`, `capacity_multiple_of`, `noise_std`, `seed`,
            `kernel_initializer` and base layer arguments, see
            `DenseGatingRouter`.

    Example:
    >>> import numpy as np
    >>> router = SoftmaxTokenChoiceRouter(num_experts=4)
    >>> routing = router(np.ones((2, 8, 16), "float32"))
    >>> tuple(routing.dispatch_tensor().shape)  # C = ceil(8*2*1.05/4) -> 8
    (2, 8, 4, 8)
    """

    counts_selected_experts = True

    def __init__(
        self,
        num_experts,
        num_selected_experts=2,
        capacity_factor=1.05,
        batch_priority=False,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        gshard_loss_weight=0.0,
        z_loss_weight=0.0,
        **kwargs,
    ):
        super().__init__(num_experts, capacity_factor=capacity_factor, **kwargs)
        self.num_selected_experts = check_positive_int(
            "num_selected_experts", num_selected_experts
        )
        if self.num_selected_experts > self.num_experts:
            raise ValueError(
                f"`num_selected_experts` ({num_selected_experts}) must be at most "
                f"`num_experts` ({num_experts})."
            )
        self.batch_priority = bool(batch_priority)
        self.importance_loss_weight = check_non_negative(
            "importance_loss_weight", importance_loss_weight
        )
        self.load_loss_weight = check_non_negative("load_loss_weight", load_loss_weight)
        self.gshard_loss_weight = check_non_negative(
            "gshard_loss_weight", gshard_loss_weight
        )
        self.z_loss_weight = check_non_negative("z_loss_weight", z_loss_weight)

    def call(self, x, training=False):
        clean, noisy = self.gating_logits(x, training)
        gates = ops.softmax(noisy, axis=-1)  # (G, S, E)
        k = self.num_selected_experts
        capacity = self.group_capacity(ops.shape(x)[1], training, k)
        routing = token_choice(gates, k, capacity, self.batch_priority)
        return routing.with_auxiliary_loss(
            *self.auxiliary_loss(clean, noisy, gates, training)
        )

    def auxiliary_loss(self, clean, noisy, gates, training):
        """Weighted sum of the enabled losses `(G,)`, and each loss by name."""
        parts = {}
        if self.importance_loss_weight > 0:
            parts["importance_loss"] = (
                self.importance_loss_weight,
                losses.importance_loss(ops.softmax(clean, axis=-1)),
            )
        if self.load_loss_weight > 0 and training and self.noise_std > 0:
            parts["load_loss"] = (
                self.load_loss_weight,
                losses.load_loss(
                    clean, noisy, self.noise_std, self.num_selected_experts
                ),
            )
        if self.gshard_loss_weight > 0:
            parts["gshard_loss"] = (self.gshard_loss_weight, losses.gshard_loss(gates))
        if self.z_loss_weight > 0:
            parts["router_z_loss"] = (self.z_loss_weight, losses.router_z_loss(clean))
        if not parts:
            return None, {}
        total = sum(weight * value for weight, value in parts.values())
        return total, {name: value for name, (_, value) in parts.items()}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_selected_experts": self.num_selected_experts,
                "batch_priority": self.batch_priority,
                "importance_loss_weight": self.importance_loss_weight,
                "load_loss_weight": self.load_loss_weight,
                "gshard_loss_weight": self.gshard_loss_weight,
                "z_loss_weight": self.z_loss_weight,
            }
        )
        return config
