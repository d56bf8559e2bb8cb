"""Converting a google-research/vmoe checkpoint into a `VisionMoEImageClassifier`.

Two maps, both in this file:

- the **config map** (`vmoe_config_to_keras`): vmoe's model config (the
  `config.model` of its training configs: `VisionTransformerMoe` keyword
  arguments) to `VisionMoEBackbone` and `VisionMoEImageClassifier`
  arguments. Every option that the released and test configs use is mapped;
  an option that changes nothing at inference (initialisers, sharding
  hints, metrics) is accepted and recorded as ignored; any other option is
  an error that names it (`UnsupportedVmoeOption`).
- the **weight map** (`PARAMETER_RULES`): each vmoe parameter path to the
  Keras weight path. The layouts agree, so no weight is transposed.

    vmoe (flax)                                  keras_vmoe
    embedding/{kernel,bias}                      patch_embedding/conv/{kernel,bias}
    cls                                          class_token/token
    Encoder/posembed_input/pos_embedding         position_embedding/embeddings
    Encoder/encoderblock_i/LayerNorm_{0,1}       encoder_block_i/ln_{1,2}  (scale -> gamma, bias -> beta)
    .../SelfAttention/{query,key,value,out}      .../attention/{query,key,value,attention_output}
    .../SelfAttention/{query,key}_ln/scale       .../attention/{query,key}_norm/gamma
    .../Mlp/Dense_{0,1}                          .../mlp/dense_{1,2}
    .../Moe/Mlp/Dense_0/{kernel,bias}            .../moe/experts/intermediate_{kernel,bias}
    .../Moe/Mlp/Dense_1/{kernel,bias}            .../moe/experts/output_{kernel,bias}
    .../Moe/Router/dense/kernel                  .../moe/router/gating_kernel
    .../Moe/Router/{mu,scale}                    .../moe/router/{slot_embeddings,scale}
    Encoder/encoder_norm                         encoder_norm
    pre_logits, head                             pre_logits, head

vmoe's numerics that matter for matching its logits are options of the
model (not of a converter-only model): flax's tanh-approximated GELU
(`mlp_activation="gelu_approximate"`), LayerNorm epsilon 1e-6, qk-normalised
attention (`attention_qk_norm`), routing groups counted in tokens
(`tokens_per_group`), the capacity rounding (`capacity_ceil_or_round`,
`capacity_multiple_of`) and the bfloat16 rounding of its
`Bfloat16Dispatcher` (`bfloat16_dispatch`).
"""

import copy
import difflib
import json
import math
import os
import re

import numpy as np
from keras import ops

from keras_vmoe.convert.checkpoint import iter_vmoe_blocks, read_vmoe_index


class UnsupportedVmoeOption(ValueError):
    """A vmoe config option (or value) that keras_vmoe cannot reproduce."""


class CheckpointMismatch(ValueError):
    """The checkpoint's parameters disagree with the model of the config."""


# vmoe router class names (the last part of `router.name`) -> keras_vmoe router.
VMOE_ROUTERS = {
    "NoisyTopExpertsPerItemRouter": "softmax_token_choice",
    "KLProjectionNoisyTopExpertsPerItemRouter": "sinkhorn_token_choice",
    "NoisyTopItemsPerExpertRouter": "softmax_expert_choice",
    "KLProjectionNoisyTopItemsPerExpertRouter": "sinkhorn_expert_choice",
    "KSparseProjectionTransportTopItemsPerExpertRouter": (
        "sparsity_constrained_expert_choice"
    ),
    "SoftRouter": "soft",
}
_DEFAULT_ROUTER = "NoisyTopExpertsPerItemRouter"  # vmoe's MlpMoeBlock default

# (vmoe path, Keras path) templates; `{i}` is a block index.
PARAMETER_RULES = (
    ("embedding/kernel", "patch_embedding/conv/kernel"),
    ("embedding/bias", "patch_embedding/conv/bias"),
    ("cls", "class_token/token"),
    ("Encoder/posembed_input/pos_embedding", "position_embedding/embeddings"),
    ("Encoder/encoder_norm/scale", "encoder_norm/gamma"),
    ("Encoder/encoder_norm/bias", "encoder_norm/beta"),
    ("pre_logits/kernel", "pre_logits/kernel"),
    ("pre_logits/bias", "pre_logits/bias"),
    ("head/kernel", "head/kernel"),
    ("head/bias", "head/bias"),
    *(
        (f"Encoder/encoderblock_{{i}}/{v}", f"encoder_block_{{i}}/{k}")
        for v, k in (
            ("LayerNorm_0/scale", "ln_1/gamma"),
            ("LayerNorm_0/bias", "ln_1/beta"),
            ("LayerNorm_1/scale", "ln_2/gamma"),
            ("LayerNorm_1/bias", "ln_2/beta"),
            *(
                (f"SelfAttention/{name}/{w}", f"attention/{name}/{w}")
                for name in ("query", "key", "value")
                for w in ("kernel", "bias")
            ),
            ("SelfAttention/out/kernel", "attention/attention_output/kernel"),
            ("SelfAttention/out/bias", "attention/attention_output/bias"),
            ("SelfAttention/query_ln/scale", "attention/query_norm/gamma"),
            ("SelfAttention/key_ln/scale", "attention/key_norm/gamma"),
            ("Mlp/Dense_0/kernel", "mlp/dense_1/kernel"),
            ("Mlp/Dense_0/bias", "mlp/dense_1/bias"),
            ("Mlp/Dense_1/kernel", "mlp/dense_2/kernel"),
            ("Mlp/Dense_1/bias", "mlp/dense_2/bias"),
            ("Moe/Mlp/Dense_0/kernel", "moe/experts/intermediate_kernel"),
            ("Moe/Mlp/Dense_0/bias", "moe/experts/intermediate_bias"),
            ("Moe/Mlp/Dense_1/kernel", "moe/experts/output_kernel"),
            ("Moe/Mlp/Dense_1/bias", "moe/experts/output_bias"),
            ("Moe/Router/dense/kernel", "moe/router/gating_kernel"),
            ("Moe/Router/mu", "moe/router/slot_embeddings"),
            ("Moe/Router/scale", "moe/router/scale"),
        )
    ),
)


def _rule_regex(template):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_VMOE_TO_KERAS = [(_rule_regex(v), k) for v, k in PARAMETER_RULES]
_KERAS_TO_VMOE = [(_rule_regex(k), v) for v, k in PARAMETER_RULES]


def _translate(path, rules):
    for regex, template in rules:
        match = regex.fullmatch(path)
        if match:
            return template.format(**match.groupdict())
    return None


def keras_weight_path(vmoe_path):
    """The Keras weight path of a vmoe parameter path (None if unknown).

    Example:
    >>> keras_weight_path("Encoder/encoderblock_3/Moe/Mlp/Dense_0/kernel")
    'encoder_block_3/moe/experts/intermediate_kernel'
    """
    return _translate(vmoe_path, _VMOE_TO_KERAS)


def vmoe_parameter_path(keras_path):
    """The vmoe parameter path of a Keras weight path (None if unknown).

    Example:
    >>> vmoe_parameter_path("encoder_block_0/attention/attention_output/kernel")
    'Encoder/encoderblock_0/SelfAttention/out/kernel'
    """
    return _translate(keras_path, _KERAS_TO_VMOE)


# ----------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------
class _Options:
    """A vmoe config dict read key by key; leftovers are unsupported options."""

    def __init__(self, config, where):
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise UnsupportedVmoeOption(
                f"vmoe option {where or 'config'!r} must be a dict, got {config!r}."
            )
        self.config = dict(config)
        self.where = where
        self.ignored = []

    def name(self, key):
        return f"{self.where}.{key}" if self.where else key

    def pop(self, key, default=None, required=False):
        if key not in self.config:
            if required:
                raise UnsupportedVmoeOption(
                    f"The vmoe config has no {self.name(key)!r}, which the model needs."
                )
            return default
        return self.config.pop(key)

    def sub(self, key):
        return _Options(self.pop(key), self.name(key))

    def ignore(self, *keys):
        """Options without effect on the converted model (init, sharding...)."""
        for key in keys:
            if key in self.config:
                self.config.pop(key)
                self.ignored.append(self.name(key))

    def only(self, key, allowed, why):
        """An option that must keep one of the `allowed` values."""
        if key in self.config:
            value = self.config.pop(key)
            if value not in allowed:
                raise UnsupportedVmoeOption(
                    f"Unsupported vmoe option {self.name(key)}={value!r}: {why}"
                )

    def done(self):
        if self.config:
            key = sorted(self.config)[0]
            raise UnsupportedVmoeOption(
                f"Unsupported vmoe option {self.name(key)!r} (= "
                f"{self.config[key]!r}): keras_vmoe has no equivalent of it."
            )


def _int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UnsupportedVmoeOption(
            f"vmoe option {name!r} must be an int, got {value!r}."
        )
    return int(value)


def _router_name(value, where):
    if not isinstance(value, str) or "(" in value:
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe option {where}={value!r}: give a router class name."
        )
    cls = value.rsplit(".", 1)[-1]
    if cls not in VMOE_ROUTERS:
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe router {where}={value!r}. Supported: "
            f"{sorted(VMOE_ROUTERS)}."
        )
    return cls


def _dispatcher(options, token_choice):
    """Capacity, BPR and bfloat16 from `router.dispatcher`."""
    d = options.sub("dispatcher")
    kwargs = {}
    d.only(
        "name",
        ("einsum", "indices") if token_choice else ("einsum",),
        "keras_vmoe dispatches with indices or einsums alike; this dispatcher "
        "type is not one of vmoe's for this router.",
    )
    bfloat16 = d.pop("bfloat16", False)
    if not isinstance(bfloat16, bool):
        raise UnsupportedVmoeOption(
            f"vmoe option {d.name('bfloat16')!r} must be a bool."
        )
    capacity = d.pop("capacity")
    factor = d.pop("capacity_factor")
    if (capacity is None) == (factor is None):
        raise UnsupportedVmoeOption(
            f"The vmoe config must give exactly one of {d.name('capacity')!r} and "
            f"{d.name('capacity_factor')!r} (got {capacity!r} and {factor!r})."
        )
    if capacity is not None:
        kwargs["capacity"] = _int(capacity, d.name("capacity"))
    else:
        kwargs["capacity_factor"] = float(factor)
    rounding = d.pop("capacity_ceil_or_round", "ceil")
    if rounding not in ("ceil", "round"):
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe option {d.name('capacity_ceil_or_round')}={rounding!r}."
        )
    kwargs["capacity_ceil_or_round"] = rounding
    multiple = d.pop("capacity_multiple_of", 4)
    kwargs["capacity_multiple_of"] = (
        1
        if multiple is None
        else max(_int(multiple, d.name("capacity_multiple_of")), 1)
    )
    if token_choice:
        batch_priority = d.pop("batch_priority", False)
        if not isinstance(batch_priority, bool):
            raise UnsupportedVmoeOption(
                f"vmoe option {d.name('batch_priority')!r} must be a bool."
            )
        kwargs["batch_priority"] = batch_priority
    # Sharding hints and einsum precision: no effect on the values computed here.
    d.ignore("partition_spec", "einsum_precision")
    d.done()
    return kwargs, bfloat16, d.ignored


def _router(options):
    """(keras_vmoe router name, router_config, bfloat16 dispatch, ignored)."""
    cls = _router_name(options.pop("name", _DEFAULT_ROUTER), options.name("name"))
    router = VMOE_ROUTERS[cls]
    options.only("dtype", (None, "float32"), "keras_vmoe routers compute in float32.")
    options.only(
        "deterministic",
        (True,),
        "a router that adds noise at inference cannot be reproduced.",
    )
    ignored = []
    if router == "soft":
        if options.config.get("noise_std", 0.0) != 0.0:
            raise UnsupportedVmoeOption(
                f"Unsupported vmoe option {options.name('noise_std')}="
                f"{options.config['noise_std']!r}: keras_vmoe's Soft MoE router has "
                "no logit noise."
            )
        options.pop("noise_std")
        num_slots = options.pop("num_slots")
        factor = options.pop("capacity_factor", 1.0)  # vmoe's SoftRouter default
        if num_slots is not None:
            config = {"num_slots": _int(num_slots, options.name("num_slots"))}
        elif factor is not None:
            config = {"capacity_factor": float(factor)}
        else:
            raise UnsupportedVmoeOption(
                f"The vmoe config gives neither {options.name('num_slots')!r} nor "
                f"{options.name('capacity_factor')!r}."
            )
        # Initialisers, sharding, precision and metrics only.
        options.ignore(
            "compute_similarity_metrics",
            "precision",
            "partition_spec",
            "mu_init",
            "scale_init",
        )
        options.done()
        return router, config, True, options.ignored  # always Bfloat16Dispatcher

    token_choice = router in ("softmax_token_choice", "sinkhorn_token_choice")
    config, bfloat16, ignored = _dispatcher(options, token_choice)
    noise_std = float(options.pop("noise_std", 1.0))
    if router == "sparsity_constrained_expert_choice":
        noise_std = 0.0  # vmoe's k-sparse router never adds its noise
    config["noise_std"] = noise_std
    if token_choice:
        config["num_selected_experts"] = _int(
            options.pop("num_selected_experts", 1), options.name("num_selected_experts")
        )
        default = 1.0 if router == "softmax_token_choice" else 0.0
        config["importance_loss_weight"] = float(
            options.pop("importance_loss_weight", default)
        )
        config["load_loss_weight"] = float(options.pop("load_loss_weight", default))
        gshard = float(options.pop("gshard_loss_weight", 0.0))
        # vmoe's KL-projection router does not compute the GShard loss.
        config["gshard_loss_weight"] = (
            gshard if router == "softmax_token_choice" else 0.0
        )
    if cls.startswith(("KLProjection", "KSparse")):
        iterations = _int(options.pop("maxiter", 20), options.name("maxiter"))
        key = "num_steps" if cls.startswith("KSparse") else "num_iters"
        config[key] = iterations
        options.only(
            "use_softmax_combine_weights",
            (True,),
            "keras_vmoe's OT routers combine with softmax weights.",
        )
        options.only("use_lbfgs", (False,), "keras_vmoe solves with Sinkhorn only.")
        options.ignore("use_implicit_differentiation")  # gradients only
    if cls.startswith("KSparse"):
        config["learning_rate"] = float(options.pop("adam_lr", 1e-2))
    options.done()
    return router, config, bfloat16, ignored + options.ignored


def _pair(value, name):
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (_int(value[0], name), _int(value[1], name))
    return (_int(value, name),) * 2


def vmoe_config_to_keras(config, image_shape):
    """Maps vmoe's model config to keras_vmoe constructor arguments.

    Args:
        config: dict. vmoe's `config.model` (the keyword arguments of
            `vmoe.nn.models.VisionTransformerMoe`, tuples as lists), e.g.
            the fixtures' `config.json`.
        image_shape: tuple of 3 ints. The input `(height, width, channels)`
            (vmoe's config has none: the position embedding fixes it).

    Returns:
        `(backbone_kwargs, classifier_kwargs, ignored)`: the arguments of
        `VisionMoEBackbone` and of `VisionMoEImageClassifier` (without
        `backbone`), and the vmoe options accepted without effect on the
        converted model (initialisers, sharding hints, metrics).

    Raises:
        UnsupportedVmoeOption: an option keras_vmoe cannot reproduce, or a
            missing one (the message names it).

    Example:
    >>> backbone, classifier, _ = vmoe_config_to_keras(
    ...     {"num_classes": 10, "patch_size": [16, 16], "hidden_size": 64,
    ...      "classifier": "gap", "encoder": {"num_layers": 2, "mlp_dim": 128,
    ...      "num_heads": 4}}, (32, 32, 3))
    >>> backbone["router"], backbone["pooling"], backbone["mlp_activation"]
    (None, 'gap', 'gelu_approximate')
    """
    top = _Options(copy.deepcopy(config), "")
    top.only(
        "name",
        ("VisionTransformerMoe",),
        "only vmoe.nn.models.VisionTransformerMoe converts (E3 ensembles "
        "route per ensemble member, which keras_vmoe does not).",
    )
    num_classes = top.pop("num_classes", required=True)
    if not num_classes:
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe option num_classes={num_classes!r}: a model without "
            "a classification head does not convert."
        )
    classifier = top.pop("classifier", "token")
    if classifier not in ("token", "gap"):
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe option classifier={classifier!r}: keras_vmoe pools "
            "with the class token ('token') or the mean of the tokens ('gap')."
        )
    top.ignore("head_kernel_zero_init", "deterministic")  # init / eval mode
    patch = _pair(top.pop("patch_size", required=True), "patch_size")
    hidden = _int(top.pop("hidden_size", required=True), "hidden_size")
    representation_size = top.pop("representation_size")
    head_bias_init = float(top.pop("head_bias_init", 0.0))

    if not isinstance(top.config.get("encoder"), dict):
        raise UnsupportedVmoeOption("The vmoe config has no 'encoder' (a dict).")
    encoder = top.sub("encoder")
    num_layers = _int(encoder.pop("num_layers", required=True), "encoder.num_layers")
    mlp_dim = _int(encoder.pop("mlp_dim", required=True), "encoder.mlp_dim")
    num_heads = _int(encoder.pop("num_heads", required=True), "encoder.num_heads")
    dropout_rate = float(encoder.pop("dropout_rate", 0.0))
    attention_dropout = float(encoder.pop("attention_dropout_rate", 0.0))
    qk_norm = encoder.pop("attention_qk_norm", False)
    if not isinstance(qk_norm, bool):
        raise UnsupportedVmoeOption(
            "vmoe option 'encoder.attention_qk_norm' must be a bool."
        )
    position = encoder.pop("position_emb")
    if position not in (None, {}) and (
        not isinstance(position, dict) or position != {"name": "learned"}
    ):
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe option encoder.position_emb={position!r}: keras_vmoe "
            "has learned position embeddings only."
        )
    encoder.only("dtype", (None, "float32"), "keras_vmoe converts float32 models.")
    encoder.ignore("deterministic")

    backbone = dict(
        image_shape=tuple(int(s) for s in image_shape),
        patch_size=patch,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden,
        mlp_dim=mlp_dim,
        router=None,
        dropout_rate=dropout_rate,
        attention_dropout=attention_dropout,
        use_class_token=classifier == "token",
        pooling=classifier,
        layer_norm_epsilon=1e-6,  # flax's LayerNorm
        attention_qk_norm=qk_norm,
        mlp_activation="gelu_approximate",  # flax's nn.gelu
    )
    ignored = list(top.ignored) + list(encoder.ignored)

    moe = encoder.sub("moe")
    layers = moe.pop("layers", ())
    if "moe" in config.get("encoder", {}) and layers:
        backbone.update(_moe_arguments(moe, layers, backbone))
        ignored += moe.ignored
    elif moe.config:
        moe.ignore(*list(moe.config))  # an MoE config used by no block
        ignored += moe.ignored
    encoder.done()
    top.done()
    classifier_kwargs = dict(
        num_classes=_int(num_classes, "num_classes"),
        representation_size=(
            None
            if representation_size is None
            else _int(representation_size, "representation_size")
        ),
        head_bias_init=head_bias_init,
    )
    return backbone, classifier_kwargs, ignored


def _moe_arguments(moe, layers, backbone):
    """The MoE arguments of the backbone from `encoder.moe`."""
    try:
        moe_layers = sorted({_int(i, "encoder.moe.layers") for i in layers})
    except TypeError:
        raise UnsupportedVmoeOption(
            f"vmoe option 'encoder.moe.layers' must be a list of block indices, got "
            f"{layers!r}."
        ) from None
    bad = [i for i in moe_layers if not 0 <= i < backbone["num_layers"]]
    if bad:
        # vmoe's `block in layers` silently ignores such entries.
        moe_layers = [i for i in moe_layers if i not in bad]
    num_experts = _int(moe.pop("num_experts", required=True), "encoder.moe.num_experts")
    tokens = _int(moe.pop("group_size", required=True), "encoder.moe.group_size")
    expert_dropout = float(moe.pop("dropout_rate", backbone["dropout_rate"]))
    expert_hidden = moe.pop("mlp_dim")
    had_split_rngs = "split_rngs" in moe.config
    split_rngs = moe.pop("split_rngs", False)
    moe.only("dtype", (None, "float32"), "keras_vmoe converts float32 models.")
    moe.ignore("deterministic")
    router, router_config, bfloat16, ignored = _router(moe.sub("router"))
    moe.ignored += ignored
    if (
        split_rngs is not False
        and split_rngs is not True
        and not isinstance(split_rngs, (list, tuple))
    ):
        raise UnsupportedVmoeOption(
            f"vmoe option 'encoder.moe.split_rngs' must be a bool or a list, got "
            f"{split_rngs!r}."
        )
    if had_split_rngs:
        moe.ignored.append(moe.name("split_rngs"))  # initialisation only
    moe.done()
    ph, pw = backbone["patch_size"]
    height, width = backbone["image_shape"][:2]
    tokens_per_image = (height // ph) * (width // pw) + int(backbone["use_class_token"])
    return dict(
        moe_layers=moe_layers,
        router=router,
        router_config=router_config,
        num_experts=num_experts,
        expert_hidden_dim=None
        if expert_hidden is None
        else _int(expert_hidden, "encoder.moe.mlp_dim"),
        # Routing groups of `tokens` tokens; `group_size` images fill whole ones.
        tokens_per_group=tokens,
        group_size=math.lcm(tokens, tokens_per_image) // tokens_per_image,
        identical_expert_init=not split_rngs,
        expert_dropout_rate=expert_dropout,
        bfloat16_dispatch=bfloat16,
    )


def load_vmoe_config(config):
    """vmoe's model config from a dict, a JSON file or a released checkpoint name.

    Args:
        config: dict, or str: the path of a JSON file holding vmoe's
            `config.model`, or the name of a released checkpoint
            (`keras_vmoe.convert.released.RELEASED_CHECKPOINTS`).

    Returns:
        `(config dict, evaluation_overrides or None)`: the released
        checkpoints record what vmoe's evaluation changes in the config.

    Raises:
        FileNotFoundError: a `.json` path that does not exist.
        ValueError: an unknown name, or no released-checkpoint table.
    """
    if isinstance(config, dict):
        return copy.deepcopy(config), None
    if not isinstance(config, (str, os.PathLike)):
        raise ValueError(
            "`config` must be vmoe's model config (a dict), the path of a JSON "
            f"file holding it, or a released checkpoint name; got {config!r}."
        )
    path = os.fspath(config)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                loaded = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{path} does not hold a vmoe model config (a JSON object)."
            )
        return loaded, None
    if path.endswith(".json") or os.sep in path:
        raise FileNotFoundError(f"No vmoe config file {path!r}.")
    return _released_config(path)


def _released_config(name):
    try:
        from keras_vmoe.convert import released
    except ImportError:
        raise ValueError(
            f"{name!r} is not a config file, and no table of released vmoe "
            "checkpoints (keras_vmoe.convert.released) is available to look "
            "the name up; pass vmoe's model config as a dict or a JSON file."
        ) from None
    table = released.RELEASED_CHECKPOINTS
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"{name!r} is neither a config file nor a released vmoe checkpoint.{hint} "
            f"Released: {sorted(table)}."
        )
    record = table[name]
    if getattr(record, "supported", True) is False:
        raise UnsupportedVmoeOption(
            f"The released checkpoint {name!r} does not convert: "
            + " ".join(getattr(record, "notes", ()) or ("unsupported model",))
        )
    for attribute in ("vmoe_config", "config", "model_config"):
        value = getattr(record, attribute, None)
        value = value() if callable(value) else value
        if isinstance(value, dict):
            return copy.deepcopy(value), getattr(record, "evaluation_overrides", None)
    raise ValueError(f"The released checkpoint {name!r} has no recorded vmoe config.")


def _apply_evaluation_overrides(router_config, overrides):
    """vmoe's evaluation-time capacity factor as `eval_capacity_factor`."""
    if not overrides:
        return router_config
    try:
        dispatcher = overrides["encoder"]["moe"]["router"]["dispatcher"]
        (key,) = overrides["encoder"]["moe"]["router"].keys()
        (only,) = overrides["encoder"]["moe"].keys()
        (outer,) = overrides["encoder"].keys()
        assert (key, only, outer) == ("dispatcher", "router", "moe")
        assert set(dispatcher) == {"capacity_factor"} and len(overrides) == 1
    except (KeyError, TypeError, ValueError, AssertionError):
        raise UnsupportedVmoeOption(
            f"Unsupported vmoe evaluation overrides {overrides!r}: only "
            "encoder.moe.router.dispatcher.capacity_factor converts (to "
            "`eval_capacity_factor`)."
        ) from None
    return {
        **router_config,
        "eval_capacity_factor": float(dispatcher["capacity_factor"]),
    }


# ----------------------------------------------------------------------------
# The checkpoint.
# ----------------------------------------------------------------------------
def infer_image_shape(shapes, config):
    """The square input image that the checkpoint's position embedding fits.

    Args:
        shapes: dict. `{vmoe path: shape}` of the checkpoint.
        config: dict. vmoe's model config.

    Returns:
        `(height, width, channels)`.

    Raises:
        CheckpointMismatch: the checkpoint lacks the embeddings, or its
            patch count is not a square.
    """
    for needed in ("Encoder/posembed_input/pos_embedding", "embedding/kernel"):
        if needed not in shapes:
            raise CheckpointMismatch(
                f"The checkpoint has no parameter {needed!r}: it is not a vmoe "
                "VisionTransformerMoe parameter tree."
            )
    tokens = shapes["Encoder/posembed_input/pos_embedding"][1]
    kernel = shapes["embedding/kernel"]
    patches = tokens - int(config.get("classifier", "token") == "token")
    side = math.isqrt(max(patches, 0))
    if side * side != patches or patches < 1:
        raise CheckpointMismatch(
            f"The position embedding holds {tokens} tokens, which is no square grid "
            "of patches; pass `image_shape=`."
        )
    return (side * kernel[0], side * kernel[1], kernel[2])


def _match_parameters(index, model):
    """`{vmoe path: Keras variable}`, after checking paths and shapes."""
    variables = {}
    for v in model.weights:
        if v.trainable:
            if v.path in variables:
                raise CheckpointMismatch(
                    f"Two model weights share the path {v.path!r}."
                )
            variables[v.path] = v
    mapping, used = {}, set()
    for info in index.arrays:
        keras_path = keras_weight_path(info.path)
        variable = variables.get(keras_path)
        if variable is None:
            what = (
                "is no parameter of a vmoe VisionTransformerMoe"
                if keras_path is None
                else f"has no counterpart ({keras_path!r}) in the model of the config"
            )
            raise CheckpointMismatch(
                f"Extra checkpoint parameter {info.path!r} {info.shape}: it {what}. "
                "Does the config match the checkpoint (MoE layers, classifier, "
                "representation_size, attention_qk_norm, router)?"
            )
        if tuple(variable.shape) != tuple(info.shape):
            raise CheckpointMismatch(
                f"Checkpoint parameter {info.path!r} has shape {tuple(info.shape)}, "
                f"but the model of the config expects {tuple(variable.shape)} "
                f"(Keras weight {keras_path!r}). Does the config match the checkpoint?"
            )
        if keras_path in used:  # cannot happen with PARAMETER_RULES
            raise CheckpointMismatch(
                f"Two checkpoint parameters map to {keras_path!r}."
            )
        used.add(keras_path)
        mapping[info.path] = variable
    missing = [p for p in variables if p not in used]
    if missing:
        vmoe_path = vmoe_parameter_path(missing[0]) or missing[0]
        raise CheckpointMismatch(
            f"Missing checkpoint parameter {vmoe_path!r} (Keras weight "
            f"{missing[0]!r}, shape {tuple(variables[missing[0]].shape)}), and "
            f"{len(missing) - 1} more. Does the config match the checkpoint?"
        )
    return mapping


def from_vmoe_checkpoint(prefix, config, *, image_shape=None):
    """A `VisionMoEImageClassifier` with the weights of a vmoe checkpoint.

    Reads a google-research/vmoe partitioned checkpoint (as released in
    `gs://vmoe_checkpoints/`: `PREFIX.index` and `PREFIX.data-*`), builds the
    keras_vmoe model of vmoe's model config, and copies every parameter into
    its weight as the shards are read (`iter_vmoe_blocks`: a parameter split
    across shards is written part by part), so the checkpoint is never held
    besides the model. Every parameter of the checkpoint is used exactly once and
    every weight of the model is loaded. On every backend the model then
    reproduces vmoe's logits (to float32 rounding; vmoe's bfloat16 dispatch
    is reproduced by `bfloat16_dispatch`).

    Args:
        prefix: str. The checkpoint prefix (the path without `.index`).
        config: dict or str. vmoe's model config (`config.model`: a dict with
            the keys of `VisionTransformerMoe`, tuples as lists), the path of
            a JSON file holding it, or the name of a released checkpoint
            (`keras_vmoe.convert.released.RELEASED_CHECKPOINTS`, whose
            evaluation capacity factor then becomes `eval_capacity_factor`).
        image_shape: tuple of 3 ints or None. The input shape. Defaults to
            `None`: the square image whose patch grid the checkpoint's
            position embedding fits.

    Returns:
        `VisionMoEImageClassifier` (uncompiled weights loaded; compile it to
        train or evaluate).

    Raises:
        FileNotFoundError: the index or a data shard is missing (named).
        CheckpointError: a file is not a valid vmoe checkpoint file, or is
            truncated (named).
        UnsupportedVmoeOption: the config has an option keras_vmoe cannot
            reproduce (named).
        CheckpointMismatch: a parameter is missing, extra or of another
            shape than the config's model has (named, with both shapes).

    Example:

    ```python
    model = from_vmoe_checkpoint(
        "checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1",
        "vmoe_s32_last2_ilsvrc2012_randaug_light1")
    logits = model.predict(images)  # images in [-1, 1], (B, 224, 224, 3)
    ```
    """
    from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

    index = read_vmoe_index(prefix)
    vmoe_config, overrides = load_vmoe_config(config)
    if image_shape is None:
        image_shape = infer_image_shape(index.shapes, vmoe_config)
    backbone_kwargs, classifier_kwargs, _ = vmoe_config_to_keras(
        vmoe_config, image_shape
    )
    if backbone_kwargs["router"] is not None:
        backbone_kwargs["router_config"] = _apply_evaluation_overrides(
            backbone_kwargs["router_config"], overrides
        )
    index.check_files()  # before building: a missing shard fails fast
    backbone = VisionMoEBackbone(**backbone_kwargs)
    model = VisionMoEImageClassifier(backbone, **classifier_kwargs)
    mapping = _match_parameters(index, model)
    for info, region, block in iter_vmoe_blocks(prefix, index):
        variable = mapping[info.path]
        block = np.asarray(block, dtype=variable.dtype)
        if block.shape == tuple(variable.shape):
            variable.assign(block)
        else:  # the part of a parameter that one shard holds
            start = [a for a, _ in region]
            variable.assign(ops.slice_update(variable.value, start, block))
        del block
    return model
