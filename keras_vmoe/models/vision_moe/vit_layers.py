"""Vision Transformer building blocks used by `VisionMoEBackbone`.

An image goes through these layers in this order:

    PatchEmbedding      (B, H, W, C) -> (B, N, d)   strided conv, flattened
    ClassToken          (B, N, d)    -> (B, N+1, d) optional learned token
    PositionEmbedding   (B, T, d)    -> (B, T, d)   learned, added
    EncoderBlock x L    (B, T, d)    -> (B, T, d)   see encoder_block.py
    LayerNormalization  final norm
    SequencePooling     (B, T, d)    -> (B, d)      class token or average

Initialisers follow google-research/vmoe (`vmoe/nn/vit_moe.py` and the
`vit_jax` layers it reuses): LeCun-normal patch kernel, zero class token,
position embedding N(0, 0.02), Xavier-uniform attention and MLP kernels,
MLP biases N(0, 1e-6). The dense MLP uses Keras' exact GELU by default,
like the experts of `keras_vmoe.layers.MlpExperts`; flax's default, and so
vmoe's, is the tanh approximation (`activation="gelu_approximate"`; the two
differ by less than 1e-3). `SelfAttention` is Keras' multi-head attention
with flax's optional query/key normalisation (`qk_norm`).
"""

import keras
from keras import ops

from keras_vmoe.layers.activations import get_activation, serialize_activation

_PACKAGE = "keras_vmoe"


def standardize_data_format(data_format):
    """`"channels_last"` or `"channels_first"`; None gives Keras' setting.

    Example:
    >>> standardize_data_format("Channels_First")
    'channels_first'
    """
    if data_format is None:
        return keras.config.image_data_format()
    standardized = str(data_format).lower()
    if standardized not in ("channels_last", "channels_first"):
        raise ValueError(
            "`data_format` must be 'channels_last' or 'channels_first' (or None "
            f"for `keras.config.image_data_format()`), got {data_format!r}."
        )
    return standardized


def _pair(value, name):
    """`value` as `(int, int)`; a ValueError naming `name` unless ints >= 1."""
    pair = (value, value) if isinstance(value, int) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(
            f"`{name}` must be an int >= 1 or a pair of them, got {value!r}."
        )
    return pair


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PatchEmbedding(keras.layers.Layer):
    """Cuts an image into patches and projects each to `hidden_dim`.

    A convolution with kernel size and stride equal to the patch size, then
    a flattening of the patch grid into a sequence (row-major).

    Images may come channels-last `(B, H, W, C)` or channels-first
    `(B, C, H, W)`; the convolution runs channels-last either way (so
    channels-first works on every backend, TensorFlow's CPU kernels
    included), and its kernel `(ph, pw, C, hidden_dim)` is the same for
    both: a channels-first layer given transposed images and the same
    weights gives the same tokens.

    Args:
        hidden_dim: int. Size of each patch embedding.
        patch_size: int or (int, int). Patch height and width.
        data_format: str or None. `"channels_last"` or `"channels_first"`.
            Defaults to `None` (`keras.config.image_data_format()`).
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> layer = PatchEmbedding(hidden_dim=8, patch_size=4)
    >>> tuple(layer(keras.ops.ones((2, 16, 16, 3))).shape)
    (2, 16, 8)
    >>> layer = PatchEmbedding(hidden_dim=8, patch_size=4,
    ...                        data_format="channels_first")
    >>> tuple(layer(keras.ops.ones((2, 3, 16, 12))).shape)
    (2, 12, 8)
    """

    def __init__(self, hidden_dim, patch_size, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.patch_size = patch_size
        self.data_format = standardize_data_format(data_format)
        self.conv = keras.layers.Conv2D(
            filters=self.hidden_dim,
            kernel_size=_pair(patch_size, "patch_size"),
            strides=_pair(patch_size, "patch_size"),
            padding="valid",
            kernel_initializer="lecun_normal",
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="conv",
        )

    def _channels_last_shape(self, input_shape):
        if self.data_format == "channels_first":
            batch, channels, height, width = input_shape
            return (batch, height, width, channels)
        return tuple(input_shape)

    def build(self, input_shape):
        self.conv.build(self._channels_last_shape(input_shape))

    def call(self, images):
        if self.data_format == "channels_first":
            images = ops.transpose(images, (0, 2, 3, 1))  # (B, H, W, C)
        x = self.conv(images)  # (B, H/ph, W/pw, d)
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1] * shape[2], shape[3]))

    def compute_output_shape(self, input_shape):
        ph, pw = _pair(self.patch_size, "patch_size")
        batch, h, w, _ = self._channels_last_shape(input_shape)
        n = None if h is None or w is None else (h // ph) * (w // pw)
        return (batch, n, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size,
                "data_format": self.data_format,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassToken(keras.layers.Layer):
    """Prepends one learned token (initialised to zeros) to each sequence.

    Example:
    >>> tuple(ClassToken()(keras.ops.ones((2, 5, 8))).shape)
    (2, 6, 8)
    """

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer="zeros", name="token"
        )

    def call(self, x):
        token = ops.cast(self.token, x.dtype)
        token = ops.broadcast_to(token, (ops.shape(x)[0], 1, ops.shape(x)[-1]))
        return ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        n = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], n, input_shape[2])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding of shape `(1, T, d)`.

    Initialised from N(0, 0.02) as in BERT and V-MoE.

    Example:
    >>> tuple(PositionEmbedding()(keras.ops.ones((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def build(self, input_shape):
        if input_shape[1] is None:
            raise ValueError("PositionEmbedding needs a known sequence length.")
        self.embeddings = self.add_weight(
            shape=(1, input_shape[1], input_shape[2]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embeddings",
        )

    def call(self, x):
        return x + ops.cast(self.embeddings, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SequencePooling(keras.layers.Layer):
    """Reduces `(B, T, d)` tokens to one `(B, d)` vector per image.

    Args:
        pooling: str. `"token"`: the first (class) token; `"gap"`: the mean
            over the patch tokens (the class token, if any, is left out).
        use_class_token: bool. Whether the sequence starts with a class
            token. Defaults to `True`.
        **kwargs: Base layer arguments.

    Example:
    >>> x = keras.ops.reshape(keras.ops.arange(12, dtype="float32"), (1, 3, 4))
    >>> keras.ops.convert_to_numpy(SequencePooling("gap")(x)).tolist()
    [[6.0, 7.0, 8.0, 9.0]]
    """

    def __init__(self, pooling, use_class_token=True, **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("token", "gap"):
            raise ValueError(f"`pooling` must be 'token' or 'gap', got {pooling!r}.")
        if pooling == "token" and not use_class_token:
            raise ValueError("`pooling='token'` needs `use_class_token=True`.")
        self.pooling = pooling
        self.use_class_token = bool(use_class_token)

    def call(self, x):
        if self.pooling == "token":
            return x[:, 0]
        if self.use_class_token:
            x = x[:, 1:]
        return ops.mean(x, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(
            {"pooling": self.pooling, "use_class_token": self.use_class_token}
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SelfAttention(keras.layers.MultiHeadAttention):
    """Keras' `MultiHeadAttention`, with optional query/key normalisation.

    With `qk_norm=True`, the projected queries and keys of every head are
    layer-normalised over the head dimension (a learned scale, no bias)
    before the scaled dot product, as flax's
    `MultiHeadDotProductAttention(normalize_qk=True)` does (vmoe's
    `attention_qk_norm`; Dehghani et al. 2023, "Scaling Vision Transformers
    to 22 Billion Parameters", https://arxiv.org/abs/2302.05442). The
    scales are the weights `query_norm/gamma` and `key_norm/gamma`
    `(key_dim,)`. With `qk_norm=False` it is `MultiHeadAttention` itself.

    Args:
        num_heads: int. Attention heads.
        key_dim: int. Size of each head.
        qk_norm: bool. Normalise queries and keys. Defaults to `False`.
        qk_norm_epsilon: float. Epsilon of those LayerNorms. Defaults to
            `1e-6` (flax's).
        **kwargs: `keras.layers.MultiHeadAttention` arguments.

    Example:
    >>> layer = SelfAttention(num_heads=2, key_dim=4, qk_norm=True)
    >>> x = keras.ops.ones((2, 5, 8))
    >>> tuple(layer(x, x).shape), tuple(layer.query_norm.gamma.shape)
    ((2, 5, 8), (4,))
    """

    def __init__(
        self, num_heads, key_dim, qk_norm=False, qk_norm_epsilon=1e-6, **kwargs
    ):
        super().__init__(num_heads=num_heads, key_dim=key_dim, **kwargs)
        self.qk_norm = bool(qk_norm)
        self.qk_norm_epsilon = float(qk_norm_epsilon)
        self.query_norm = self.key_norm = None
        if self.qk_norm:
            self.query_norm, self.key_norm = (
                keras.layers.LayerNormalization(
                    epsilon=self.qk_norm_epsilon,
                    center=False,
                    dtype=self.dtype_policy,
                    name=name,
                )
                for name in ("query_norm", "key_norm")
            )

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        if self.qk_norm:
            head_shape = (None, None, self.num_heads, self.key_dim)
            self.query_norm.build(head_shape)
            self.key_norm.build(head_shape)

    def _compute_attention(self, query, key, value, *args, **kwargs):
        if self.qk_norm:  # (B, T, heads, key_dim), before the 1/sqrt(key_dim)
            query = self.query_norm(query)
            key = self.key_norm(key)
        return super()._compute_attention(query, key, value, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"qk_norm": self.qk_norm, "qk_norm_epsilon": self.qk_norm_epsilon}
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MlpBlock(keras.layers.Layer):
    """Dense ViT MLP: Dense(mlp_dim), GELU, dropout, Dense(d), dropout.

    Args:
        mlp_dim: int. Hidden size of the MLP.
        dropout_rate: float. Dropout after each Dense. Defaults to `0.0`.
        activation: str or callable. `"gelu"` (exact), `"gelu_approximate"`
            (tanh approximation, flax's and vmoe's) or another Keras
            activation. Defaults to `"gelu"`.
        **kwargs: Base layer arguments.

    Example:
    >>> tuple(MlpBlock(mlp_dim=32)(keras.ops.ones((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def __init__(self, mlp_dim, dropout_rate=0.0, activation="gelu", **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.activation = get_activation(activation)
        bias_init = keras.initializers.RandomNormal(stddev=1e-6)
        self.dense_1 = keras.layers.Dense(
            self.mlp_dim,
            activation=self.activation,
            kernel_initializer="glorot_uniform",
            bias_initializer=bias_init,
            dtype=self.dtype_policy,
            name="dense_1",
        )
        self.dense_2 = None
        self._bias_init = bias_init
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        self.dense_1.build(input_shape)
        self.dense_2 = keras.layers.Dense(
            input_shape[-1],
            kernel_initializer="glorot_uniform",
            bias_initializer=self._bias_init,
            dtype=self.dtype_policy,
            name="dense_2",
        )
        self.dense_2.build((*input_shape[:-1], self.mlp_dim))

    def call(self, x, training=None):
        x = self.dropout(self.dense_1(x), training=training)
        return self.dropout(self.dense_2(x), training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "mlp_dim": self.mlp_dim,
                "dropout_rate": self.dropout_rate,
                "activation": serialize_activation(self.activation),
            }
        )
        return config
