"""`MoE`: the Mixture-of-Experts layer that replaces a transformer MLP."""

import contextlib
import dataclasses
import math

import keras
from keras import ops

from keras_vmoe import backend, routers
from keras_vmoe.utils.checks import check_bool, check_positive_int

# Routing statistics kept as non-trainable variables (see `track_statistics`).
STATISTICS = (
    "auxiliary_loss",
    "fraction_tokens_dropped",
    "experts_per_token",
    "load_imbalance",
)
# When the statistics variables are updated: on training calls only, on
# every call, or never.
TRACK_STATISTICS = ("training", "always", "never")


def _has_num_experts(layer):
    return isinstance(layer, keras.layers.Layer) and isinstance(
        getattr(layer, "num_experts", None), int
    )


class _RoutingCapture:
    # One open `capture_routing()` block: the routings of its eager calls
    # and how many traced calls it could not record. A plain object, so
    # that Keras' attribute tracking leaves the list alone.
    def __init__(self):
        self.routings = []
        self.traced_calls = 0


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MoE(keras.layers.Layer):
    """Mixture of Experts: group, route, dispatch, run experts, combine.

    Tokens `(B, T, d)` are flattened and cut into groups of `group_size`
    consecutive tokens `(G, S, d)` (so consecutive images share a group).
    The router decides a `Routing` per group; the layer gathers each slot's
    input `(E, G, C, d)`, runs all experts as one batched computation, and
    combines the slot outputs back onto the tokens. Sparse routings are
    executed with gathers and segment sums (memory linear in the group);
    `use_einsum_dispatch=True` runs the dense `(G, S, E, C)` reference
    instead (same outputs, for tests and teaching).

    Any batch size works: when `S` does not divide the `N = B * T` tokens,
    the `N % S` tokens left after the `N // S` whole groups form a partial
    last group `(1, N % S, d)`, routed as a batch of its own would be: with
    the capacities of a group of its size (`router.slots_per_expert(N % S)`)
    and no padding. Whole groups are unaffected, and when `S` is a multiple
    of `T` (whole images per group) the examples of the partial group get
    exactly their outputs as a batch of their own. Under a `tf.function`
    that leaves the batch size unknown (TensorFlow's `fit` and `predict`),
    the partial group's size is one of at most `S / gcd(S, T) - 1` values;
    the layer routes it in a switch with one branch per size (at most
    `MAX_TRACED_PARTIAL_SIZES`; beyond that, or with `T` unknown too, such
    traced calls need whole groups). The auxiliary loss is the mean over all
    groups, the partial one included, and the statistics are over all
    tokens (per-token ones) or all groups (expert load, auxiliary loss).

    A group that contains a NaN or Inf value returns NaN for all its tokens
    (other groups are unaffected), never a silently wrong routing.

    The router's auxiliary loss (mean over groups) is added with `add_loss`.
    The routing statistics of the latest training call are kept in
    non-trainable variables (of the policy's variable dtype) named after
    `STATISTICS` (read them with
    `routing_statistics()`, or log them with
    `keras_vmoe.callbacks.RoutingStatistics` during `fit`);
    `track_statistics` says which calls update them.

    To observe the routing itself, call the layer (or a model containing
    it) eagerly inside `with layer.capture_routing() as routings:`; each
    call appends its `Routing` (see `capture_routing`), and a call with a
    partial last group appends a second one, the partial group's.

    Args:
        router: a `keras_vmoe.routers.Router` (e.g.
            `SoftmaxTokenChoiceRouter`) or a config dict from
            `keras.layers.serialize`.
        experts: an experts layer (e.g. `MlpExperts`) or its config dict.
        group_size: int. Tokens per routing group `S` (any batch size
            works; see above for a partial last group).
        use_einsum_dispatch: bool. Use the dense reference path. Defaults to
            `False`.
        expert_axis: str or None. Under a `keras.distribution` distribution
            (JAX) whose device mesh has this axis, the dispatched tokens
            `(E, G, C, d)` and the expert outputs are constrained to be
            sharded on it along `E` (and on the distribution's batch axis
            along `G` when `G` divides evenly), so that XLA sends tokens to
            the experts' devices (all-to-all) instead of gathering every
            expert's weights on every device. Shard the expert weights on
            the same axis (`keras_vmoe.distribution.get_layout_map`). No-op
            without such a distribution or on other backends. Defaults to
            `"expert"`.
        track_statistics: str. Which calls update the statistics
            variables: `"training"` (calls with `training=True`, i.e.
            `fit`; inference such as `predict` or `evaluate` neither
            computes nor changes them), `"always"` (every call), or
            `"never"`. Defaults to `"training"`.
        bfloat16_dispatch: bool. Round the tokens sent to the experts and
            the experts' outputs to bfloat16 before the dispatch and the
            combine (which still compute in the tokens' dtype), as vmoe's
            `Bfloat16Dispatcher` does (its `dispatcher.bfloat16` option, and
            always in its Soft MoE router); the router still sees the
            unrounded tokens. Needed to reproduce the logits of models
            trained that way. No effect when the tokens are already
            bfloat16. Defaults to `False`.
        **kwargs: base layer arguments. A `dtype` policy given here should
            be given to `router` and `experts` too (as `VisionMoEBackbone`
            does); the router computes its routing in float32 whatever its
            policy.

    Example:
    >>> import numpy as np
    >>> from keras_vmoe.layers import MlpExperts
    >>> from keras_vmoe.routers import SoftmaxExpertChoiceRouter
    >>> moe = MoE(SoftmaxExpertChoiceRouter(num_experts=4),
    ...           MlpExperts(num_experts=4, hidden_dim=32), group_size=8)
    >>> x = np.random.rand(2, 8, 16).astype("float32")
    >>> tuple(moe(x).shape)
    (2, 8, 16)

    Observing the routing of an (eager) call, here of 2 groups of 8 tokens:
    >>> with moe.capture_routing() as routings:
    ...     _ = moe(x)
    >>> tuple(routings[-1].combine_tensor().shape)  # (G, S, E, C)
    (2, 8, 4, 4)

    A batch of 3 sequences of 5 tokens: one whole group of 8 tokens and a
    partial group of 7, with its own capacity `ceil(7 * 2 / 4) = 4`:
    >>> x = np.random.rand(3, 5, 16).astype("float32")
    >>> with moe.capture_routing() as routings:
    ...     y = moe(x)
    >>> tuple(y.shape), [(r.num_tokens, r.capacity) for r in routings]
    ((3, 5, 16), [(8, 4), (7, 4)])
    """

    def __init__(
        self,
        router,
        experts,
        group_size,
        use_einsum_dispatch=False,
        expert_axis="expert",
        track_statistics="training",
        bfloat16_dispatch=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(router, dict):
            router = keras.layers.deserialize(router)
        if isinstance(experts, dict):
            experts = keras.layers.deserialize(experts)
        if not isinstance(router, routers.Router):
            raise ValueError(
                "`router` must be a `keras_vmoe.routers.Router` layer (e.g. "
                "`keras_vmoe.routers.get(name, num_experts=...)` for a name in "
                f"{', '.join(routers.ROUTER_NAMES)}), got {router!r}."
            )
        if not _has_num_experts(experts):
            raise ValueError(
                "`experts` must be an experts layer with a `num_experts` "
                f"attribute (e.g. `keras_vmoe.layers.MlpExperts`), got {experts!r}."
            )
        if getattr(router, "num_experts", None) != getattr(
            experts, "num_experts", None
        ):
            raise ValueError(
                "`router` and `experts` disagree on the number of experts: "
                f"{getattr(router, 'num_experts', None)} vs "
                f"{getattr(experts, 'num_experts', None)}."
            )
        self.router = router
        self.experts = experts
        self.group_size = check_positive_int("group_size", group_size)
        self.use_einsum_dispatch = check_bool(
            "use_einsum_dispatch", use_einsum_dispatch
        )
        if expert_axis is not None and not isinstance(expert_axis, str):
            raise ValueError(
                f"`expert_axis` must be a mesh axis name or None, got {expert_axis!r}."
            )
        self.expert_axis = expert_axis
        self.track_statistics = track_statistics
        self.bfloat16_dispatch = check_bool("bfloat16_dispatch", bfloat16_dispatch)
        self._routing_captures = ()  # open `_RoutingCapture`s

    @property
    def track_statistics(self):
        """Which calls update the statistics: one of `TRACK_STATISTICS`."""
        return self._track_statistics

    @track_statistics.setter
    def track_statistics(self, value):
        if value not in TRACK_STATISTICS:
            raise ValueError(
                f"`track_statistics` must be one of {list(TRACK_STATISTICS)}, "
                f"got {value!r}."
            )
        self._track_statistics = value

    def _updates_statistics(self, training):
        if self.track_statistics == "training":
            return bool(training)
        return self.track_statistics == "always"

    @contextlib.contextmanager
    def capture_routing(self):
        """Records the `Routing` of every eager call of the layer in the block.

        The record holds the router's own output on the layer's groups
        (`(G, S, d)`: the call's tokens cut into `group_size` consecutive
        tokens), so `dispatch_tensor()`, `combine_tensor()`, `statistics()`
        etc. can be read from it. Works on every backend for eager calls:
        `layer(x)` or `model(x)` on a model containing the layer. A call
        traced by `predict`, `fit`, `evaluate`, a jit or a functional
        model's construction has no values to hand over: it runs as usual,
        unrecorded, and the block then ends with a `RuntimeError`. Blocks
        may nest; each records every call.

        Yields:
            list, to which each call appends its `Routing`.

        Raises:
            RuntimeError: at the end of the block, if a traced call of the
                layer ran inside it.

        Example:

        ```python
        with moe.capture_routing() as routings:
            model(images, training=False)
        routing = routings[-1]
        ```
        """
        capture = _RoutingCapture()
        self._routing_captures += (capture,)
        try:
            yield capture.routings
        finally:
            self._routing_captures = tuple(
                c for c in self._routing_captures if c is not capture
            )
        # Raised after the block, not inside the traced call: an error
        # inside `predict` or `fit` could leave the model's state unsynced.
        if capture.traced_calls:
            raise RuntimeError(
                f"MoE layer {self.name!r}: {capture.traced_calls} traced call(s) "
                "(`predict`, `fit`, `evaluate`, a jit or a functional model's "
                "construction) ran inside `capture_routing()` and could not be "
                "recorded; it records eager calls only. Call the model directly "
                "(`model(x)`) inside the block."
            )

    def _record_routing(self, routing, groups):
        traced = backend.is_traced(groups)
        for capture in self._routing_captures:
            if traced:
                capture.traced_calls += 1
            else:
                capture.routings.append(routing)

    def _group_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "MoE inputs must have shape (batch, tokens, dim), got shape "
                f"{tuple(input_shape)}."
            )
        return (None, self.group_size, input_shape[-1])

    def split_groups(self, x):
        """The routing groups of `x` `(B, T, d)`: whole groups, then a partial one.

        The `N = B * T` tokens, in order, cut into `G = N // S` whole groups
        `(G, S, d)` and, when `S` does not divide `N`, a partial last group
        `(1, N - G * S, d)` of the remaining tokens. Needs the number of
        tokens when called (eager calls, JAX, torch); under a `tf.function`
        that leaves the batch unknown, `call` routes the partial group itself.

        Returns:
            list of one or two `(groups, group_size, d)` tensors.

        Example:
        >>> import numpy as np
        >>> from keras_vmoe.layers import MlpExperts
        >>> from keras_vmoe.routers import SoftRouter
        >>> moe = MoE(SoftRouter(num_experts=2), MlpExperts(num_experts=2,
        ...           hidden_dim=4), group_size=6)
        >>> [tuple(g.shape) for g in moe.split_groups(np.zeros((5, 3, 8)))]
        [(2, 6, 8), (1, 3, 8)]
        """
        dim = ops.shape(x)[-1]
        flat = ops.reshape(x, (-1, dim))  # (N, d)
        num_tokens = ops.shape(flat)[0]
        if not isinstance(num_tokens, int):
            raise ValueError(
                "`split_groups` needs the number of tokens; got a tensor whose "
                "batch size is unknown until it runs."
            )
        whole = num_tokens - num_tokens % self.group_size
        groups = []
        if whole:
            groups.append(ops.reshape(flat[:whole], (-1, self.group_size, dim)))
        if whole < num_tokens:
            groups.append(ops.reshape(flat[whole:], (1, num_tokens - whole, dim)))
        return groups

    def _partial_group_sizes(self, tokens_per_example):
        """Sizes a partial last group can have, for `tokens_per_example` tokens.

        With `T` tokens per example, `N = B * T` leaves `(B * T) % S`
        tokens over; these take `S / gcd(S, T) - 1` non-zero values. None
        when `T` is unknown or there are more than `MAX_TRACED_PARTIAL_SIZES`.
        """
        if not isinstance(tokens_per_example, int):
            return None
        s = self.group_size
        period = s // math.gcd(s, tokens_per_example)
        if period - 1 > MAX_TRACED_PARTIAL_SIZES:
            return None
        return sorted({b * tokens_per_example % s for b in range(1, period)})

    def build(self, input_shape):
        group_shape = self._group_shape(input_shape)
        self._expert_mesh()  # checks E against the mesh before weights exist
        if not self.router.built:
            self.router.build(group_shape)
        if not self.experts.built:
            # (E, G, C, d); C depends on training vs evaluation capacity.
            self.experts.build((self.experts.num_experts, None, None, group_shape[-1]))
        for name in STATISTICS:
            setattr(
                self,
                name,
                self.add_weight(
                    name=name,
                    shape=(),
                    initializer="zeros",
                    trainable=False,
                ),
            )

    def route(self, x, training=False):
        """The `Routing` of `x` `(B, T, d)`, with the groups it was computed on.

        For inputs that form whole groups only, or a single partial group
        (`B * T < S`); otherwise route each of `split_groups(x)` with
        `self.router`.
        """
        groups = self.split_groups(x)
        if len(groups) > 1:
            raise ValueError(
                f"The {ops.shape(x)[0] * ops.shape(x)[1]} tokens form "
                f"{ops.shape(groups[0])[0]} whole groups of {self.group_size} and "
                f"a partial group of {ops.shape(groups[1])[1]}; route each of "
                "`moe.split_groups(x)` with `moe.router`."
            )
        return self.router(groups[0], training=training), groups[0]

    def call(self, x, training=False):
        self._group_shape(x.shape)
        _, tokens, dim = ops.shape(x)
        flat = ops.reshape(x, (-1, dim))  # (N, d)
        if isinstance(ops.shape(flat)[0], int):
            outputs, parts = self._call_on_known_groups(flat, training)
        else:
            outputs, parts = self._call_on_traced_groups(flat, tokens, training)
        loss = _mean_auxiliary_loss(parts)
        if loss is not None:
            self.add_loss(loss)
        if self._updates_statistics(training):
            stats = _combine_statistics(parts, self.experts.num_experts)
            for name in STATISTICS:
                variable = getattr(self, name)
                variable.assign(ops.cast(stats[name], variable.dtype))
        return ops.reshape(ops.cast(outputs, x.dtype), ops.shape(x))

    def _call_on_known_groups(self, flat, training):
        """Outputs `(N, d)` and per-part `(loss sum, statistics, groups)`."""
        outputs, parts = [], []
        for groups in self.split_groups(flat[None]):
            out, routing = self._run_groups(groups, training)
            if self._routing_captures:
                self._record_routing(routing, groups)
            outputs.append(ops.reshape(out, (-1, ops.shape(flat)[1])))
            parts.append(_Part.of(routing, ops.shape(groups)[0]))
        if len(outputs) == 1:
            return outputs[0], parts
        return ops.concatenate(outputs, axis=0), parts

    def _call_on_traced_groups(self, flat, tokens_per_example, training):
        """`_call_on_known_groups` for a traced call with an unknown batch size.

        Under a `tf.function` (TensorFlow's `fit` and `predict` trace with
        the batch size unknown) the whole groups are routed as usual and
        the partial last group, whose size is one of the few values that
        `_partial_group_sizes` lists, by a switch with one branch per size,
        each routing a group of that (static) size. Each branch returns its
        output padded to `S` tokens, cut back to the real tokens after.
        """
        s, dim = self.group_size, ops.shape(flat)[1]
        sizes = self._partial_group_sizes(tokens_per_example)
        if not sizes:
            # No partial group can occur (S divides T), or T is unknown or
            # gives too many sizes: then the tokens must fill whole groups.
            groups = ops.reshape(flat, (-1, s, dim))  # (G, S, d)
            out, routing = self._run_groups(groups, training)
            if self._routing_captures:
                self._record_routing(routing, groups)
            return ops.reshape(out, (-1, dim)), [
                _Part.of(routing, ops.shape(groups)[0])
            ]
        num_tokens = ops.shape(flat)[0]
        num_whole = num_tokens // s
        whole = ops.reshape(flat[: num_whole * s], (-1, s, dim))  # (G, S, d)
        out, routing = self._run_groups(whole, training)
        if self._routing_captures:
            self._record_routing(routing, whole)
        whole_part = _Part.of(routing, num_whole)
        rest = num_tokens - num_whole * s  # tokens of the partial group
        padded = ops.concatenate([flat, ops.zeros((s, dim), flat.dtype)], axis=0)
        tail = ops.slice(padded, (num_whole * s, 0), (s, dim))  # (S, d)
        num_experts = self.experts.num_experts

        def no_partial_group(tail):
            zero = ops.zeros((), "float32")
            load = ops.zeros((num_experts,), "float32")
            return ops.zeros_like(tail), zero, (zero, zero, load, zero)

        def partial_group_of(size):
            def branch(tail):
                group = ops.reshape(tail[:size], (1, size, dim))  # (1, R, d)
                out, routing = self._run_groups(group, training)
                out = ops.reshape(out, (size, dim))
                out = ops.pad(out, ((0, s - size), (0, 0)))  # (S, d)
                part = _Part.of(routing, 1)
                loss = ops.zeros((), "float32") if part.loss is None else part.loss
                return out, loss, tuple(part.statistics[k] for k in _PART_STATISTICS)

            return branch

        branches = [no_partial_group] + [partial_group_of(r) for r in sizes]
        # Branch 0 when `rest` is 0, else 1 + the index of `rest` in `sizes`.
        index = ops.sum(
            ops.cast(ops.equal(rest, ops.array(sizes, "int32")), "int32")
            * ops.arange(1, len(sizes) + 1, dtype="int32")
        )
        tail_out, tail_loss, tail_stats = ops.switch(index, branches, tail)
        has_tail = ops.cast(rest > 0, "int32")
        tail_part = _Part(
            loss=None if whole_part.loss is None else tail_loss,
            mean_loss=None if whole_part.loss is None else tail_loss,
            statistics=dict(zip(_PART_STATISTICS, tail_stats)),
            num_groups=has_tail,
            num_tokens=rest,
        )
        outputs = ops.concatenate([ops.reshape(out, (-1, dim)), tail_out[:rest]], 0)
        return outputs, [whole_part, tail_part]

    def _run_groups(self, groups, training):
        """Routes `(G, S, d)` groups and runs the experts: `(G, S, d)`, routing."""
        routing = self.router(groups, training=training)
        dispatched = self._round_to_bfloat16(groups)
        if self.use_einsum_dispatch:
            expert_inputs = routing.einsum_dispatch(dispatched)  # (E, G, C, d)
        else:
            expert_inputs = routing.dispatch(dispatched)  # (E, G, C, d)
        expert_inputs = self._shard_on_experts(expert_inputs)
        expert_outputs = self.experts(expert_inputs, training=training)
        expert_outputs = self._shard_on_experts(expert_outputs)
        expert_outputs = self._round_to_bfloat16(expert_outputs)
        if self.use_einsum_dispatch:
            outputs = routing.einsum_combine(expert_outputs)  # (G, S, d)
        else:
            outputs = routing.combine(expert_outputs)  # (G, S, d)
        return self._poison_non_finite_groups(groups, outputs), routing

    def _round_to_bfloat16(self, x):
        """`x` rounded to bfloat16 and back, with `bfloat16_dispatch`."""
        if not self.bfloat16_dispatch:
            return x
        return ops.cast(ops.cast(x, "bfloat16"), x.dtype)

    def _expert_mesh(self):
        """`(distribution, axis sizes)` when the experts are sharded, else None.

        Raises a clear error when the expert axis does not divide the number
        of experts (rather than the backend's error about array tiling).
        """
        if self.expert_axis is None or keras.backend.backend() != "jax":
            return None
        distribution = keras.distribution.distribution()
        if distribution is None:
            return None
        mesh = distribution.device_mesh
        sizes = dict(zip(mesh.axis_names, mesh.shape))
        if self.expert_axis not in sizes:
            return None
        num_experts = self.experts.num_experts
        if num_experts % sizes[self.expert_axis]:
            raise ValueError(
                f"Layer {self.path!r}: {num_experts} experts cannot be sharded on "
                f"mesh axis {self.expert_axis!r} of size "
                f"{sizes[self.expert_axis]}; the axis size must divide the "
                "number of experts (change `num_experts` or the device mesh)."
            )
        return distribution, sizes

    def _shard_on_experts(self, x):
        """Constrains an expert-major `(E, G, ...)` tensor to the expert axis."""
        expert_mesh = self._expert_mesh()
        if expert_mesh is None:
            return x
        distribution, sizes = expert_mesh
        axes = [self.expert_axis] + [None] * (len(x.shape) - 1)
        batch_axis = distribution.batch_dim_name
        num_groups = x.shape[1]
        if (
            batch_axis in sizes
            and batch_axis != self.expert_axis
            and isinstance(num_groups, int)
            and num_groups % sizes[batch_axis] == 0
        ):
            axes[1] = batch_axis
        layout = keras.distribution.TensorLayout(axes, distribution.device_mesh)
        return keras.distribution.distribute_tensor(x, layout)

    @staticmethod
    def _poison_non_finite_groups(groups, outputs):
        # A NaN or Inf token gets arbitrary scores and could take the slots
        # of healthy tokens in its group. Rather than return a silently wrong
        # routing, every token of such a group gets NaN.
        finite = ops.all(ops.isfinite(groups), axis=(1, 2))  # (G,)
        nan = ops.cast(float("nan"), outputs.dtype)
        return ops.where(finite[:, None, None], outputs, nan)

    def routing_statistics(self):
        """The latest tracked routing statistics as Python floats.

        With the default `track_statistics="training"`, those of the latest
        training call (zeros before any).
        """
        return {
            name: float(ops.convert_to_numpy(getattr(self, name)))
            for name in STATISTICS
        }

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "router": keras.layers.serialize(self.router),
                "experts": keras.layers.serialize(self.experts),
                "group_size": self.group_size,
                "use_einsum_dispatch": self.use_einsum_dispatch,
                "expert_axis": self.expert_axis,
                "track_statistics": self.track_statistics,
                "bfloat16_dispatch": self.bfloat16_dispatch,
            }
        )
        return config


# Routing statistics that the parts of a call (whole groups, a partial
# group) combine into the call's statistics.
_PART_STATISTICS = (
    "fraction_tokens_dropped",
    "experts_per_token",
    "expert_load",
    "auxiliary_loss",
)
# A partial last group under a traced call can take at most this many sizes
# (one switch branch each); see `MoE._partial_group_sizes`.
MAX_TRACED_PARTIAL_SIZES = 32


@dataclasses.dataclass
class _Part:
    """What a call keeps of the routing of one part of its groups.

    `loss`: the auxiliary losses summed over the part's groups, or None;
    `mean_loss`: their mean (None likewise); `statistics`: the routing's `statistics()`; `num_groups` and
    `num_tokens`: ints, or int tensors under a traced call.
    """

    loss: object
    mean_loss: object
    statistics: dict
    num_groups: object
    num_tokens: object

    @classmethod
    def of(cls, routing, num_groups):
        loss = mean_loss = routing.auxiliary_loss
        if loss is not None:
            loss = ops.sum(ops.cast(routing.auxiliary_loss, "float32"))
            mean_loss = ops.mean(routing.auxiliary_loss)
        return cls(
            loss=loss,
            mean_loss=mean_loss,
            statistics=routing.statistics(),
            num_groups=num_groups,
            num_tokens=num_groups * routing.num_tokens,
        )


def _mean_auxiliary_loss(parts):
    """Mean over all groups of the call of the auxiliary loss, or None."""
    if parts[0].loss is None:
        return None
    if len(parts) == 1:
        return parts[0].mean_loss
    total = sum(part.loss for part in parts)
    groups = sum(ops.cast(part.num_groups, "float32") for part in parts)
    return total / ops.maximum(groups, 1.0)


def _weighted_mean(values, weights):
    """`sum(w * v) / sum(w)`; parts of weight 0 count nothing (not even NaN)."""
    total, weight_sum = 0.0, 0.0
    for value, weight in zip(values, weights):
        weight = ops.cast(weight, "float32")
        total = total + ops.where(weight > 0, value * weight, ops.zeros_like(value))
        weight_sum = weight_sum + weight
    return total / ops.maximum(weight_sum, 1.0)


def _combine_statistics(parts, num_experts):
    """The statistics of a call's groups from those of its parts.

    Per token (dropped, experts per token): weighted by the parts' tokens;
    per group (expert load, auxiliary loss): by their groups.
    """
    if len(parts) == 1:
        return parts[0].statistics
    tokens = [part.num_tokens for part in parts]
    groups = [part.num_groups for part in parts]
    stats = {}
    for name, weights in (
        ("fraction_tokens_dropped", tokens),
        ("experts_per_token", tokens),
        ("expert_load", groups),
        ("auxiliary_loss", groups),
    ):
        values = [ops.cast(part.statistics[name], "float32") for part in parts]
        stats[name] = _weighted_mean(values, weights)
    stats["load_imbalance"] = ops.max(stats["expert_load"]) * num_experts
    return stats
