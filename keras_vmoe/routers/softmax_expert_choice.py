"""Softmax Expert Choice router (Zhou et al. 2022, arXiv 2202.09368)."""

from keras import ops

from keras_vmoe.routers.allocation import expert_choice
from keras_vmoe.routers.base import PresetRecipe
from keras_vmoe.routers.registry import register_router
from keras_vmoe.routers.sparse_router import (
    EXPERT_CHOICE_CAPACITY_FACTOR,
    DenseGatingRouter,
)


@register_router("softmax_expert_choice")
class SoftmaxExpertChoiceRouter(DenseGatingRouter):
    """Each expert takes the top-C tokens by softmax gate.

    `gates = softmax(noisy logits)` over experts; expert `e` fills its `C`
    slots with the tokens of largest `gates[:, e]`, in decreasing order; the
    combine weight is the gate. Experts are perfectly balanced by
    construction, so there is no auxiliary loss; a token may reach any number
    of experts, including none.

    Capacity counts `S` tokens: `C = ceil(S * factor / E)`, so factor `K`
    costs the same as Token Choice with `K` experts per token at factor 1.

    The gating logits, the softmax gates and each expert's top-C
    choice are computed in float32 whatever the dtype policy (see `Router`).

    Args:
        num_experts: int. Number of experts `E`.
        capacity_factor: float. Defaults to 2.0 (the compute of Token Choice
            with K=2 at factor 1).
        **kwargs: `eval_capacity_factor`, `capacity`, `capacity_multiple_of`,
            `noise_std`, `seed`, `kernel_initializer` and base layer
            arguments, see `DenseGatingRouter`.

    Example:
    >>> import numpy as np
    >>> router = SoftmaxExpertChoiceRouter(num_experts=4)
    >>> routing = router(np.ones((2, 8, 16), "float32"))
    >>> routing.capacity  # ceil(8 * 2.0 / 4) = 4
    4
    """

    label = "Softmax Expert Choice"

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="softmax_ec",
            router_config={"capacity_factor": 2.0},
            images_per_group=8,
            description="Softmax Expert Choice (capacity factor 2)",
        )

    def __init__(
        self, num_experts, capacity_factor=EXPERT_CHOICE_CAPACITY_FACTOR, **kwargs
    ):
        super().__init__(num_experts, capacity_factor=capacity_factor, **kwargs)

    def call(self, x, training=False):
        _, noisy = self.gating_logits(x, training)
        gates = ops.softmax(noisy, axis=-1)  # (G, S, E)
        capacity = self.slots_per_expert(ops.shape(x)[1], training)
        return expert_choice(gates, capacity)
