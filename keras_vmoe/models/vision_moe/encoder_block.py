"""The pre-norm Transformer encoder block, with a dense MLP or an MoE.

    x = x + Dropout(MHA(LN_1(x)))
    x = x + MLP(LN_2(x))          # or MoE(LN_2(x)) in MoE blocks

The MoE is a `keras_vmoe.layers.MoE` with sublayers `router` and `experts`,
so its weights live at `encoder_block_{i}/moe/router/...` and
`encoder_block_{i}/moe/experts/...`.
"""

import keras

from keras_vmoe.models.vision_moe.vit_layers import MlpBlock, SelfAttention

_PACKAGE = "keras_vmoe"


def make_moe(
    router,
    num_experts,
    expert_hidden_dim,
    group_size,
    router_config=None,
    dropout_rate=0.0,
    identical_init=False,
    activation="gelu",
    bfloat16_dispatch=False,
    dtype=None,
    name="moe",
):
    """Builds the MoE layer of one encoder block.

    Args:
        router: str. A router name from `keras_vmoe.routers.ROUTER_NAMES`.
        num_experts: int. Number of experts `E`.
        expert_hidden_dim: int. Hidden size of each expert MLP.
        group_size: int. Tokens per routing group.
        router_config: dict. Extra router keyword arguments.
        dropout_rate: float. Dropout inside the experts.
        identical_init: bool. Initialise all experts identically.
        activation: str. The experts' activation (`"gelu"` or
            `"gelu_approximate"`, see `MlpExperts`). Defaults to `"gelu"`.
        bfloat16_dispatch: bool. See `MoE`. Defaults to `False`.
        dtype: dtype policy of the MoE layer and its router and experts.
        name: str. Layer name. Defaults to `"moe"`.

    Returns:
        A `keras_vmoe.layers.MoE` layer with sublayers `router` and `experts`.
    """
    from keras_vmoe import layers as vmoe_layers
    from keras_vmoe.routers.registry import get_class

    router_kwargs = dict(router_config or {})
    router_kwargs["num_experts"] = num_experts
    # The router takes the model's policy (its weights in the variable
    # dtype) and computes its routing in float32 whatever it is (`Router`).
    router_layer = get_class(router)(name="router", dtype=dtype, **router_kwargs)
    experts = vmoe_layers.MlpExperts(
        num_experts=num_experts,
        hidden_dim=expert_hidden_dim,
        dropout_rate=dropout_rate,
        identical_init=identical_init,
        activation=activation,
        dtype=dtype,
        name="experts",
    )
    return vmoe_layers.MoE(
        router=router_layer,
        experts=experts,
        group_size=group_size,
        bfloat16_dispatch=bfloat16_dispatch,
        dtype=dtype,
        name=name,
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EncoderBlock(keras.layers.Layer):
    """Pre-norm Transformer encoder block with a dense MLP or an MoE.

        x = x + Dropout(MHA(LN_1(x)))
        x = x + MLP(LN_2(x))          # or MoE(LN_2(x))

    Sublayers (and so weight paths) are `ln_1`, `attention`, `ln_2` and
    either `mlp/dense_{1,2}` or `moe/{router,experts}`.

    Args:
        num_heads: int. Attention heads; must divide the model dimension.
        mlp_dim: int. Hidden size of the dense MLP.
        dropout_rate: float. Dropout after attention and in the MLP.
            Defaults to `0.0`.
        attention_dropout: float. Dropout on attention weights.
            Defaults to `0.0`.
        layer_norm_epsilon: float. Defaults to `1e-6`.
        moe_config: dict or None. If given, the MLP is replaced by
            `make_moe(**moe_config)`. Defaults to `None` (dense block).
        attention_qk_norm: bool. Layer-normalise queries and keys in the
            attention (`SelfAttention(qk_norm=True)`). Defaults to `False`.
        mlp_activation: str. Activation of the dense MLP, `"gelu"` (exact)
            or `"gelu_approximate"` (tanh, as flax and vmoe). Defaults to
            `"gelu"`.
        **kwargs: Base layer arguments.

    Example:
    >>> block = EncoderBlock(num_heads=2, mlp_dim=32, name="encoder_block_0")
    >>> tuple(block(keras.ops.ones((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout=0.0,
        layer_norm_epsilon=1e-6,
        moe_config=None,
        attention_qk_norm=False,
        mlp_activation="gelu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.moe_config = None if moe_config is None else dict(moe_config)
        self.attention_qk_norm = bool(attention_qk_norm)
        self.mlp_activation = mlp_activation
        policy = self.dtype_policy
        self.ln_1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="ln_1"
        )
        self.ln_2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="ln_2"
        )
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="dropout"
        )
        self.attention = None
        if self.moe_config is None:
            self.mlp = MlpBlock(
                self.mlp_dim,
                dropout_rate=self.dropout_rate,
                activation=mlp_activation,
                dtype=policy,
                name="mlp",
            )
        else:
            self.mlp = make_moe(dtype=policy, name="moe", **self.moe_config)

    @property
    def is_moe(self):
        return self.moe_config is not None

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim={hidden_dim} must be divisible by num_heads={self.num_heads}."
            )
        attention_kwargs = dict(
            num_heads=self.num_heads,
            key_dim=hidden_dim // self.num_heads,
            dropout=self.attention_dropout,
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="attention",
        )
        if self.attention_qk_norm:
            self.attention = SelfAttention(
                qk_norm=True,
                qk_norm_epsilon=self.layer_norm_epsilon,
                **attention_kwargs,
            )
        else:
            self.attention = keras.layers.MultiHeadAttention(**attention_kwargs)
        self.ln_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ln_2.build(input_shape)
        self.mlp.build(input_shape)

    def call(self, x, training=None):
        y = self.ln_1(x)
        y = self.attention(y, y, training=training)
        x = x + self.dropout(y, training=training)
        y = self.mlp(self.ln_2(x), training=training)
        return x + y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "dropout_rate": self.dropout_rate,
                "attention_dropout": self.attention_dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "moe_config": self.moe_config,
                "attention_qk_norm": self.attention_qk_norm,
                "mlp_activation": self.mlp_activation,
            }
        )
        return config
