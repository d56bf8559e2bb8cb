"""`VisionMoEBackbone`: a ViT whose MLP blocks may be Mixtures of Experts."""

import difflib
import functools
import inspect

import keras
from keras import tree
from keras_hub.models import Backbone

from keras_vmoe.models import preset_loader
from keras_vmoe.models.vision_moe import layout_map, vit_layers
from keras_vmoe.models.vision_moe.config import (
    apply_preset_overrides,
    check_backbone_arguments,
)
from keras_vmoe.models.vision_moe.encoder_block import EncoderBlock
from keras_vmoe.utils.atomic import atomic_preset_save

# keras-hub `Backbone` arguments that a `get_config()` also holds.
_BASE_ARGUMENTS = frozenset({"name", "trainable", "dtype"})


@keras.saving.register_keras_serializable(package="keras_vmoe")
@atomic_preset_save
class VisionMoEBackbone(Backbone):
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
    (`group_size * T` tokens), or of `tokens_per_group` tokens. Any batch
    size works: a partial last group is routed as a batch of its own
    (`keras_vmoe.layers.MoE`; docs/routers.md, "Groups"). Each MoE layer
    adds its router's auxiliary loss with
    `add_loss`, so `fit()` minimises it together with the task loss.

    The sizes derived from the arguments (patch grid, `T`, MoE blocks,
    tokens per group, experts' hidden size) are `backbone.layout`, a
    `VisionMoELayout`; `VisionMoEBackbone.layout_from_config(config)` gives
    them without building the model.

    Dtype policies: `dtype` reaches every sublayer, the routers and
    experts of the MoE layers included; a
    `keras.dtype_policies.DTypePolicyMap` gives each its policy by path
    (e.g. `"int8_from_float32"` for `"encoder_block_1/moe/experts"`:
    keras-hub's route to a quantized model). Routers compute their routing in float32 under any policy
    (`keras_vmoe.routers.Router`). `backbone.quantize("int8")` quantizes
    the attention and MLP kernels and the expert kernels
    (`keras_vmoe.layers.MlpExperts`).

    Args:
        image_shape: tuple of 3 ints. `(height, width, channels)`, or
            `(channels, height, width)` with `data_format="channels_first"`;
            height and width must be multiples of the patch size. Defaults
            to `(224, 224, 3)`.
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
            `group_size * sequence_length` tokens). With `tokens_per_group`,
            the images whose tokens fill whole routing groups
            (`group_size * sequence_length` must be a multiple of
            `tokens_per_group`); batches that are a multiple of it hold
            whole groups only. Defaults to `8`.
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
        tokens_per_group: int or None. Tokens per routing group, counted in
            tokens rather than images, as vmoe's `group_size`: a group may
            span several images or part of one. Defaults to `None`
            (`group_size * sequence_length`).
        attention_qk_norm: bool. Layer-normalise the queries and keys of
            every head before the dot product (vmoe's `attention_qk_norm`,
            flax's `normalize_qk`). Defaults to `False`.
        mlp_activation: str. Activation of the dense MLPs and the experts:
            `"gelu"` (exact, Keras') or `"gelu_approximate"` (the tanh
            approximation, flax's `nn.gelu` and so vmoe's). Defaults to
            `"gelu"`.
        bfloat16_dispatch: bool. MoE layers round the tokens sent to the
            experts and the experts' outputs to bfloat16, as vmoe's
            `Bfloat16Dispatcher` (see `keras_vmoe.layers.MoE`). Defaults to
            `False`.
        data_format: str or None. `"channels_last"` (images
            `(B, H, W, C)`) or `"channels_first"` (`(B, C, H, W)`), as
            keras-hub's vision backbones; the weights are the same for both.
            Defaults to `None` (`keras.config.image_data_format()`).
        dtype: str, `keras.DTypePolicy` or
            `keras.dtype_policies.DTypePolicyMap`. Defaults to `None` (the
            global policy).
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
        tokens_per_group=None,
        attention_qk_norm=False,
        mlp_activation="gelu",
        bfloat16_dispatch=False,
        data_format=None,
        dtype=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "vision_moe_backbone")
        # === Validation and derived sizes (config.py) ===
        arguments = dict(
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
            identical_expert_init=identical_expert_init,
            use_class_token=use_class_token,
            pooling=pooling,
            dropout_rate=dropout_rate,
            attention_dropout=attention_dropout,
            expert_dropout_rate=expert_dropout_rate,
            layer_norm_epsilon=layer_norm_epsilon,
            tokens_per_group=tokens_per_group,
            attention_qk_norm=attention_qk_norm,
            mlp_activation=mlp_activation,
            bfloat16_dispatch=bfloat16_dispatch,
            data_format=vit_layers.standardize_data_format(data_format),
        )
        layout = check_backbone_arguments(arguments)
        if arguments["data_format"] == "channels_first":
            height, width, channels = layout.image_shape
            image_shape = (channels, height, width)
        else:
            image_shape = layout.image_shape
        arguments["image_shape"] = image_shape
        if router_config is not None:
            arguments["router_config"] = dict(router_config)

        # === Functional model ===
        images = keras.layers.Input(shape=image_shape, name="images")
        x = vit_layers.PatchEmbedding(
            hidden_dim,
            patch_size,
            data_format=arguments["data_format"],
            dtype=dtype,
            name="patch_embedding",
        )(images)
        if use_class_token:
            x = vit_layers.ClassToken(dtype=dtype, name="class_token")(x)
        x = vit_layers.PositionEmbedding(dtype=dtype, name="position_embedding")(x)
        x = keras.layers.Dropout(dropout_rate, dtype=dtype, name="embedding_dropout")(x)
        for i in range(num_layers):
            moe_config = None
            if i in layout.moe_layer_indices:
                moe_config = {
                    "router": router,
                    "router_config": dict(router_config or {}),
                    "num_experts": int(num_experts),
                    "expert_hidden_dim": layout.expert_hidden_dim,
                    "group_size": layout.tokens_per_group,
                    "dropout_rate": float(
                        dropout_rate
                        if expert_dropout_rate is None
                        else expert_dropout_rate
                    ),
                    "identical_init": bool(identical_expert_init),
                    "activation": mlp_activation,
                    "bfloat16_dispatch": bool(bfloat16_dispatch),
                }
            x = EncoderBlock(
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                dropout_rate=dropout_rate,
                attention_dropout=attention_dropout,
                layer_norm_epsilon=layer_norm_epsilon,
                moe_config=moe_config,
                attention_qk_norm=attention_qk_norm,
                mlp_activation=mlp_activation,
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
        for name, value in arguments.items():
            setattr(self, name, value)
        # Derived (not config): see `VisionMoELayout`.
        self.layout = layout
        self.moe_layer_indices = layout.moe_layer_indices
        self.sequence_length = layout.sequence_length

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in _argument_defaults()})
        return config

    def compute_output_spec(self, inputs, training=None, mask=None):
        # Keras hands concrete arrays (NumPy) to each layer's
        # `compute_output_spec` without their shapes; describe them as
        # symbolic tensors first, so that every layer gets its input shape.
        inputs = tree.map_structure(_as_symbolic, inputs)
        return super().compute_output_spec(inputs, training=training, mask=mask)

    @classmethod
    def arguments_from_config(cls, config):
        """Every constructor argument, from a config that may leave some out.

        Args:
            config: dict. Backbone constructor arguments, e.g. a
                `get_config()` (its `name`, `trainable` and `dtype` are left
                out) or a few keyword arguments.

        Returns:
            dict. Each `VisionMoEBackbone` argument, the signature's default
            where `config` has none.

        Raises:
            ValueError: `config` has a key that is no constructor argument.

        Example:
        >>> arguments = VisionMoEBackbone.arguments_from_config(
        ...     {"name": "b", "num_layers": 2})
        >>> arguments["num_layers"], arguments["patch_size"], "name" in arguments
        (2, 16, False)
        """
        defaults = _argument_defaults()
        unknown = sorted(set(config) - set(defaults) - _BASE_ARGUMENTS)
        if unknown:
            close = difflib.get_close_matches(unknown[0], defaults, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{unknown} are not VisionMoEBackbone arguments.{hint}")
        return {name: config.get(name, default) for name, default in defaults.items()}

    @classmethod
    def layout_from_config(cls, config):
        """The `VisionMoELayout` of `VisionMoEBackbone(**config)`, unbuilt.

        Args:
            config: dict. Backbone constructor arguments (defaults filled in
                as by `arguments_from_config`), e.g. a `get_config()`.

        Returns:
            `VisionMoELayout`.

        Raises:
            ValueError: an argument is invalid; the message names it.

        Example:
        >>> layout = VisionMoEBackbone.layout_from_config(dict(
        ...     image_shape=(32, 32, 3), patch_size=8, router="soft",
        ...     num_experts=4, num_layers=4, group_size=2))
        >>> layout.patch_grid, layout.moe_layer_indices, layout.tokens_per_group
        ((4, 4), (1, 3), 34)
        """
        return check_backbone_arguments(cls.arguments_from_config(config))

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
        return preset_loader.load_backbone(
            preset, load_weights=load_weights, cls=cls, **kwargs
        )

    @staticmethod
    def apply_preset_overrides(config, overrides):
        """The preset `config` with `from_preset` `overrides` applied.

        The preset loader calls it; see `config.apply_preset_overrides`
        (a new router starts from its own defaults).
        """
        return apply_preset_overrides(config, overrides)

    @classmethod
    def get_layout_map(
        cls, device_mesh, data_axis="batch", expert_axis="expert", model_axis=None
    ):
        """The `keras.distribution.LayoutMap` that shards a V-MoE (JAX).

        Expert weights on `expert_axis`, attention and dense MLP kernels on
        `model_axis` (if given), everything else replicated. Delegates to
        `layout_map.get_layout_map` (also `keras_vmoe.distribution`); check
        the result on a built model with `layout_map.validate_layouts`.

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
        return layout_map.get_layout_map(
            device_mesh,
            data_axis=data_axis,
            expert_axis=expert_axis,
            model_axis=model_axis,
        )


def _as_symbolic(x):
    """`x` as a `keras.KerasTensor` of its shape and dtype."""
    if isinstance(x, keras.KerasTensor) or not hasattr(x, "shape"):
        return x
    dtype = keras.backend.standardize_dtype(x.dtype)
    return keras.KerasTensor(tuple(x.shape), dtype=dtype)


@functools.cache
def _argument_defaults():
    """`{argument: default}` of `VisionMoEBackbone`, from its signature."""
    parameters = inspect.signature(VisionMoEBackbone.__init__).parameters
    return {
        name: p.default
        for name, p in parameters.items()
        if p.default is not inspect.Parameter.empty and name != "dtype"
    }
