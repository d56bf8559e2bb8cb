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

    Dtype policies: the layer computes in its policy's compute dtype and
    keeps its weights in the variable dtype (float32 weights and bfloat16
    matmuls under `"mixed_bfloat16"`).

    Quantization: `quantize("int8")` (which `model.quantize("int8")` calls,
    the layer having no sublayers) replaces both kernels by int8 kernels with
    one float scale per expert and output unit,
    `intermediate_kernel_scale (E, h)` and `output_kernel_scale (E, d)`
    (abs-max over the input axis, as `keras.layers.Dense`), and quantizes
    the inputs of each matmul per row (abs-max over the last axis) unless
    the quantization config says otherwise. The biases stay in float. A
    layer built under an `"int8_from_..."` policy (for instance from a
    `keras.dtype_policies.DTypePolicyMap` in a saved config) builds the int8
    variables directly, so quantized models save and load. Other modes
    raise `NotImplementedError` (`model.quantize` then warns and leaves the
    experts in float).

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
        # Dropout through a seed generator rather than a Dropout sublayer:
        # `Model.quantize` only reaches layers without sublayers.
        self.dropout_seed_generator = keras.random.SeedGenerator(seed)
        self.quantization_config = None

    def build(self, input_shape):
        if len(input_shape) < 3 or input_shape[0] != self.num_experts:
            raise ValueError(
                "MlpExperts expects inputs (num_experts, ..., dim) with "
                f"num_experts={self.num_experts}, got shape {tuple(input_shape)}."
            )
        e, d, h = self.num_experts, input_shape[-1], self.hidden_dim
        mode = self.quantization_mode
        if mode is not None:
            self.quantized_build(input_shape, mode)
        else:
            kernel_init = ExpertGlorotUniform(
                identical=self.identical_init, seed=self.seed
            )
            self.intermediate_kernel = self.add_weight(
                name="intermediate_kernel", shape=(e, d, h), initializer=kernel_init
            )
        self.intermediate_bias = self.add_weight(
            name="intermediate_bias", shape=(e, h), initializer="zeros"
        )
        if mode is None:
            self.output_kernel = self.add_weight(
                name="output_kernel", shape=(e, h, d), initializer=kernel_init
            )
        self.output_bias = self.add_weight(
            name="output_bias", shape=(e, d), initializer="zeros"
        )

    def _dropout(self, x, training):
        if not training or self.dropout_rate == 0:
            return x
        return keras.random.dropout(
            x, self.dropout_rate, seed=self.dropout_seed_generator
        )

    def call(self, x, training=False):
        shape = ops.shape(x)
        dtype = x.dtype
        x = ops.reshape(x, (self.num_experts, -1, shape[-1]))  # (E, M, d)
        h = ops.matmul(x, ops.cast(self.intermediate_kernel, dtype))  # (E, M, h)
        h = self.activation(h + ops.cast(self.intermediate_bias, dtype)[:, None, :])
        h = self._dropout(h, training)
        y = ops.matmul(h, ops.cast(self.output_kernel, dtype))  # (E, M, d)
        y = y + ops.cast(self.output_bias, dtype)[:, None, :]
        y = self._dropout(y, training)
        return ops.reshape(y, shape)

    # === int8 quantization (the scheme of keras.layers.Dense, per expert) ===

    # Saved variables by quantization mode, in the order they are saved.
    _SAVED_VARIABLES = {
        None: (
            "intermediate_kernel",
            "intermediate_bias",
            "output_kernel",
            "output_bias",
        ),
        "int8": (
            "intermediate_kernel",
            "intermediate_bias",
            "output_kernel",
            "output_bias",
            "intermediate_kernel_scale",
            "output_kernel_scale",
        ),
    }

    def quantized_build(self, input_shape, mode, config=None):
        if mode != "int8":
            raise self._quantization_mode_error(mode)
        self._int8_build(input_shape[-1], config)
        self._is_quantized = True

    def _int8_build(self, dim, config=None):
        e, h = self.num_experts, self.hidden_dim
        config = config or self.quantization_config
        self.inputs_quantizer = (
            keras.quantizers.QuantizationConfig.activation_quantizer_or_default(
                config, keras.quantizers.AbsMaxQuantizer()
            )
        )
        for name, shape, units in (
            ("intermediate_kernel", (e, dim, h), h),
            ("output_kernel", (e, h, dim), dim),
        ):
            kernel = self.add_weight(
                name=name,
                shape=shape,
                initializer="zeros",
                dtype="int8",
                trainable=False,
            )
            scale = self.add_weight(
                name=f"{name}_scale",
                shape=(e, units),
                initializer="ones",
                trainable=False,
            )
            setattr(self, name, kernel)
            setattr(self, f"{name}_scale", scale)

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the expert kernels; only `"int8"` is supported.

        Args:
            mode: str. `"int8"`.
            type_check: bool. Refuse subclasses (as Keras' layers do).
                Defaults to `True`.
            config: `keras.quantizers.QuantizationConfig` or None. Its
                weight quantizer (default: abs-max over the input axis) and
                activation quantizer (default: abs-max over the last axis).
        """
        if type_check and type(self) is not MlpExperts:
            raise self._not_implemented_error(self.quantize)
        if mode != "int8":
            raise self._quantization_mode_error(mode)
        self.quantization_config = config
        weight_quantizer = (
            keras.quantizers.QuantizationConfig.weight_quantizer_or_default(
                config, keras.quantizers.AbsMaxQuantizer()
            )
        )
        dim = self.intermediate_kernel.shape[1]
        quantized = {}
        for name in ("intermediate_kernel", "output_kernel"):
            # (E, in, out) -> int8 (E, in, out), scales (E, 1, out) -> (E, out)
            values, scale = weight_quantizer(getattr(self, name), axis=1, to_numpy=True)
            quantized[name] = (values, ops.squeeze(scale, axis=1))
            delattr(self, name)
        self._int8_build(dim, config)
        for name, (values, scale) in quantized.items():
            getattr(self, name).assign(values)
            getattr(self, f"{name}_scale").assign(scale)
        self._is_quantized = True
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = keras.dtype_policies.get(
                f"int8_from_{self.dtype_policy.name}"
            )

    def _int8_call(self, x, training=False):
        shape = ops.shape(x)
        dtype = self.compute_dtype
        x = ops.reshape(ops.cast(x, dtype), (self.num_experts, -1, shape[-1]))
        h = self._int8_matmul(
            x, self.intermediate_kernel, self.intermediate_kernel_scale
        )  # (E, M, h)
        h = self.activation(h + ops.cast(self.intermediate_bias, dtype)[:, None, :])
        h = self._dropout(h, training)
        y = self._int8_matmul(h, self.output_kernel, self.output_kernel_scale)
        y = y + ops.cast(self.output_bias, dtype)[:, None, :]  # (E, M, d)
        y = self._dropout(y, training)
        return ops.reshape(y, shape)

    def _int8_matmul(self, x, kernel, kernel_scale):
        """`x (E, M, in) @ dequantized kernel (E, in, out)`, in int8.

        The gradient flows to `x` only (through the dequantized kernel): the
        int8 kernel is not trainable.
        """
        dtype = self.compute_dtype

        @ops.custom_gradient
        def matmul(x, kernel, kernel_scale):
            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                # (E, in, out) float kernel = int8 kernel / scale (E, 1, out)
                float_kernel = ops.cast(kernel, dtype) / kernel_scale[:, None, :]
                x_grad = ops.matmul(upstream, ops.transpose(float_kernel, (0, 2, 1)))
                return (x_grad, None, None)

            output_scale = kernel_scale[:, None, :]  # (E, 1, out)
            if self.inputs_quantizer:
                x, x_scale = self.inputs_quantizer(x, axis=-1)  # x_scale (E, M, 1)
                output_scale = output_scale * x_scale  # (E, M, out)
            y = ops.cast(ops.matmul(x, kernel), dtype)  # (E, M, out), int32 sums
            return y / ops.cast(output_scale, dtype), grad_fn

        return matmul(
            x, ops.convert_to_tensor(kernel), ops.convert_to_tensor(kernel_scale)
        )

    def save_own_variables(self, store):
        if not self.built:
            return
        for i, name in enumerate(self._saved_variables()):
            store[str(i)] = getattr(self, name)

    def load_own_variables(self, store):
        if not self.built:
            return
        names = self._saved_variables()
        if len(store.keys()) != len(names):
            raise ValueError(
                f"Layer {self.name!r} (quantization mode "
                f"{self.quantization_mode!r}) expects {len(names)} saved "
                f"variables {list(names)}, the file has {len(store.keys())}."
            )
        for i, name in enumerate(names):
            getattr(self, name).assign(store[str(i)])

    def _saved_variables(self):
        mode = self.quantization_mode
        if mode not in self._SAVED_VARIABLES:
            raise self._quantization_mode_error(mode)
        return self._SAVED_VARIABLES[mode]

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
        if self.quantization_config is not None:
            config["quantization_config"] = keras.saving.serialize_keras_object(
                self.quantization_config
            )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        quantization_config = keras.saving.deserialize_keras_object(
            config.pop("quantization_config", None)
        )
        layer = super().from_config(config)
        layer.quantization_config = quantization_config
        return layer
