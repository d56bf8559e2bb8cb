"""Sparsity-constrained Expert Choice router (arXiv 2401.15969, router 5).

Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023
(https://arxiv.org/abs/2209.15466).
"""

import keras
from keras import ops

from keras_vmoe.ot import sparse_ot_plan
from keras_vmoe.routers.allocation import expert_choice
from keras_vmoe.routers.base import (
    DenseGatingRouter,
    check_positive_float,
    check_positive_int,
)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SparsityConstrainedExpertChoiceRouter(DenseGatingRouter):
    """Each expert takes its top-C tokens on a C-sparse transport plan.

    The similarity `softmax(logits)` (probabilities, not logits) is turned
    into a quadratically regularised transport plan with token marginals 1,
    expert marginals `S / E` and at most `C` non-zeros per expert column
    (`C` the capacity), by `num_steps` Adam steps on the semi-dual (see
    `keras_vmoe.ot.sparse_ot_plan`). Expert `e` then fills its `C` slots with
    the tokens of largest plan value in column `e` (zero-valued ties: lower
    token index first). The combine weights are `softmax(logits)`; no
    gradient flows through the solve and there is no auxiliary loss.

    The reference router adds no gating noise, so `noise_std` defaults to 0
    here; a positive `noise_std` perturbs the logits during training as in
    the other routers.

    Capacity counts `S` tokens: `C = ceil(S * factor / E)`.

    Paper: https://arxiv.org/abs/2401.15969.

    Args:
        num_experts: int. Number of experts `E`.
        capacity_factor: float. Defaults to 2.0 (the compute of Token Choice
            with K=2 at factor 1).
        num_steps: int. Adam steps of the semi-dual solve. Defaults to 20.
        learning_rate: float. Adam learning rate. Defaults to 0.01.
        noise_std: float. Gating noise during training. Defaults to 0.0.
        **kwargs: `eval_capacity_factor`, `capacity`, `capacity_multiple_of`,
            `seed`, `kernel_initializer` and base layer arguments, see
            `DenseGatingRouter`.

    Example:
    >>> import numpy as np
    >>> router = SparsityConstrainedExpertChoiceRouter(num_experts=4)
    >>> routing = router(np.random.rand(2, 8, 16).astype("float32"))
    >>> routing.capacity  # ceil(8 * 2.0 / 4) = 4
    4
    """

    def __init__(
        self,
        num_experts,
        capacity_factor=2.0,
        num_steps=20,
        learning_rate=0.01,
        noise_std=0.0,
        **kwargs,
    ):
        super().__init__(
            num_experts, capacity_factor=capacity_factor, noise_std=noise_std, **kwargs
        )
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.learning_rate = check_positive_float("learning_rate", learning_rate)

    def call(self, x, training=False):
        _, logits = self.gating_logits(x, training)  # (G, S, E), noisy if enabled
        similarity = ops.softmax(logits, axis=-1)  # (G, S, E)
        capacity = self.group_capacity(ops.shape(x)[1], training)
        plan = sparse_ot_plan(
            similarity, capacity, self.num_steps, self.learning_rate
        )  # (G, S, E), at most C non-zeros per expert column
        return expert_choice(plan, capacity, combine_weights=similarity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"num_steps": self.num_steps, "learning_rate": self.learning_rate}
        )
        return config
