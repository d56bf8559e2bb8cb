"""`Router`: the contract every router layer fulfils.

A router maps token groups `(G, S, d)` to a routing (`SparseRouting` or
`SoftRouting`, see `routing.py`). Besides routing, each router class answers
the questions the rest of the package asks of a router, so that a new router
is one file and nothing outside `routers/` keeps a per-router table:

- its registered name (`@register_router("name")`, in `registry.py`) and a
  human-readable `label`;
- what kind of routing it returns (`routing_class`);
- how many slots per expert it fills for a group of `S` tokens
  (`slots_per_expert`), and its settings that fill a given number of slots
  (`equal_compute_config`, for comparisons at equal compute);
- its cost: routing multiply-accumulates (`routing_macs`) and weights
  (`weight_count`), for the cost model without building anything;
- the names of its weights (`weight_names`), for sharding layouts;
- its setting in the paper's presets (`preset_recipe`), or none.

See docs/architecture.md, "Adding a router".
"""

import dataclasses
import math

import keras

from keras_vmoe.routers.routing import SparseRouting
from keras_vmoe.utils.checks import check_positive_int


@dataclasses.dataclass(frozen=True)
class ComputeBudget:
    """Expert slots to fill per group: the unit of "equal compute".

    Every router given `equal_compute_config(budget)` fills
    `slots_per_expert` slots of each of `num_experts` experts per group of
    `tokens_per_group` tokens, in training and evaluation alike, so the
    experts do the same work whatever the router.

    Args:
        tokens_per_group: int. `S`.
        num_experts: int. `E`.
        slots_per_expert: int. `C`.
        num_selected_experts: int. `K` for the routers that choose `K`
            experts per token (Token Choice). Defaults to 1.

    Example:
    >>> budget = ComputeBudget.from_capacity_factor(68, 8, 2, 1.0)
    >>> budget.slots_per_expert  # ceil(68 * 2 * 1.0 / 8) = 17
    17
    """

    tokens_per_group: int
    num_experts: int
    slots_per_expert: int
    num_selected_experts: int = 1

    def __post_init__(self):
        for name in (
            "tokens_per_group",
            "num_experts",
            "slots_per_expert",
            "num_selected_experts",
        ):
            check_positive_int(name, getattr(self, name))
        if self.num_selected_experts > self.num_experts:
            raise ValueError(
                f"`num_selected_experts` ({self.num_selected_experts}) must be at "
                f"most `num_experts` ({self.num_experts})."
            )

    @classmethod
    def from_capacity_factor(
        cls, tokens_per_group, num_experts, num_selected_experts, capacity_factor
    ):
        """The budget of Token Choice with `K` experts per token at factor `c`.

        `C = ceil(S * K * c / E)`, without rounding to a multiple.
        """
        exact = tokens_per_group * num_selected_experts * capacity_factor
        slots = math.ceil(exact / num_experts)
        if slots < 1:
            raise ValueError(
                f"capacity_factor={capacity_factor!r} gives {slots} slots per "
                "expert; it must be at least 1."
            )
        return cls(tokens_per_group, num_experts, slots, num_selected_experts)

    @property
    def expert_slots(self):
        """`E * C`: slots per group, all experts together."""
        return self.num_experts * self.slots_per_expert


@dataclasses.dataclass(frozen=True)
class PresetRecipe:
    """A router's setting in the built-in presets (the paper's setting).

    Args:
        short_name: str. The router's part of preset names
            (`vmoe_<short_name>_b16_e32_224`).
        router_config: dict. Router arguments (without `num_experts`).
        images_per_group: int. Images per routing group.
        description: str. One line for the preset's description.
    """

    short_name: str
    router_config: dict
    images_per_group: int
    description: str


class Router(keras.layers.Layer):
    """Base class of every router layer: the router contract.

    Dtype policies: a router takes the dtype policy of its model like any
    layer (`VisionMoEBackbone(dtype="mixed_bfloat16")` gives its routers
    that policy, and their weights are stored in its variable dtype), but
    computes its gates, transport plans and allocations in float32 whatever
    the policy: the tokens are cast to float32 (not rounded to the compute
    dtype first: routers do not autocast their inputs) and so are the
    weights. Top-k choices and capacity cut-offs compare gate values, and
    Sinkhorn iterations exponentiate and normalise them; in bfloat16 (8 bits
    of mantissa) near-ties would be broken by rounding and the iterations
    lose balance. The routing's dispatch and combine weights are float32;
    the MoE layer casts them to the tokens' dtype when it uses them.

    A subclass implements `call` (returning an instance of its
    `routing_class`) and the methods below that raise `NotImplementedError`,
    and registers itself with `@register_router("name")`.

    Args:
        num_experts: int. Number of experts `E`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`).
    """

    # Set by `@register_router`.
    router_name = None
    # Human-readable name, for tables and plots.
    label = None
    # What `call` returns: `SparseRouting` or `SoftRouting`.
    routing_class = SparseRouting
    # Names of the router's weights (for sharding layouts).
    weight_names = ()

    def __init__(self, num_experts, **kwargs):
        # Inputs keep their dtype; `check_groups` casts them to float32.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)

    def add_weight(self, *args, **kwargs):
        """`Layer.add_weight`, read in the variable dtype (no autocast).

        Under a mixed policy the weights stay float32 when the router reads
        them, instead of being rounded to the compute dtype first.
        """
        kwargs.setdefault("autocast", False)
        return super().add_weight(*args, **kwargs)

    def slots_per_expert(self, group_tokens, training=True):
        """Slots per expert `C` for groups of `group_tokens` tokens.

        Args:
            group_tokens: int. Tokens per group `S`.
            training: bool. Training or evaluation capacity. Defaults to
                `True`.
        """
        raise NotImplementedError

    def expert_slots(self, group_tokens, training=True):
        """`E * C`: slots per group that the experts process."""
        return self.num_experts * self.slots_per_expert(group_tokens, training)

    def routing_macs(self, group_tokens, dim):
        """Multiply-accumulates of routing one group of `group_tokens` tokens.

        Counts the matrix products of the affinity and of the dispatch and
        combine, not element-wise work (softmax, Sinkhorn iterations).

        Args:
            group_tokens: int. Tokens per group `S`.
            dim: int. Token width `d`.
        """
        raise NotImplementedError

    def weight_count(self, dim, group_tokens):
        """Number of router weights for tokens of width `dim`, without building."""
        raise NotImplementedError

    @classmethod
    def equal_compute_config(cls, budget):
        """Router arguments that fill exactly `budget.slots_per_expert` slots.

        Args:
            budget: `ComputeBudget`.

        Returns:
            dict of constructor arguments (without `num_experts`).
        """
        raise NotImplementedError

    @classmethod
    def preset_recipe(cls):
        """The router's `PresetRecipe` in the built-in presets, or None."""
        return None

    @staticmethod
    def check_groups(x):
        """`x` as float32 after checking that it is `(G, S, d)`."""
        if len(x.shape) != 3:
            raise ValueError(
                "Router inputs must have shape (groups, group_size, dim), got "
                f"shape {tuple(x.shape)}."
            )
        return keras.ops.cast(x, "float32")

    def get_config(self):
        config = super().get_config()
        config["num_experts"] = self.num_experts
        return config
