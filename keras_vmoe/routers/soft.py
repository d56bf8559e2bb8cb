"""Soft MoE router (Puigcerver et al. 2024, arXiv 2308.00951)."""

import keras
from keras import ops

from keras_vmoe.routers.base import PresetRecipe, Router
from keras_vmoe.routers.registry import register_router
from keras_vmoe.routers.routing import SoftRouting
from keras_vmoe.utils.checks import check_positive_float, check_positive_int


def l2_normalize(v, axis):
    """`v / ||v||` along `axis`, with `1e-6` inside the square root."""
    return v * ops.rsqrt(ops.sum(ops.square(v), axis=axis, keepdims=True) + 1e-6)


@register_router("soft")
class SoftRouter(Router):
    """Soft MoE: every slot takes a softmax-weighted average of all tokens.

    Each expert has `P` slots, each with a learned embedding `phi[:, e, p]`.
    With `logits[s, e, p] = scale * <x_s / |x_s|, phi[:, e, p] / |phi[:, e, p]|>`,
    the dispatch weights are a softmax over tokens (per slot) and the combine
    weights a softmax over all `E * P` slots (per token). No token is ever
    dropped and there is no auxiliary loss. Experts see the un-normalised
    tokens.

    The logits and both softmaxes are computed in float32 whatever the
    dtype policy (see `Router`); the dispatch and combine einsums then run
    in the tokens' dtype.

    Args:
        num_experts: int. Number of experts `E`.
        num_slots: int. Slots per expert `P`. Defaults to 1 unless
            `capacity_factor` is given.
        capacity_factor: float. Instead of `num_slots`:
            `P = round(S * capacity_factor / E)` for groups of `S` tokens.
            Defaults to `None`.
        **kwargs: base layer arguments (`name`, `dtype`).

    Example:
    >>> import numpy as np
    >>> router = SoftRouter(num_experts=4, num_slots=2)
    >>> routing = router(np.random.rand(2, 8, 16).astype("float32"))
    >>> tuple(routing.dispatch_tensor().shape)
    (2, 8, 4, 2)
    """

    label = "Soft MoE"
    routing_class = SoftRouting
    weight_names = ("slot_embeddings", "scale")

    def __init__(self, num_experts, num_slots=None, capacity_factor=None, **kwargs):
        super().__init__(num_experts, **kwargs)
        if num_slots is not None and capacity_factor is not None:
            raise ValueError(
                "Give at most one of `num_slots` and `capacity_factor`, got "
                f"num_slots={num_slots!r}, capacity_factor={capacity_factor!r}."
            )
        if num_slots is not None:
            check_positive_int("num_slots", num_slots)
        if capacity_factor is not None:
            check_positive_float("capacity_factor", capacity_factor)
        if num_slots is None and capacity_factor is None:
            num_slots = 1
        self.num_slots = num_slots
        self.capacity_factor = capacity_factor

    def slots_per_expert(self, group_tokens, training=True):
        """Slots per expert `P` for groups of `group_tokens` tokens.

        The same in training and evaluation.
        """
        if self.num_slots is not None:
            return self.num_slots
        slots = round(group_tokens * self.capacity_factor / self.num_experts)
        if slots < 1:
            raise ValueError(
                f"`capacity_factor`={self.capacity_factor} gives "
                f"round({group_tokens} * {self.capacity_factor} / {self.num_experts})"
                f" = {slots} slots per expert; it must be at least 1."
            )
        return slots

    def routing_macs(self, group_tokens, dim):
        """Logits, dispatch and combine einsums: `3 * S * d * E * P`."""
        return 3 * group_tokens * dim * self.expert_slots(group_tokens)

    def weight_count(self, dim, group_tokens):
        """Slot embeddings `d * E * P` plus the scalar scale."""
        return dim * self.expert_slots(group_tokens) + 1

    @classmethod
    def equal_compute_config(cls, budget):
        """`budget.slots_per_expert` slots per expert."""
        return {"num_slots": budget.slots_per_expert}

    @classmethod
    def preset_recipe(cls):
        return PresetRecipe(
            short_name="soft",
            router_config={"capacity_factor": 2.0},
            images_per_group=1,
            description=(
                "Soft MoE router (round(2T/E) slots per expert, 1 image per group)"
            ),
        )

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "Router inputs must have shape (groups, group_size, dim), got "
                f"shape {tuple(input_shape)}."
            )
        dim = input_shape[-1]
        self.slot_embeddings = self.add_weight(
            name="slot_embeddings",
            shape=(dim, self.num_experts, self.slots_per_expert(input_shape[1])),
            initializer=keras.initializers.RandomNormal(stddev=dim**-0.5),
        )
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, x, training=False):
        x = ops.cast(x, "float32")
        num_groups, s, _ = ops.shape(x)
        e, p = self.num_experts, ops.shape(self.slot_embeddings)[-1]
        x_n = l2_normalize(x, axis=-1)  # (G, S, d)
        phi_n = l2_normalize(ops.cast(self.slot_embeddings, "float32"), axis=0)
        logits = ops.cast(self.scale, "float32") * ops.einsum(
            "gsd,dep->gsep", x_n, phi_n
        )  # (G, S, E, P)
        dispatch = ops.softmax(logits, axis=1)  # over tokens, per slot
        combine = ops.softmax(ops.reshape(logits, (num_groups, s, e * p)), axis=-1)
        combine = ops.reshape(combine, (num_groups, s, e, p))  # over slots, per token
        return SoftRouting(dispatch, combine)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_slots": self.num_slots,
                "capacity_factor": self.capacity_factor,
            }
        )
        return config
