"""Sparsity-constrained Expert Choice router (arXiv 2401.15969).

Specification: docs/routers.md, "Sparsity-constrained Expert Choice".

Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023
(https://arxiv.org/abs/2209.15466).
"""

from keras import ops

from keras_vmoe.ot import sparse_ot_plan, sparse_ot_plan_with_top_k
from keras_vmoe.routers.allocation import expert_choice
from keras_vmoe.routers.base import PresetRecipe
from keras_vmoe.routers.registry import register_router
from keras_vmoe.routers.routing import SparseRouting
from keras_vmoe.routers.sparse_router import (
    EXPERT_CHOICE_CAPACITY_FACTOR,
    DenseGatingRouter,
)
from keras_vmoe.utils.checks import check_positive_float, check_positive_int


@register_router("sparsity_constrained_expert_choice")
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

    The gating logits, the similarity, the sparse transport plan (its
    semi-dual solve) and each expert's top-C choice are computed in float32
    whatever the dtype policy (see `Router`).

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

    label = "Sparsity-constrained Expert Choice"

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="sparsity_ec",
            router_config={"capacity_factor": 2.0},
            images_per_group=8,
            description="Sparsity-constrained Expert Choice (capacity factor 2)",
        )

    def __init__(
        self,
        num_experts,
        capacity_factor=EXPERT_CHOICE_CAPACITY_FACTOR,
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
        num_tokens = similarity.shape[1]
        capacity = self.slots_per_expert(num_tokens, training)
        if capacity > num_tokens:
            plan = sparse_ot_plan(
                similarity, capacity, self.num_steps, self.learning_rate
            )  # (G, S, E), at most C non-zeros per expert column
            return expert_choice(plan, capacity, combine_weights=similarity)
        plan, top_tokens = sparse_ot_plan_with_top_k(
            similarity, capacity, self.num_steps, self.learning_rate
        )  # (G, S, E), (G, E, C)
        return _expert_choice_on_ranked_plan(plan, top_tokens, similarity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"num_steps": self.num_steps, "learning_rate": self.learning_rate}
        )
        return config


def _expert_choice_on_ranked_plan(plan, top_tokens, combine_weights):
    """`expert_choice(plan, C, combine_weights)`, reusing the solver's top-C.

    Expert Choice on the plan takes, in each expert column, the `C` tokens
    of largest plan value, in decreasing order with ties to the lower token
    index. When the plan values at the solver's top-C tokens of every column
    (`top_tokens`) are positive and strictly decreasing, these are exactly
    those tokens in exactly that order, and no second top-k over all tokens
    is needed. Otherwise (a column with fewer than C positive values, or
    tied values) `expert_choice` runs; `ops.cond` runs only one of the two.

    Args:
        plan: float32 tensor `(G, S, E)`, at most `C` non-zeros per column.
        top_tokens: int32 tensor `(G, E, C)`, from `sparse_ot_plan_with_top_k`.
        combine_weights: float tensor `(G, S, E)`.

    Returns:
        A sparse `Routing` with `(G, E, C)` slots.
    """
    num_tokens, capacity = plan.shape[1], top_tokens.shape[2]
    plan_t = ops.transpose(plan, (0, 2, 1))  # (G, E, S)
    top_values = ops.take_along_axis(plan_t, top_tokens, axis=2)  # (G, E, C)
    # Positive and strictly decreasing along `top_tokens` in every column:
    # then these C tokens rank first by plan value (the other tokens' plan
    # values are 0), in this order, with no ties to break.
    positive = ops.all(top_values > 0.0)  # ()
    decreasing = ops.all(top_values[..., :-1] > top_values[..., 1:])  # ()

    def from_top_tokens():
        weights_t = ops.transpose(ops.cast(combine_weights, "float32"), (0, 2, 1))
        weights = ops.take_along_axis(weights_t, top_tokens, axis=2)  # (G, E, C)
        return top_tokens, ops.ones_like(weights), weights

    def from_expert_choice():
        routing = expert_choice(plan, capacity, combine_weights=combine_weights)
        return routing.slot_token, routing.slot_mask, routing.slot_weight

    slot_token, slot_mask, slot_weight = ops.cond(
        ops.logical_and(positive, decreasing), from_top_tokens, from_expert_choice
    )  # (G, E, C) each
    return SparseRouting(
        slot_token=slot_token,
        slot_mask=slot_mask,
        slot_weight=slot_weight,
        num_tokens=num_tokens,
    )
