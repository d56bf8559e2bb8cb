"""`Routing`: what a router decides, in a form the MoE layer can execute.

Shape notation used throughout:
    G: groups, S: tokens per group, E: experts, C: slots per expert
    (the capacity), d: model dimension, K: experts chosen per token.

The definition of any routing is a pair of `(G, S, E, C)` tensors (see
docs/routers.md, "Dispatch and combine"): dispatch `D[g, s, e, c]` and
combine `W[g, s, e, c]`.

    expert input  x~[g, e, c] = sum_s D[g, s, e, c] * x[g, s]
    token output  y[g, s]     = sum_{e,c} W[g, s, e, c] * f_e(x~[g, e, c])

Two kinds of routing, two classes with the same interface (`Routing`):

- `SparseRouting`: each slot holds at most one whole token, so three
  `(G, E, C)` tensors describe it: which token sits in each slot, whether the
  slot is filled, and the weight its output gets back on that token.
  Dispatch is a gather and combine a segment sum, both linear in the group
  size; the `(G, S, E, C)` tensors are never built in the forward pass.
- `SoftRouting`: every slot is a weighted average of all tokens (Soft MoE),
  so the routing is the two dense `(G, S, E, C)` tensors themselves.
"""

from keras import ops

from keras_vmoe import backend


class Routing:
    """The routing of `G` groups of `S` tokens to `E` experts of `C` slots.

    The interface shared by `SparseRouting` and `SoftRouting`; router layers
    return one of the two (a router declares which in `routing_class`).

    Attributes:
        num_tokens: int. Tokens per group, `S`.
        num_experts: int. `E`.
        capacity: int. Slots per expert, `C`.
        auxiliary_loss: float32 tensor `(G,)` or None. The router's weighted
            auxiliary loss, per group.
        auxiliary_losses: dict of name to float32 `(G,)` tensor. The
            unweighted auxiliary losses, for logging.
    """

    def __init__(
        self, num_tokens, num_experts, capacity, auxiliary_loss, auxiliary_losses
    ):
        self.num_tokens = int(num_tokens)
        self.num_experts = int(num_experts)
        self.capacity = int(capacity)
        self.auxiliary_loss = auxiliary_loss
        self.auxiliary_losses = dict(auxiliary_losses or {})

    def with_auxiliary_loss(self, auxiliary_loss, auxiliary_losses=None):
        """Returns this routing with the given auxiliary loss attached."""
        self.auxiliary_loss = auxiliary_loss
        self.auxiliary_losses = dict(auxiliary_losses or {})
        return self

    def dispatch(self, x):
        """Expert inputs for every slot, expert-major.

        Args:
            x: tensor `(G, S, d)`.

        Returns:
            tensor `(E, G, C, d)` in the dtype of `x`: all of one expert's
            slots are contiguous, so the experts run as one batched matmul.
        """
        raise NotImplementedError

    def combine(self, expert_outputs):
        """Token outputs from the experts' slot outputs.

        Args:
            expert_outputs: tensor `(E, G, C, d)`.

        Returns:
            tensor `(G, S, d)` in the dtype of `expert_outputs`.
        """
        raise NotImplementedError

    def dispatch_tensor(self):
        """Dense dispatch tensor `D`, float32 `(G, S, E, C)`."""
        raise NotImplementedError

    def combine_tensor(self):
        """Dense combine tensor `W`, float32 `(G, S, E, C)`."""
        raise NotImplementedError

    def einsum_dispatch(self, x):
        """Reference dispatch through the dense tensor (quadratic memory)."""
        x = ops.convert_to_tensor(x)
        d = ops.cast(self.dispatch_tensor(), x.dtype)
        return ops.einsum("gsec,gsd->egcd", d, x)  # (E, G, C, d)

    def einsum_combine(self, expert_outputs):
        """Reference combine through the dense tensor (quadratic memory)."""
        y = ops.convert_to_tensor(expert_outputs)
        w = ops.cast(self.combine_tensor(), y.dtype)
        return ops.einsum("egcd,gsec->gsd", y, w)  # (G, S, d)

    def statistics(self):
        """Routing statistics, averaged over groups (float32 scalars).

        Returns:
            dict with
            - `fraction_tokens_dropped`: tokens that reach no expert;
            - `experts_per_token`: mean number of experts each token reaches;
            - `expert_load`: `(E,)` share of the filled slots per expert
              (sums to 1);
            - `load_imbalance`: max over experts of the load divided by the
              mean load (1 is perfectly balanced).
            - `auxiliary_loss`: mean over groups (0 if the router has none).
        """
        dropped, experts_per_token, filled = self._occupancy()  # filled: (G, E)
        total = ops.maximum(ops.sum(filled, axis=1, keepdims=True), 1e-9)
        load = ops.mean(filled / total, axis=0)  # (E,)
        if self.auxiliary_loss is None:
            aux = ops.zeros((), "float32")
        else:
            aux = ops.mean(ops.cast(self.auxiliary_loss, "float32"))
        return {
            "fraction_tokens_dropped": dropped,
            "experts_per_token": experts_per_token,
            "expert_load": load,
            "load_imbalance": ops.max(load) * self.num_experts,
            "auxiliary_loss": aux,
        }

    def _occupancy(self):
        """`(fraction dropped, experts per token, filled slots (G, E))`."""
        raise NotImplementedError


class SparseRouting(Routing):
    """A routing with at most one whole token per slot (index form).

    The allocation functions (`token_choice`, `expert_choice`) build these.

    Args:
        slot_token: int tensor `(G, E, C)`. Token index in each slot (0 for an
            empty slot, which `slot_mask` marks).
        slot_mask: float32 tensor `(G, E, C)`. 1 where the slot holds a token.
        slot_weight: float32 tensor `(G, E, C)`. Combine weight of the slot's
            output on its token (0 for empty slots).
        num_tokens: int. Tokens per group, `S`.
        auxiliary_loss: float32 tensor `(G,)` or None. Defaults to `None`.
        auxiliary_losses: dict of name to `(G,)` tensor. Defaults to `None`.

    Example:
    >>> import numpy as np
    >>> routing = SparseRouting(np.array([[[1], [0]]]),  # expert 0 <- token 1
    ...     np.ones((1, 2, 1), "float32"), np.ones((1, 2, 1), "float32"),
    ...     num_tokens=2)
    >>> routing.num_experts, routing.capacity
    (2, 1)
    """

    def __init__(
        self,
        slot_token,
        slot_mask,
        slot_weight,
        num_tokens,
        auxiliary_loss=None,
        auxiliary_losses=None,
    ):
        _, num_experts, capacity = ops.shape(slot_token)
        super().__init__(
            num_tokens, num_experts, capacity, auxiliary_loss, auxiliary_losses
        )
        self.slot_token = ops.cast(slot_token, "int32")
        self.slot_mask = slot_mask
        self.slot_weight = slot_weight

    def dispatch(self, x):
        # Each group gathers from its own tokens only, so with groups sharded
        # across devices the gather stays local and the transpose to
        # expert-major becomes one all-to-all when `E` is sharded.
        x = ops.convert_to_tensor(x)
        num_groups, _, d_model = ops.shape(x)
        e, c = self.num_experts, self.capacity
        slots = ops.reshape(self.slot_token, (num_groups, e * c))  # (G, E*C)
        gathered = backend.grouped_take(x, slots)  # (G, E*C, d)
        gathered = gathered * ops.reshape(
            ops.cast(self.slot_mask, x.dtype), (num_groups, e * c, 1)
        )
        gathered = ops.reshape(gathered, (num_groups, e, c, d_model))
        return ops.transpose(gathered, (1, 0, 2, 3))  # (E, G, C, d)

    def combine(self, expert_outputs):
        y = ops.convert_to_tensor(expert_outputs)
        e, num_groups, c, d_model = ops.shape(y)
        y = ops.transpose(y, (1, 0, 2, 3))  # (G, E, C, d)
        weighted = y * ops.cast(self.slot_weight, y.dtype)[..., None]
        return backend.grouped_segment_sum(
            ops.reshape(weighted, (num_groups, e * c, d_model)),  # (G, E*C, d)
            ops.reshape(self.slot_token, (num_groups, e * c)),  # (G, E*C)
            num_segments=self.num_tokens,
        )  # (G, S, d)

    def dispatch_tensor(self):
        return self._slots_to_dense(self.slot_mask)

    def combine_tensor(self):
        return self._slots_to_dense(self.slot_weight)

    def _slots_to_dense(self, slot_values):
        # one_hot(slot_token): (G, E, C, S), one row per slot.
        one_hot = ops.one_hot(self.slot_token, self.num_tokens, dtype="float32")
        dense = one_hot * ops.cast(slot_values, "float32")[..., None]
        return ops.transpose(dense, (0, 3, 1, 2))  # (G, S, E, C)

    def _occupancy(self):
        mask = ops.cast(self.slot_mask, "float32")  # (G, E, C)
        num_groups = ops.shape(mask)[0]
        per_token = backend.grouped_segment_sum(
            ops.reshape(mask, (num_groups, -1)),  # (G, E*C)
            ops.reshape(self.slot_token, (num_groups, -1)),
            num_segments=self.num_tokens,
        )  # (G, S) experts reached by each token
        dropped = ops.mean(ops.cast(per_token == 0, "float32"))
        return dropped, ops.mean(per_token), ops.sum(mask, axis=2)  # (G, E)


class SoftRouting(Routing):
    """A routing given by dense dispatch and combine tensors (Soft MoE).

    Every slot's input is a weighted average of the group's tokens, so no
    token is dropped and every token reaches every expert.

    Args:
        dispatch_weights: float32 tensor `(G, S, E, C)`. Per slot, weights
            over the tokens (a softmax over `S` in Soft MoE).
        combine_weights: float32 tensor `(G, S, E, C)`. Per token, weights
            over the slots (a softmax over `E * C` in Soft MoE).
        auxiliary_loss: float32 tensor `(G,)` or None. Defaults to `None`.
        auxiliary_losses: dict of name to `(G,)` tensor. Defaults to `None`.

    Example:
    >>> import numpy as np
    >>> weights = np.full((1, 4, 2, 1), 0.25, "float32")  # 4 tokens, 2 experts
    >>> SoftRouting(weights, weights).capacity
    1
    """

    def __init__(
        self,
        dispatch_weights,
        combine_weights,
        auxiliary_loss=None,
        auxiliary_losses=None,
    ):
        _, num_tokens, num_experts, capacity = ops.shape(dispatch_weights)
        super().__init__(
            num_tokens, num_experts, capacity, auxiliary_loss, auxiliary_losses
        )
        self.dispatch_weights = dispatch_weights
        self.combine_weights = combine_weights

    # A soft routing is its dense tensors: the fast path is the einsum.
    def dispatch(self, x):
        return self.einsum_dispatch(x)

    def combine(self, expert_outputs):
        return self.einsum_combine(expert_outputs)

    def dispatch_tensor(self):
        return self.dispatch_weights

    def combine_tensor(self):
        return self.combine_weights

    def _occupancy(self):
        dispatch = ops.cast(self.dispatch_weights, "float32")
        experts = ops.cast(self.num_experts, "float32") * ops.ones((), "float32")
        return ops.zeros((), "float32"), experts, ops.sum(dispatch, axis=(1, 3))
