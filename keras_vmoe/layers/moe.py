"""`MoE`: the Mixture-of-Experts layer that replaces a transformer MLP."""

import contextlib

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
    call appends its `Routing` (see `capture_routing`).

    Args:
        router: a `keras_vmoe.routers.Router` (e.g.
            `SoftmaxTokenChoiceRouter`) or a config dict from
            `keras.layers.serialize`.
        experts: an experts layer (e.g. `MlpExperts`) or its config dict.
        group_size: int. Tokens per routing group `S`.
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
        batch, tokens, dim = input_shape
        if tokens is not None and batch is not None:
            self._check_divisible(batch * tokens)
        return (None, self.group_size, dim)

    def _check_divisible(self, num_tokens):
        if num_tokens % self.group_size:
            raise ValueError(
                f"The number of tokens per batch ({num_tokens}) must be divisible "
                f"by `group_size` ({self.group_size})."
            )

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
        """The `Routing` of `x` `(B, T, d)`, with the groups it was computed on."""
        batch, tokens, dim = ops.shape(x)
        if isinstance(batch, int) and isinstance(tokens, int):
            self._check_divisible(batch * tokens)
        groups = ops.reshape(x, (-1, self.group_size, dim))  # (G, S, d)
        return self.router(groups, training=training), groups

    def call(self, x, training=False):
        self._group_shape(x.shape)
        routing, groups = self.route(x, training)
        if self._routing_captures:
            self._record_routing(routing, groups)
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
        outputs = self._poison_non_finite_groups(groups, outputs)
        if routing.auxiliary_loss is not None:
            self.add_loss(ops.mean(routing.auxiliary_loss))
        if self._updates_statistics(training):
            stats = routing.statistics()
            for name in STATISTICS:
                variable = getattr(self, name)
                variable.assign(ops.cast(stats[name], variable.dtype))
        return ops.reshape(ops.cast(outputs, x.dtype), ops.shape(x))

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
