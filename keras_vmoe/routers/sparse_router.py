"""The shared part of the sparse routers: capacity, noise, dense gating.

`SparseRouter` holds what the five sparse routers share on top of the
`Router` contract: the capacity settings (with a separate factor for
evaluation), the gating noise and argument checking. `DenseGatingRouter`
adds the affinity `x @ W_g` and `TokenChoiceRouter` the choice of `K`
experts per token with its balance losses. Each router then calls an
allocation function (`token_choice`, `expert_choice`) and returns a
`SparseRouting`.
"""

import keras
from keras import ops

from keras_vmoe.routers import losses
from keras_vmoe.routers.base import Router
from keras_vmoe.routers.capacity import compute_capacity
from keras_vmoe.utils.checks import (
    check_bool,
    check_non_negative,
    check_positive_float,
    check_positive_int,
    is_number,
)


class DefaultCapacityFactor(float):
    """A router's default `capacity_factor`: a float that was not given.

    Router signatures use it as the default (it prints and compares as the
    plain number), so that the router can tell a factor left at its default,
    which an explicit `capacity` replaces, from one given together with
    `capacity`, which is an error.

    Example:
    >>> DefaultCapacityFactor(1.05) == 1.05
    True
    """

    def __repr__(self):
        return float.__repr__(self)


# The routers' default capacity factors (see `DefaultCapacityFactor`).
DEFAULT_CAPACITY_FACTOR = DefaultCapacityFactor(1.0)
# Token Choice: S * K choices at factor 1.05 (the V-MoE recipe).
TOKEN_CHOICE_CAPACITY_FACTOR = DefaultCapacityFactor(1.05)
# Expert Choice: S tokens at factor 2, the compute of Token Choice K=2 at 1.
EXPERT_CHOICE_CAPACITY_FACTOR = DefaultCapacityFactor(2.0)


class SparseRouter(Router):
    """Base class of the sparse routers: capacity and gating noise.

    Each slot holds at most one token; the capacity `C` (slots per expert)
    comes from a capacity factor or an explicit `capacity`. Computes in
    float32 (see `Router`).

    Args:
        num_experts: int. Number of experts `E`.
        capacity_factor: float. Training capacity factor. Give it or
            `capacity`, not both. Defaults to the subclass's default (unused
            when `capacity` is given).
        eval_capacity_factor: float. Capacity factor when not training.
            Defaults to `None` (same as `capacity_factor`).
        capacity: int. Explicit slots per expert, instead of a factor.
            Defaults to `None`.
        capacity_multiple_of: int. Round capacities up to a multiple of
            this. Defaults to 4.
        capacity_ceil_or_round: str. How `S * K * factor / E` becomes an
            integer before that: `"ceil"` or `"round"` (Python's `round`,
            half to even), as vmoe's `capacity_ceil_or_round`. Defaults to
            `"ceil"`.
        noise_std: float. Gating noise during training is
            `noise_std / E * N(0, 1)`. Defaults to 1.0.
        seed: int. Seed of the gating noise. Defaults to `None`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`).
    """

    # Token choices per token that the capacity counts (`K` for Token Choice).
    choices_per_token = 1

    def __init__(
        self,
        num_experts,
        capacity_factor=DEFAULT_CAPACITY_FACTOR,
        eval_capacity_factor=None,
        capacity=None,
        capacity_multiple_of=4,
        noise_std=1.0,
        seed=None,
        capacity_ceil_or_round="ceil",
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        if capacity is not None:
            if capacity_factor is not None and not isinstance(
                capacity_factor, DefaultCapacityFactor
            ):
                raise ValueError(
                    "Give either `capacity_factor` or an explicit `capacity`, not "
                    f"both; got capacity_factor={capacity_factor!r}, "
                    f"capacity={capacity!r}."
                )
            capacity_factor = None
            check_positive_int("capacity", capacity)
            if eval_capacity_factor is not None:
                raise ValueError(
                    "Give `eval_capacity_factor` only with `capacity_factor`, "
                    "not with an explicit `capacity`."
                )
        elif not is_number(capacity_factor) or not capacity_factor > 0:
            raise ValueError(
                "Give `capacity_factor` (a number > 0) or an explicit `capacity` "
                f"(an int >= 1); got capacity_factor={capacity_factor!r}, "
                f"capacity={capacity!r}."
            )
        if eval_capacity_factor is not None:
            check_positive_float("eval_capacity_factor", eval_capacity_factor)
        # A plain float (or None) in the layer and its config.
        self.capacity_factor = (
            None if capacity_factor is None else float(capacity_factor)
        )
        self.eval_capacity_factor = eval_capacity_factor
        self.capacity = capacity
        self.capacity_multiple_of = check_positive_int(
            "capacity_multiple_of", capacity_multiple_of
        )
        if capacity_ceil_or_round not in ("ceil", "round"):
            raise ValueError(
                "`capacity_ceil_or_round` must be 'ceil' or 'round', got "
                f"{capacity_ceil_or_round!r}."
            )
        self.capacity_ceil_or_round = capacity_ceil_or_round
        self.noise_std = check_non_negative("noise_std", noise_std)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def slots_per_expert(self, group_tokens, training=True):
        """Capacity `C` for groups of `group_tokens` tokens.

        `C = ceil(S * K * factor / E)` (`K` = `choices_per_token`; `round`
        with `capacity_ceil_or_round="round"`), rounded up to a multiple of
        `capacity_multiple_of`; or the explicit `capacity`. Evaluation uses `eval_capacity_factor` when given.
        """
        factor = self.capacity_factor
        if not training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return compute_capacity(
            group_tokens * self.choices_per_token,
            self.num_experts,
            capacity_factor=factor,
            capacity=self.capacity,
            ceil_or_round=self.capacity_ceil_or_round,
            multiple_of=self.capacity_multiple_of,
        )

    def add_noise(self, logits, training=False):
        """Gating noise `noise_std / E * N(0, 1)`, only when training."""
        if not training or self.noise_std == 0:
            return logits
        noise = keras.random.normal(
            ops.shape(logits), dtype="float32", seed=self.seed_generator
        )
        return logits + (self.noise_std / self.num_experts) * noise

    @classmethod
    def equal_compute_config(cls, budget):
        """An explicit capacity of `budget.slots_per_expert`, not rounded up."""
        return {"capacity": budget.slots_per_expert, "capacity_multiple_of": 1}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "capacity": self.capacity,
                "capacity_multiple_of": self.capacity_multiple_of,
                "capacity_ceil_or_round": self.capacity_ceil_or_round,
                "noise_std": self.noise_std,
                "seed": self.seed,
            }
        )
        return config


class DenseGatingRouter(SparseRouter):
    """A router whose affinity is a bias-free dense layer `x @ W_g`.

    Adds the gating kernel `(d, E)`, named `gating_kernel`. See `Router` for
    the other arguments.

    Args:
        kernel_initializer: initializer of the gating kernel. Defaults to
            `"lecun_normal"`.
    """

    weight_names = ("gating_kernel",)

    def __init__(self, num_experts, kernel_initializer="lecun_normal", **kwargs):
        super().__init__(num_experts, **kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def routing_macs(self, group_tokens, dim):
        """The gating logits `(S, d) @ (d, E)`: `S * d * E`."""
        return group_tokens * dim * self.num_experts

    def weight_count(self, dim, group_tokens):
        """The gating kernel: `d * E`."""
        return dim * self.num_experts

    def build(self, input_shape):
        self.gating_kernel = self.add_weight(
            name="gating_kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer=self.kernel_initializer,
        )

    def gating_logits(self, x, training=False):
        """Clean and noisy gating logits, float32 `(G, S, E)` each."""
        x = self.check_groups(x)
        clean = ops.matmul(x, ops.cast(self.gating_kernel, "float32"))  # (G, S, E)
        return clean, self.add_noise(clean, training)

    def get_config(self):
        config = super().get_config()
        config["kernel_initializer"] = keras.initializers.serialize(
            self.kernel_initializer
        )
        return config


class TokenChoiceRouter(DenseGatingRouter):
    """Shared part of the Token Choice routers: K, BPR and the balance losses.

    Subclasses compute the scores each token ranks experts by (softmax gates,
    a transport plan, ...) and call `token_choice`. Capacity counts `S * K`
    token choices: `C = ceil(S * K * factor / E)`.

    Args:
        num_experts: int. Number of experts `E`.
        num_selected_experts: int. `K`, experts per token. Defaults to 2.
        capacity_factor: float. Defaults to 1.05.
        batch_priority: bool. Batch priority routing. Defaults to `False`.
        importance_loss_weight: float. Importance loss on
            `softmax(clean logits)`. Defaults to 0.
        load_loss_weight: float. Load loss; applies only when noise is on.
            Defaults to 0.
        gshard_loss_weight: float. GShard loss on `softmax(noisy logits)`.
            Defaults to 0.
        z_loss_weight: float. Router z-loss on the clean logits. Defaults to 0.
        **kwargs: see `DenseGatingRouter`.
    """

    def __init__(
        self,
        num_experts,
        num_selected_experts=2,
        capacity_factor=TOKEN_CHOICE_CAPACITY_FACTOR,
        batch_priority=False,
        importance_loss_weight=0.0,
        load_loss_weight=0.0,
        gshard_loss_weight=0.0,
        z_loss_weight=0.0,
        **kwargs,
    ):
        super().__init__(num_experts, capacity_factor=capacity_factor, **kwargs)
        self.num_selected_experts = check_positive_int(
            "num_selected_experts", num_selected_experts
        )
        self.choices_per_token = self.num_selected_experts
        if self.num_selected_experts > self.num_experts:
            raise ValueError(
                f"`num_selected_experts` ({num_selected_experts}) must be at most "
                f"`num_experts` ({num_experts})."
            )
        self.batch_priority = check_bool("batch_priority", batch_priority)
        self.importance_loss_weight = check_non_negative(
            "importance_loss_weight", importance_loss_weight
        )
        self.load_loss_weight = check_non_negative("load_loss_weight", load_loss_weight)
        self.gshard_loss_weight = check_non_negative(
            "gshard_loss_weight", gshard_loss_weight
        )
        self.z_loss_weight = check_non_negative("z_loss_weight", z_loss_weight)

    @classmethod
    def equal_compute_config(cls, budget):
        """`K = budget.num_selected_experts` and an explicit capacity.

        Token Choice with `K` experts per token and capacity `C` fills the
        budget's `E * C` slots (when no choice is dropped).
        """
        return {
            "num_selected_experts": budget.num_selected_experts,
            **super().equal_compute_config(budget),
        }

    def auxiliary_loss(self, clean, noisy, training):
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
            parts["gshard_loss"] = (
                self.gshard_loss_weight,
                losses.gshard_loss(ops.softmax(noisy, axis=-1)),
            )
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
