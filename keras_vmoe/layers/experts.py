"""`MlpExperts`: E two-layer MLPs with stacked weights, run as one einsum."""

import math

import keras
from keras import ops

from keras_vmoe.layers.activations import get_activation, serialize_activation
from keras_vmoe.utils.checks import check_bool, check_positive_int, check_rate


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ExpertGlorotUniform(keras.initializers.Initializer):
    """Glorot-uniform for stacked expert kernels `(E, fan_in, fan_out)`.

    Keras' own Glorot initializer would count the expert axis in the fan-in;
    this one uses the fans of a single expert's kernel.

    Args:
        identical: bool. Draw one expert's kernel and copy it to all experts
            (the reference initialises all experts identically). Defaults to
            `False`.
        seed: int. Defaults to `None`.
    """

    def __init__(self, identical=False, seed=None):
        self.identical = identical
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed)

    def __call__(self, shape, dtype=None):
        num_experts, fan_in, fan_out = shape
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        draw_shape = (1, fan_in, fan_out) if self.identical else tuple(shape)
        values = keras.random.uniform(
            draw_shape, -limit, limit, dtype=dtype, seed=self._seed_generator
        )
        if self.identical:
            # tile, not broadcast_to: a broadcast view (stride 0 on torch)
            # cannot be assigned to or updated in place.
            values = ops.tile(values, (num_experts, 1, 1))
        return values

    def get_config(self):
        return {"identical": self.identical, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MlpExperts(keras.layers.Layer):
    """`E` experts, each `dense(d->h) -> gelu -> dropout -> dense(h->d)`.

    Weights are stacked: `intermediate_kernel (E, d, h)`,
    `intermediate_bias (E, h)`, `output_kernel (E, h, d)`,
    `output_bias (E, d)`. All experts run in one batched einsum over the
    expert axis, so the cost is that of the slots actually filled.

    Input `(E, ..., d)` (e.g. `(E, G, C, d)` from `Routing.dispatch`),
    output of the same shape.

    Args:
        num_experts: int. `E`.
        hidden_dim: int. `h`, the hidden width of each expert.
        activation: str or callable. A Keras activation, or
            `"gelu_approximate"` (the tanh approximation that flax, and so
            vmoe, uses; see `keras_vmoe.layers.activations`). Defaults to
            `"gelu"` (exact).
        dropout_rate: float. Dropout after the activation and on the output.
            Defaults to 0.
        identical_init: bool. Initialise all experts with the same weights.
            Defaults to `False`.
        seed: int. Initialisation seed. Defaults to `None`.
        **kwargs: base layer arguments.

    Example:
    >>> import numpy as np
    >>> experts = MlpExperts(num_experts=4, hidden_dim=32)
    >>> tuple(experts(np.zeros((4, 2, 3, 16), "float32")).shape)
    (4, 2, 3, 16)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        activation="gelu",
        dropout_rate=0.0,
        identical_init=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)
        self.activation = get_activation(activation)
        self.identical_init = check_bool("identical_init", identical_init)
        self.seed = seed
        self.dropout = keras.layers.Dropout(dropout_rate, seed=seed, name="dropout")

    def build(self, input_shape):
        if len(input_shape) < 3 or input_shape[0] != self.num_experts:
            raise ValueError(
                "MlpExperts expects inputs (num_experts, ..., dim) with "
                f"num_experts={self.num_experts}, got shape {tuple(input_shape)}."
            )
        e, d, h = self.num_experts, input_shape[-1], self.hidden_dim
        kernel_init = ExpertGlorotUniform(identical=self.identical_init, seed=self.seed)
        self.intermediate_kernel = self.add_weight(
            name="intermediate_kernel", shape=(e, d, h), initializer=kernel_init
        )
        self.intermediate_bias = self.add_weight(
            name="intermediate_bias", shape=(e, h), initializer="zeros"
        )
        self.output_kernel = self.add_weight(
            name="output_kernel", shape=(e, h, d), initializer=kernel_init
        )
        self.output_bias = self.add_weight(
            name="output_bias", shape=(e, d), initializer="zeros"
        )

    def call(self, x, training=False):
        shape = ops.shape(x)
        dtype = x.dtype
        x = ops.reshape(x, (self.num_experts, -1, shape[-1]))  # (E, M, d)
        h = ops.matmul(x, ops.cast(self.intermediate_kernel, dtype))  # (E, M, h)
        h = self.activation(h + ops.cast(self.intermediate_bias, dtype)[:, None, :])
        h = self.dropout(h, training=training)
        y = ops.matmul(h, ops.cast(self.output_kernel, dtype))  # (E, M, d)
        y = y + ops.cast(self.output_bias, dtype)[:, None, :]
        y = self.dropout(y, training=training)
        return ops.reshape(y, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "activation": serialize_activation(self.activation),
                "dropout_rate": self.dropout_rate,
                "identical_init": self.identical_init,
                "seed": self.seed,
            }
        )
        return config
