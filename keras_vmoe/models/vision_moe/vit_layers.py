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
MLP biases N(0, 1e-6). The dense MLP uses Keras' exact GELU, like the
experts of `keras_vmoe.layers.MlpExperts` (flax's default is the tanh
approximation; the two differ by less than 1e-3).
"""

import keras
from keras import ops

_PACKAGE = "keras_vmoe"


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

    Args:
        hidden_dim: int. Size of each patch embedding.
        patch_size: int or (int, int). Patch height and width.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> layer = PatchEmbedding(hidden_dim=8, patch_size=4)
    >>> tuple(layer(keras.ops.ones((2, 16, 16, 3))).shape)
    (2, 16, 8)
    """

    def __init__(self, hidden_dim, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.patch_size = patch_size
        self.conv = keras.layers.Conv2D(
            filters=self.hidden_dim,
            kernel_size=_pair(patch_size, "patch_size"),
            strides=_pair(patch_size, "patch_size"),
            padding="valid",
            kernel_initializer="lecun_normal",
            dtype=self.dtype_policy,
            name="conv",
        )

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, images):
        x = self.conv(images)
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1] * shape[2], shape[3]))

    def compute_output_shape(self, input_shape):
        ph, pw = _pair(self.patch_size, "patch_size")
        h, w = input_shape[1], input_shape[2]
        n = None if h is None or w is None else (h // ph) * (w // pw)
        return (input_shape[0], n, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "patch_size": self.patch_size})
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
class MlpBlock(keras.layers.Layer):
    """Dense ViT MLP: Dense(mlp_dim), GELU, dropout, Dense(d), dropout.

    Args:
        mlp_dim: int. Hidden size of the MLP.
        dropout_rate: float. Dropout after each Dense. Defaults to `0.0`.
        **kwargs: Base layer arguments.

    Example:
    >>> tuple(MlpBlock(mlp_dim=32)(keras.ops.ones((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def __init__(self, mlp_dim, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        bias_init = keras.initializers.RandomNormal(stddev=1e-6)
        self.dense_1 = keras.layers.Dense(
            self.mlp_dim,
            activation="gelu",
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

    def get_config(self):
        config = super().get_config()
        config.update({"mlp_dim": self.mlp_dim, "dropout_rate": self.dropout_rate})
        return config
