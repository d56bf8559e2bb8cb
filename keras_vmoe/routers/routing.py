"""`Routing`: what a router decides, in a form the MoE layer can execute.

Shape notation used throughout:
    G: groups, S: tokens per group, E: experts, C: slots per expert
    (the capacity), d: model dimension, K: experts chosen per token.

The definition of any routing is a pair of `(G, S, E, C)` tensors (see
`docs`/ROUTERS.md): dispatch `D[g, s, e, c]` and combine `W[g, s, e, c]`.

    expert input  x~[g, e, c] = sum_s D[g, s, e, c] * x[g, s]
    token output  y[g, s]     = sum_{e,c} W[g, s, e, c] * f_e(x~[g, e, c])

Sparse routers never build those tensors in the forward pass. They fill each
slot with at most one token, so a routing is fully described by three
`(G, E, C)` tensors: which token sits in each slot, whether the slot is
filled, and the weight its output gets back on that token. Dispatch is then a
gather and combine a segment sum, both linear in the group size. Soft MoE
routings are dense by nature and keep the two `(G, S, E, C)` tensors.
"""

from keras import ops

from keras_vmoe import backend


class Routing:
    """The routing of `G` groups of `S` tokens to `E` experts of `C` slots.

    Build one with `Routing.sparse(...)` or `Routing.soft(...)`; the
    allocation functions (`token_choice`, `expert_choice`) and the router
    layers do this for you.

    Attributes:
        num_tokens: int. Tokens per group, `S`.
        num_experts: int. `E`.
        capacity: int. Slots per expert, `C`.
        is_sparse: bool. Whether each slot holds at most one whole token.
        slot_token: int32 tensor `(G, E, C)`, sparse only. Token index in
            each slot (0 for an empty slot, which `slot_mask` marks).
        slot_mask: float32 tensor `(G, E, C)`, sparse only. 1 where the slot
            holds a token.
        slot_weight: float32 tensor `(G, E, C)`, sparse only. Combine weight
            of the slot's output on its token (0 for empty slots).
        dispatch_weights, combine_weights: float32 tensors `(G, S, E, C)`,
            soft only.
        auxiliary_loss: float32 tensor `(G,)` or None. The router's weighted
            auxiliary loss, per group.
        auxiliary_losses: dict of name to float32 `(G,)` tensor. The
            unweighted auxiliary losses, for logging.
    """

    def __init__(
        self,
        num_tokens,
        num_experts,
        capacity,
        slot_token=None,
        slot_mask=None,
        slot_weight=None,
        dispatch_weights=None,
        combine_weights=None,
        auxiliary_loss=None,
        auxiliary_losses=None,
    ):
        self.num_tokens = int(num_tokens)
        self.num_experts = int(num_experts)
        self.capacity = int(capacity)
        self.slot_token = slot_token
        self.slot_mask = slot_mask
        self.slot_weight = slot_weight
        self.dispatch_weights = dispatch_weights
        self.combine_weights = combine_weights
        self.auxiliary_loss = auxiliary_loss
        self.auxiliary_losses = dict(auxiliary_losses or {})

    @classmethod
    def sparse(cls, slot_token, slot_mask, slot_weight, num_tokens, **kwargs):
        """A routing with at most one token per slot (index form)."""
        _, num_experts, capacity = ops.shape(slot_token)
        return cls(
            num_tokens,
            num_experts,
            capacity,
            slot_token=ops.cast(slot_token, "int32"),
            slot_mask=slot_mask,
            slot_weight=slot_weight,
            **kwargs,
        )

    @classmethod
    def soft(cls, dispatch_weights, combine_weights, **kwargs):
        """A routing given by dense dispatch and combine tensors `(G,S,E,C)`."""
        _, num_tokens, num_experts, capacity = ops.shape(dispatch_weights)
        return cls(
            num_tokens,
            num_experts,
            capacity,
            dispatch_weights=dispatch_weights,
            combine_weights=combine_weights,
            **kwargs,
        )

    @property
    def is_sparse(self):
        return self.slot_token is not None

    def with_auxiliary_loss(self, auxiliary_loss, auxiliary_losses=None):
        """Returns this routing with the given auxiliary loss attached."""
        self.auxiliary_loss = auxiliary_loss
        self.auxiliary_losses = dict(auxiliary_losses or {})
        return self

    # ------------------------------------------------------------------
    # Execution: the fast path used by the MoE layer.
    # ------------------------------------------------------------------
    def dispatch(self, x):
        """Expert inputs for every slot, expert-major.

        Args:
            x: tensor `(G, S, d)`.

        Returns:
            tensor `(E, G, C, d)` in the dtype of `x`: all of one expert's
            slots are contiguous, so the experts run as one batched matmul.
            Each group gathers from its own tokens only, so with groups
            sharded across devices the gather stays local and the transpose
            to expert-major becomes one all-to-all when `E` is sharded.
        """
        x = ops.convert_to_tensor(x)
        if not self.is_sparse:
            d = ops.cast(self.dispatch_weights, x.dtype)
            return ops.einsum("gsec,gsd->egcd", d, x)
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
        """Token outputs from the experts' slot outputs.

        Args:
            expert_outputs: tensor `(E, G, C, d)`.

        Returns:
            tensor `(G, S, d)` in the dtype of `expert_outputs`.
        """
        y = ops.convert_to_tensor(expert_outputs)
        if not self.is_sparse:
            w = ops.cast(self.combine_weights, y.dtype)
            return ops.einsum("egcd,gsec->gsd", y, w)
        e, num_groups, c, d_model = ops.shape(y)
        y = ops.transpose(y, (1, 0, 2, 3))  # (G, E, C, d)
        weighted = y * ops.cast(self.slot_weight, y.dtype)[..., None]
        return backend.grouped_segment_sum(
            ops.reshape(weighted, (num_groups, e * c, d_model)),  # (G, E*C, d)
            ops.reshape(self.slot_token, (num_groups, e * c)),  # (G, E*C)
            num_segments=self.num_tokens,
        )  # (G, S, d)

    # ------------------------------------------------------------------
    # The definition: dense tensors and the einsum reference path.
    # ------------------------------------------------------------------
    def dispatch_tensor(self):
        """Dense dispatch tensor `D`, float32 `(G, S, E, C)`."""
        if not self.is_sparse:
            return self.dispatch_weights
        return self._slots_to_dense(self.slot_mask)

    def combine_tensor(self):
        """Dense combine tensor `W`, float32 `(G, S, E, C)`."""
        if not self.is_sparse:
            return self.combine_weights
        return self._slots_to_dense(self.slot_weight)

    def _slots_to_dense(self, slot_values):
        # one_hot(slot_token): (G, E, C, S), one row per slot.
        one_hot = ops.one_hot(self.slot_token, self.num_tokens, dtype="float32")
        dense = one_hot * ops.cast(slot_values, "float32")[..., None]
        return ops.transpose(dense, (0, 3, 1, 2))  # (G, S, E, C)

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

    # ------------------------------------------------------------------
    # Statistics.
    # ------------------------------------------------------------------
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
        e = self.num_experts
        if self.is_sparse:
            mask = ops.cast(self.slot_mask, "float32")  # (G, E, C)
            num_groups = ops.shape(mask)[0]
            per_token = backend.grouped_segment_sum(
                ops.reshape(mask, (num_groups, -1)),  # (G, E*C)
                ops.reshape(self.slot_token, (num_groups, -1)),
                num_segments=self.num_tokens,
            )  # (G, S) experts reached by each token
            dropped = ops.mean(ops.cast(per_token == 0, "float32"))
            experts_per_token = ops.mean(per_token)
            filled = ops.sum(mask, axis=2)  # (G, E)
        else:
            dispatch = ops.cast(self.dispatch_weights, "float32")
            dropped = ops.zeros((), "float32")
            experts_per_token = ops.cast(e, "float32") * ops.ones((), "float32")
            filled = ops.sum(dispatch, axis=(1, 3))  # (G, E)
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
            "load_imbalance": ops.max(load) * e,
            "auxiliary_loss": aux,
        }
