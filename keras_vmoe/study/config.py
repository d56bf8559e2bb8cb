"""The study's settings, and the router settings that make compute equal.

The paper (Liu et al. 2024, https://arxiv.org/abs/2401.15969) compares the
routers at a fixed compute budget, counted in FLOPs per image by the cost
model (`keras_vmoe.models.vision_moe.cost.backbone_flops`).

Sparse routers (Token and Expert Choice) route groups of `group_size`
images, as in V-MoE, and all fill the same number of expert slots per
group: `C = ceil(S * K * c / E)` slots per expert (what Token Choice with
`K` experts per token at capacity factor `c` fills), from each router's
`equal_compute_config` (Token Choice `K` experts with capacity `C`, Expert
Choice capacity `C`). Capacities are not rounded up to a multiple of 4 and
evaluation uses the training capacity. The experts' hidden size is
`mlp_dim / K`, so the `K * c` slots per token cost what one dense MLP of
hidden size `mlp_dim` costs at `c = 1`: the dense ViT has the per-token MLP
compute of the MoE models with `K = 2`, `c = 1`; the sparse MoE models only
add their gating matmul.

Soft MoE routes one image per group, as in the Soft MoE paper (Puigcerver
et al. 2024), so a prediction never depends on the other images of a
batch. Its slots cost more than sparse slots: each slot is a weighted
average of all `S` tokens of its group (dispatch), and each token a weighted
average of all slots (combine), with the slot logits on top, `3 * S * d`
multiply-accumulates per slot against the expert's `2 * d * h` (`h` the
expert width). The study therefore picks Soft MoE's slots per expert with
the cost model: the count whose FLOPs per image are closest to the sparse
routers', which must come within `flops_tolerance` (3%).
"""

import dataclasses
import math

from keras_vmoe.routers import ComputeBudget, get_class, router_names

DENSE = "dense"
SOFT = "soft"


def model_names():
    """`"dense"` and every registered router name (routers added later too)."""
    return (DENSE,) + router_names()


# The models of the default study: the dense ViT, the two Softmax routers
# (Token and Expert Choice) and Soft MoE, the paper's main contrast.
DEFAULT_MODELS = (
    DENSE,
    "softmax_token_choice",
    "softmax_expert_choice",
    "soft",
)
POOLINGS = ("gap", "token")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one router study: data, model, training and evaluation.

    Args:
        dataset: str or None. `None` for the bundled Animal-MNIST, else the
            name of a TFDS dataset already prepared on disk (no download)
            or the path of an image folder (one subfolder per class); see
            `keras_vmoe.study.data`. Defaults to `None`.
        channels: int. Image channels fed to the model (1 or 3); images are
            converted to it. Defaults to `1`.
        train_size: int or None. Training images (the first ones of the
            train split). Defaults to `None` (all of them; 8,000 for
            Animal-MNIST).
        test_size: int or None. Test images. Defaults to `None` (all 2,000).
        classes: tuple of int or None. Train and test on these classes only
            (relabelled 0..n-1). Defaults to `None` (all).
        image_size: int. Square input size. Defaults to `28`.
        patch_size: int. Patch size. Defaults to `7` (4x4 patches).
        num_layers: int. Encoder blocks. Defaults to `4`.
        num_heads: int. Attention heads. Defaults to `4`.
        hidden_dim: int. Token width. Defaults to `64`.
        mlp_dim: int. Hidden size of the dense MLPs; experts get
            `mlp_dim // num_selected_experts`. Defaults to `128`.
        pooling: str. For every model: `"gap"` (average of the patch tokens,
            no class token, as the Soft MoE paper) or `"token"` (class token,
            as V-MoE). Defaults to `"gap"`.
        representation_size: int or None. Width of the `"pre_logits"`
            Dense + tanh layer, whose output is the few-shot feature; `None`
            makes `"pre_logits"` the identity on the pooled features.
            Defaults to `None`.
        moe_layers: str. MoE placement (`parse_moe_layers`). Defaults to
            `"last_odd:2"` (blocks 1 and 3 of 4).
        num_experts: int. Experts per MoE layer `E`. Defaults to `8`.
        group_size: int. Images per routing group of the sparse routers.
            Defaults to `4`.
        soft_group_size: int. Images per routing group of Soft MoE.
            Defaults to `1` (the Soft MoE paper: predictions do not depend
            on the other images of a batch).
        num_selected_experts: int. `K` of Token Choice (and of the compute
            match). Defaults to `2`.
        capacity_factor: float. `c`. Defaults to `1.0`.
        flops_tolerance: float. Largest relative difference allowed between
            Soft MoE's FLOPs per image and the sparse routers'. Defaults to
            `0.03`.
        identical_expert_init: bool. All experts of a layer start with the
            same weights, as in the reference vmoe code (its MoE blocks do
            not split the parameter RNG across experts by default); the
            routers alone make them diverge. Defaults to `True`.
        augment: bool. Random horizontal flips and shifts of the training
            images (Keras preprocessing layers, one batch at a time in the
            `tf.data` pipeline, so that a seed gives every model the same
            augmented images). Defaults to `True`.
        max_shift: int. Largest shift in pixels, each axis. Defaults to `2`.
        epochs: int. Training epochs. Defaults to `3` (the most that keeps
            the default study, 4 models x 4 seeds, within its time budget on
            2 CPU cores: `benchmarks/router_study.md`).
        batch_size: int. Training batch: images per optimizer update (a
            multiple of `group_size`). Defaults to `128`.
        micro_batch_size: int or None. Most images per forward and backward
            pass: each training batch is split into the fewest equal passes
            of at most this many images (whole routing groups), whose
            gradients are averaged into the batch's one update (Keras'
            gradient accumulation). The updates are those of one pass over
            the whole batch, same images and augmentation; only the
            computation is split (on a 2-core CPU, passes of 32 images took
            a fifth to a third less CPU time per image than passes of 128:
            `benchmarks/router_study.md`). `None`: one pass per batch.
            Defaults to `32`.
        learning_rate: float. Peak learning rate. Defaults to `3e-3`.
        warmup_fraction: float. Linear warmup, as a fraction of the steps.
            Defaults to `0.1`.
        weight_decay: float. Decoupled weight decay on kernels. Defaults to
            `0.1` (V-MoE).
        eval_batch_size: int. Batch for evaluation (a multiple of
            `group_size`). Defaults to `200`.
        shots: tuple of int. Few-shot sizes. Defaults to `(1, 5, 10, 25)`.
        fewshot_draws: int. Draws of the few-shot training examples per
            model and seed; the accuracies are averaged over them. Defaults
            to `5`.
        fewshot_l2: float. Ridge strength of the few-shot probe. Defaults to
            `2.0**10` (big_vision).
        fewshot_train_size: int or None. Digits images in the few-shot pool
            (the first ones of its train split). Defaults to `None` (1,437).
        fewshot_test_size: int or None. Digits test images. Defaults to
            `None` (360).
        routing_images: int. Test images in the routing picture. Defaults
            to `8`.
        diagnostic_images: int. Test images over which the routing
            sharpness is measured. Defaults to `64`.
        seeds: int. Seeds per model (`0..seeds-1`). Defaults to `4`.
        models: tuple of str. The models of the study. Defaults to
            `DEFAULT_MODELS`.
        confidence: float. Coverage of the paired intervals. Defaults to
            `0.95`.
        jit_compile: bool or `"auto"`. Passed to `model.compile`. Defaults
            to `"auto"`.

    Example:
    >>> config = StudyConfig()
    >>> config.tokens_per_image, config.tokens_per_group, config.expert_hidden_dim
    (16, 64, 64)
    """

    dataset: str | None = None
    channels: int = 1
    train_size: int | None = None
    test_size: int | None = None
    classes: tuple | None = None
    image_size: int = 28
    patch_size: int = 7
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 64
    mlp_dim: int = 128
    pooling: str = "gap"
    representation_size: int | None = None
    moe_layers: str = "last_odd:2"
    num_experts: int = 8
    group_size: int = 4
    soft_group_size: int = 1
    num_selected_experts: int = 2
    capacity_factor: float = 1.0
    flops_tolerance: float = 0.03
    identical_expert_init: bool = True
    augment: bool = True
    max_shift: int = 2
    epochs: int = 3
    batch_size: int = 128
    micro_batch_size: int | None = 32
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    eval_batch_size: int = 200
    shots: tuple = (1, 5, 10, 25)
    fewshot_draws: int = 5
    fewshot_l2: float = 2.0**10
    fewshot_train_size: int | None = None
    fewshot_test_size: int | None = None
    routing_images: int = 8
    diagnostic_images: int = 64
    seeds: int = 4
    models: tuple = DEFAULT_MODELS
    confidence: float = 0.95
    jit_compile: object = "auto"

    @property
    def use_class_token(self):
        return self.pooling == "token"

    @property
    def tokens_per_image(self):
        grid = self.image_size // self.patch_size
        return grid * grid + int(self.use_class_token)

    @property
    def tokens_per_group(self):
        """Tokens per routing group of the sparse routers."""
        return self.group_size * self.tokens_per_image

    @property
    def expert_hidden_dim(self):
        return self.mlp_dim // self.num_selected_experts

    @property
    def accumulation_steps(self):
        """Forward and backward passes per training batch (`micro_batch_size`).

        The fewest `k` that split `batch_size` into `k` equal passes of at
        most `micro_batch_size` images, each a whole number of routing
        groups (of every model of the study); 1 without `micro_batch_size`.

        Example:
        >>> StudyConfig().accumulation_steps  # 128 images in 4 passes of 32
        4
        >>> StudyConfig(batch_size=100).accumulation_steps  # 5 passes of 20
        5
        """
        if self.micro_batch_size is None or self.micro_batch_size >= self.batch_size:
            return 1
        group = math.lcm(self.group_size, self.soft_group_size)
        for steps in range(
            -(-self.batch_size // self.micro_batch_size), self.batch_size
        ):
            size, rest = divmod(self.batch_size, steps)
            if not rest and size % group == 0:
                return steps
        return self.batch_size // group  # one routing group per pass

    def images_per_group(self, model_name):
        """Images per routing group of one model (1 for the dense ViT)."""
        if model_name == DENSE:
            return 1
        return self.soft_group_size if model_name == SOFT else self.group_size

    def replace(self, **changes):
        """A copy with some settings changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Raises `ValueError` naming the first inconsistent setting."""
        for name in (
            "channels",
            "image_size",
            "patch_size",
            "num_layers",
            "num_heads",
            "hidden_dim",
            "mlp_dim",
            "num_experts",
            "group_size",
            "soft_group_size",
            "num_selected_experts",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "routing_images",
            "diagnostic_images",
            "fewshot_draws",
            "seeds",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"pooling must be one of {POOLINGS}, got {self.pooling!r}."
            )
        size = self.representation_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"representation_size must be None or >= 1, got {size!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}."
            )
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"max_shift must be an int >= 0, got {self.max_shift!r}.")
        group = math.lcm(self.group_size, self.soft_group_size)
        micro = self.micro_batch_size
        if micro is not None and (
            isinstance(micro, bool) or not isinstance(micro, int) or micro < 1
        ):
            raise ValueError(
                f"micro_batch_size must be None or an int >= 1, got {micro!r}."
            )
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) % group:
                raise ValueError(
                    f"{name.replace('_', '-')} must be a multiple of the routing "
                    f"group ({group} images), got {getattr(self, name)}."
                )
        if self.mlp_dim % self.num_selected_experts:
            raise ValueError(
                f"mlp_dim {self.mlp_dim} must be divisible by K = "
                f"{self.num_selected_experts} (experts have mlp_dim / K units)."
            )
        if self.num_selected_experts > self.num_experts:
            raise ValueError("num_selected_experts must be at most num_experts.")
        if not self.capacity_factor > 0 or not self.learning_rate > 0:
            raise ValueError("capacity_factor and learning_rate must be > 0.")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must be in [0, 1).")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}.")
        if not self.flops_tolerance > 0:
            raise ValueError("flops_tolerance must be > 0.")
        for size in (
            "train_size",
            "test_size",
            "fewshot_train_size",
            "fewshot_test_size",
        ):
            value = getattr(self, size)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{size} must be None or an int >= 1, got {value!r}.")
        if self.classes is not None and len(set(self.classes)) < 2:
            raise ValueError("classes must list at least 2 distinct classes.")
        if not self.models:
            raise ValueError("models must name at least one model.")
        unknown = [m for m in self.models if m not in model_names()]
        if unknown:
            raise ValueError(
                f"unknown model {unknown[0]!r}; choose from {model_names()}."
            )
        equal_compute(self)  # raises if the routers cannot be matched
        return self


# The default study (what `make demo` runs), the `--quick` smoke test and
# the `--scale gpu` preset (sized for about 10 minutes on one modern GPU).
DEFAULT = StudyConfig()
QUICK = StudyConfig(
    train_size=384,
    test_size=256,
    num_layers=2,
    num_heads=2,
    hidden_dim=32,
    mlp_dim=64,
    num_experts=4,
    group_size=2,
    epochs=1,
    batch_size=32,
    learning_rate=3e-3,
    eval_batch_size=128,
    fewshot_train_size=400,
    fewshot_test_size=200,
    fewshot_draws=2,
    routing_images=4,
    diagnostic_images=16,
    seeds=1,
)
GPU = StudyConfig(
    patch_size=4,  # 7 x 7 = 49 tokens per image
    num_layers=6,
    num_heads=6,
    hidden_dim=192,
    mlp_dim=768,
    moe_layers="last_odd:3",
    epochs=30,
    batch_size=256,
    eval_batch_size=400,
    micro_batch_size=None,  # one pass per batch: a GPU takes 256 at once
    seeds=6,
    models=model_names(),
)
SCALES = {"cpu": DEFAULT, "gpu": GPU}


def _flops_per_image(config, model_name, router_config=None):
    """Backbone FLOPs per image of one model (the cost model)."""
    from keras_vmoe.models.vision_moe.cost import backbone_flops

    args = _backbone_arguments(config, model_name)
    if router_config is not None:
        args["router_config"] = router_config
    return backbone_flops(args)


def soft_slots_for_equal_flops(config, sparse_flops=None):
    """Soft MoE's slots per expert whose FLOPs per image match the sparse routers'.

    The cost model decides: among `P = 1, 2, ...` slots per expert (groups
    of `soft_group_size` images), the `P` whose backbone FLOPs per image are
    closest to Softmax Token Choice's (every sparse router costs the same).

    Args:
        config: `StudyConfig`.
        sparse_flops: int or None. The sparse routers' FLOPs per image, if
            already computed.

    Returns:
        `(slots_per_expert, soft_flops, sparse_flops)`.

    Raises:
        ValueError: the closest count is off by more than `flops_tolerance`.

    Example (the default study: 16 tokens per image, d = 64, experts of
    h = 64; a sparse image fills 32 slots of `2*d*h = 8192` MACs plus
    `16*64*8 = 8192` MACs of gating; a Soft MoE slot costs
    `2*d*h + 3*S*d = 8192 + 3072 = 11264` MACs, so `24 * 11264 =
    32 * 8192 + 8192`: 24 slots, 3 per expert, match exactly):
    >>> slots, soft, sparse = soft_slots_for_equal_flops(StudyConfig())
    >>> slots, soft == sparse
    (3, True)
    """
    if sparse_flops is None:
        sparse_flops = _flops_per_image(config, "softmax_token_choice")
    best = None
    slots = 1
    while True:
        flops = _flops_per_image(config, SOFT, {"num_slots": slots})
        if best is None or abs(flops - sparse_flops) < abs(best[1] - sparse_flops):
            best = (slots, flops)
        if flops > sparse_flops:
            break  # FLOPs grow with the slots: larger counts are further off
        slots += 1
    slots, flops = best
    error = abs(flops - sparse_flops) / sparse_flops
    if error > config.flops_tolerance:
        raise ValueError(
            f"Soft MoE cannot match the sparse routers' FLOPs within "
            f"{config.flops_tolerance:.0%}: the closest, {slots} slots per expert, "
            f"costs {flops:,} FLOPs per image against {sparse_flops:,} "
            f"({error:.1%} off); change num_experts or soft_group_size."
        )
    return slots, flops, sparse_flops


def equal_compute(config):
    """The router settings that give every model of the study equal compute.

    Args:
        config: `StudyConfig`.

    Returns:
        dict with `tokens_per_group` (S of the sparse routers),
        `images_per_group`, `num_experts` (E), `num_selected_experts` (K),
        `capacity_factor` (c), `slots_per_expert` (C), `slots_per_group`
        (E * C), `slots_per_token` (E * C / S), `expert_hidden_dim`,
        `dense_mlp_dim`, `soft` (Soft MoE's `images_per_group`,
        `tokens_per_group`, `slots_per_expert`, `slots_per_image`),
        `flops_per_image` (model name -> backbone FLOPs per image),
        `soft_flops_ratio` (Soft MoE's FLOPs over the sparse routers'), and
        `router_configs`: router name -> the `router_config` of
        `VisionMoEBackbone`.

    Example:
    >>> plan = equal_compute(StudyConfig())  # S = 4 * 16 = 64, E = 8, K = 2
    >>> plan["slots_per_expert"], plan["slots_per_group"]  # ceil(64*2/8) = 16
    (16, 128)
    >>> plan["router_configs"]["softmax_expert_choice"]
    {'capacity': 16, 'capacity_multiple_of': 1}
    >>> plan["router_configs"]["soft"], plan["soft_flops_ratio"]
    ({'num_slots': 3}, 1.0)
    """
    s, e = config.tokens_per_group, config.num_experts
    k, c = config.num_selected_experts, float(config.capacity_factor)
    budget = ComputeBudget.from_capacity_factor(s, e, k, c)
    slots = budget.slots_per_expert
    router_configs = {
        name: get_class(name).equal_compute_config(budget) for name in router_names()
    }
    soft_slots, soft_flops, sparse_flops = soft_slots_for_equal_flops(config)
    router_configs[SOFT] = {"num_slots": soft_slots}
    flops = {
        name: _flops_per_image(config, name, router_configs.get(name))
        for name in model_names()
    }
    return {
        "tokens_per_group": s,
        "images_per_group": config.group_size,
        "num_experts": e,
        "num_selected_experts": k,
        "capacity_factor": c,
        "slots_per_expert": slots,
        "slots_per_group": e * slots,
        "slots_per_token": e * slots / s,
        "expert_hidden_dim": config.expert_hidden_dim,
        "dense_mlp_dim": config.mlp_dim,
        "soft": {
            "images_per_group": config.soft_group_size,
            "tokens_per_group": config.soft_group_size * config.tokens_per_image,
            "slots_per_expert": soft_slots,
            "slots_per_image": e * soft_slots / config.soft_group_size,
        },
        "flops_per_image": flops,
        "soft_flops_ratio": round(soft_flops / sparse_flops, 6),
        "router_configs": router_configs,
    }


def describe_equal_compute(config):
    """One paragraph stating what is matched (printed and saved in JSON)."""
    p = equal_compute(config)
    exact = p["tokens_per_group"] * p["num_selected_experts"] * p["capacity_factor"]
    exact /= p["num_experts"]
    soft = p["soft"]
    ratio = p["soft_flops_ratio"]
    return (
        f"Equal compute: every sparse router fills E x C = {p['num_experts']} x "
        f"{p['slots_per_expert']} = {p['slots_per_group']} expert slots per group "
        f"of {p['images_per_group']} images (S = {p['tokens_per_group']} tokens), "
        f"{p['slots_per_token']:.3g} per token, C = ceil(S*K*c/E) = "
        f"ceil({exact:g}) for K = {p['num_selected_experts']} and capacity factor "
        f"c = {p['capacity_factor']:g}: Token Choice with K = "
        f"{p['num_selected_experts']} and capacity C, Expert Choice with capacity "
        f"C; no rounding to multiples of 4, same capacity in training and "
        f"evaluation. Experts have {p['expert_hidden_dim']} hidden units "
        f"(mlp_dim / K), so the expert compute per token equals the dense ViT's "
        f"MLP ({p['dense_mlp_dim']} hidden units) at c = 1: the dense ViT matches "
        f"K = {p['num_selected_experts']}, c = 1 and the sparse MoE models add "
        f"only their gating. Soft MoE routes {soft['images_per_group']} image(s) "
        f"per group ({soft['tokens_per_group']} tokens) with "
        f"{soft['slots_per_expert']} slot(s) per expert "
        f"({soft['slots_per_image']:g} per image), the count whose FLOPs per "
        f"image the cost model puts closest to the sparse routers' "
        f"({ratio:.3f} x theirs)."
    )


def _backbone_arguments(config, model_name):
    args = {
        "image_shape": (config.image_size, config.image_size, config.channels),
        "patch_size": config.patch_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "hidden_dim": config.hidden_dim,
        "mlp_dim": config.mlp_dim,
        "use_class_token": config.use_class_token,
        "pooling": config.pooling,
    }
    if model_name == DENSE:
        return {**args, "router": None}
    if model_name not in router_names():
        raise ValueError(f"Unknown model {model_name!r}; choose from {model_names()}.")
    if model_name == SOFT:
        router_config = {"num_slots": 1}  # replaced by the caller
    else:
        budget = ComputeBudget.from_capacity_factor(
            config.tokens_per_group,
            config.num_experts,
            config.num_selected_experts,
            float(config.capacity_factor),
        )
        router_config = get_class(model_name).equal_compute_config(budget)
    return {
        **args,
        "router": model_name,
        "router_config": router_config,
        "moe_layers": config.moe_layers,
        "num_experts": config.num_experts,
        "expert_hidden_dim": config.expert_hidden_dim,
        "group_size": config.images_per_group(model_name),
        "identical_expert_init": config.identical_expert_init,
    }


def backbone_config(config, model_name):
    """`VisionMoEBackbone` arguments of one model of the study.

    Args:
        config: `StudyConfig`.
        model_name: str. `"dense"` or a router name.

    Returns:
        dict of backbone constructor arguments.

    Example:
    >>> backbone_config(StudyConfig(), "dense")["router"] is None
    True
    >>> args = backbone_config(StudyConfig(), "soft")
    >>> args["router_config"], args["group_size"], args["pooling"]
    ({'num_slots': 3}, 1, 'gap')
    """
    args = _backbone_arguments(config, model_name)
    if model_name == SOFT:
        args["router_config"] = {"num_slots": soft_slots_for_equal_flops(config)[0]}
    return args


def warmup_steps(config, total_steps):
    """Linear-warmup steps: `warmup_fraction` of the run, fewer than all."""
    return min(math.floor(config.warmup_fraction * total_steps), total_steps - 1)
