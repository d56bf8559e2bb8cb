"""`VisionMoEBackbone`: a ViT whose MLP blocks may be Mixtures of Experts."""

import keras
from keras_hub.models import Backbone

from keras_vmoe.models.vision_moe import vit_layers
from keras_vmoe.utils.atomic import AtomicPresetSave
from keras_vmoe.models.vision_moe.config import (
    check_backbone_arguments,
    parse_moe_layers,  # noqa: F401 (re-exported: models.vmoe_backbone API)
)
from keras_vmoe.models.vision_moe.encoder_block import EncoderBlock


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionMoEBackbone(AtomicPresetSave, Backbone):
    """Vision Transformer with Mixture-of-Experts MLP blocks (V-MoE).

    The V-MoE of Riquelme et al. 2021 ("Scaling Vision with Sparse Mixture
    of Experts", https://arxiv.org/abs/2106.05974) and its routers as
    compared in Liu et al. 2024 ("Routers in Vision Mixture of Experts",
    https://arxiv.org/abs/2401.15969). With `router=None` it is a dense ViT.

    Images `(B, H, W, C)` are cut into patches by a strided convolution,
    optionally prefixed with a class token, given a learned position
    embedding, and passed through `num_layers` pre-norm encoder blocks
    (`encoder_block_{i}`, `i` from 0); the blocks listed by `moe_layers`
    replace their MLP with an MoE layer (`encoder_block_{i}/moe`, with
    sublayers `router` and `experts`). A final LayerNorm (`encoder_norm`)
    and a pooling (`pooling`) follow.

    The backbone outputs a dict, like keras-hub text backbones:
    `"sequence_output"`: the normalised tokens `(B, T, hidden_dim)`, and
    `"pooled_output"`: one vector per image `(B, hidden_dim)` (class token
    or average of the patch tokens).

    MoE layers route tokens in groups of `group_size` images
    (`group_size * T` tokens): the batch size must be a multiple of
    `group_size`. Each MoE layer adds its router's auxiliary loss with
    `add_loss`, so `fit()` minimises it together with the task loss.

    Args:
        image_shape: tuple of 3 ints. `(height, width, channels)`; height and
            width must be multiples of the patch size. Defaults to
            `(224, 224, 3)`.
        patch_size: int or (int, int). Patch size. Defaults to `16`.
        num_layers: int. Number of encoder blocks. Defaults to `12`.
        num_heads: int. Attention heads. Defaults to `12`.
        hidden_dim: int. Token dimension `d`. Defaults to `768`.
        mlp_dim: int. Hidden size of the dense MLPs. Defaults to `3072`.
        moe_layers: list of int, str or None. Which blocks are MoE; see
            `parse_moe_layers` ("every:2", "last_odd:2", "last:6", ...).
            Defaults to `None`: "every:2" when a router is given, else none.
        router: str or None. Router name (`keras_vmoe.routers.ROUTER_NAMES`)
            or `None` for a dense ViT. Defaults to `None`.
        router_config: dict or None. Extra router keyword arguments, e.g.
            `{"num_selected_experts": 2, "capacity_factor": 1.05}`.
            Defaults to `None`.
        num_experts: int or None. Experts per MoE layer; required with a
            router. Defaults to `None`.
        expert_hidden_dim: int or None. Hidden size of each expert MLP.
            Defaults to `None` (= `mlp_dim`).
        group_size: int. Images per routing group (converted to
            `group_size * sequence_length` tokens). Defaults to `8`.
        identical_expert_init: bool. Initialise all experts of a layer with
            the same weights, as the reference does. Defaults to `False`.
        use_class_token: bool. Prepend a learned class token. Defaults to
            `True`.
        pooling: str. `"token"` (class token) or `"gap"` (average of patch
            tokens). Defaults to `"token"`.
        dropout_rate: float. Dropout after the embedding, after attention
            and in the dense MLPs. Defaults to `0.0`.
        attention_dropout: float. Dropout on attention weights. Defaults to
            `0.0`.
        expert_dropout_rate: float or None. Dropout inside the experts.
            Defaults to `None` (= `dropout_rate`).
        layer_norm_epsilon: float. Defaults to `1e-6`.
        dtype: str or `keras.DTypePolicy`. Defaults to `None` (global policy).
        **kwargs: `keras_hub.models.Backbone` arguments (`name`, ...).

    Example:
    >>> import numpy as np
    >>> backbone = VisionMoEBackbone(
    ...     image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2,
    ...     hidden_dim=16, mlp_dim=32, router=None)
    >>> out = backbone(np.zeros((2, 16, 16, 3), "float32"))
    >>> tuple(out["sequence_output"].shape), tuple(out["pooled_output"].shape)
    ((2, 17, 16), (2, 16))
    """

    def __init__(
        self,
        image_shape=(224, 224, 3),
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        moe_layers=None,
        router=None,
        router_config=None,
        num_experts=None,
        expert_hidden_dim=None,
        group_size=8,
        identical_expert_init=False,
        use_class_token=True,
        pooling="token",
        dropout_rate=0.0,
        attention_dropout=0.0,
        expert_dropout_rate=None,
        layer_norm_epsilon=1e-6,
        dtype=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "vision_moe_backbone")
        # === Validation (backbone_config.py) ===
        layout = check_backbone_arguments(
            image_shape=image_shape,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
            moe_layers=moe_layers,
            router=router,
            router_config=router_config,
            num_experts=num_experts,
            expert_hidden_dim=expert_hidden_dim,
            group_size=group_size,
            use_class_token=use_class_token,
            pooling=pooling,
            dropout_rate=dropout_rate,
            attention_dropout=attention_dropout,
            expert_dropout_rate=expert_dropout_rate,
            layer_norm_epsilon=layer_norm_epsilon,
        )
        image_shape = layout.image_shape
        moe_indices, seq_len = layout.moe_layer_indices, layout.sequence_length

        # === Functional model ===
        images = keras.layers.Input(shape=image_shape, name="images")
        x = vit_layers.PatchEmbedding(
            hidden_dim, patch_size, dtype=dtype, name="patch_embedding"
        )(images)
        if use_class_token:
            x = vit_layers.ClassToken(dtype=dtype, name="class_token")(x)
        x = vit_layers.PositionEmbedding(dtype=dtype, name="position_embedding")(x)
        x = keras.layers.Dropout(dropout_rate, dtype=dtype, name="embedding_dropout")(x)
        for i in range(num_layers):
            moe_config = None
            if i in moe_indices:
                moe_config = {
                    "router": router,
                    "router_config": dict(router_config or {}),
                    "num_experts": int(num_experts),
                    "expert_hidden_dim": int(expert_hidden_dim or mlp_dim),
                    "group_size": int(group_size) * seq_len,
                    "dropout_rate": float(
                        dropout_rate
                        if expert_dropout_rate is None
                        else expert_dropout_rate
                    ),
                    "identical_init": bool(identical_expert_init),
                }
            x = EncoderBlock(
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                dropout_rate=dropout_rate,
                attention_dropout=attention_dropout,
                layer_norm_epsilon=layer_norm_epsilon,
                moe_config=moe_config,
                dtype=dtype,
                name=f"encoder_block_{i}",
            )(x)
        sequence_output = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="encoder_norm"
        )(x)
        pooled_output = vit_layers.SequencePooling(
            pooling, use_class_token=use_class_token, dtype=dtype, name="pooling"
        )(sequence_output)
        super().__init__(
            inputs=images,
            outputs={
                "sequence_output": sequence_output,
                "pooled_output": pooled_output,
            },
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.moe_layers = moe_layers
        self.router = router
        self.router_config = None if router_config is None else dict(router_config)
        self.num_experts = num_experts
        self.expert_hidden_dim = expert_hidden_dim
        self.group_size = group_size
        self.identical_expert_init = identical_expert_init
        self.use_class_token = use_class_token
        self.pooling = pooling
        self.dropout_rate = dropout_rate
        self.attention_dropout = attention_dropout
        self.expert_dropout_rate = expert_dropout_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        # Derived (not config).
        self.moe_layer_indices = moe_indices
        self.sequence_length = seq_len

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "patch_size": self.patch_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "mlp_dim": self.mlp_dim,
                "moe_layers": self.moe_layers,
                "router": self.router,
                "router_config": self.router_config,
                "num_experts": self.num_experts,
                "expert_hidden_dim": self.expert_hidden_dim,
                "group_size": self.group_size,
                "identical_expert_init": self.identical_expert_init,
                "use_class_token": self.use_class_token,
                "pooling": self.pooling,
                "dropout_rate": self.dropout_rate,
                "attention_dropout": self.attention_dropout,
                "expert_dropout_rate": self.expert_dropout_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from a built-in preset name or a preset folder.

        Unlike keras-hub's loader, architecture presets (`metadata.json`
        says `"weights": null`, as for every built-in preset) load with
        random weights, and constructor arguments can be overridden
        (`image_size=`, `router=`, `num_experts=`, `num_layers=`, ...). A
        preset with weights (`model.weights.h5` or the sharded
        `model.weights.json`) must have its weights files.

        Args:
            preset: str. A name from `keras_vmoe.models.list_presets()` or a
                local preset directory.
            load_weights: bool. Load the saved weights; `False` builds
                with random weights. Defaults to `True`.
            **kwargs: Backbone constructor overrides; `image_size` (int or
                (h, w)) sets the height and width of `image_shape`.

        Example:
        >>> backbone = VisionMoEBackbone.from_preset(
        ...     "vmoe_softmax_tc_s32_e32_224", image_size=32, num_layers=2,
        ...     hidden_dim=16, mlp_dim=32, num_heads=2, num_experts=4)
        >>> backbone.moe_layer_indices
        (1,)
        """
        from keras_vmoe.models import preset_loader

        return preset_loader.load_backbone(preset, load_weights=load_weights, **kwargs)

    @classmethod
    def get_layout_map(
        cls, device_mesh, data_axis="batch", expert_axis="expert", model_axis=None
    ):
        """The `keras.distribution.LayoutMap` that shards a V-MoE (JAX).

        Expert weights on `expert_axis`, attention and dense MLP kernels on
        `model_axis` (if given), everything else replicated. Delegates to
        `keras_vmoe.distribution.get_layout_map`; check the result on a
        built model with `keras_vmoe.distribution.validate_layouts`.

        Args:
            device_mesh: `keras.distribution.DeviceMesh`.
            data_axis: str. Mesh axis of the batch. Defaults to `"batch"`.
            expert_axis: str or None. Mesh axis of the experts. Defaults to
                `"expert"`.
            model_axis: str or None. Mesh axis for tensor parallelism.
                Defaults to `None`.

        Example:
        >>> mesh = keras.distribution.DeviceMesh(
        ...     shape=(1, 1), axis_names=("batch", "expert"), devices=["cpu:0"])
        >>> layout_map = VisionMoEBackbone.get_layout_map(mesh)
        >>> layout_map["encoder_block_1/moe/experts/output_kernel"].axes
        ('expert', None, None)
        """
        from keras_vmoe.distribution import get_layout_map

        return get_layout_map(
            device_mesh,
            data_axis=data_axis,
            expert_axis=expert_axis,
            model_axis=model_axis,
        )
