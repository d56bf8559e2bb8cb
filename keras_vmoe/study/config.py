"""The study's settings, and the router settings that make compute equal.

The paper (Liu et al. 2024, https://arxiv.org/abs/2401.15969) compares the
routers at a fixed compute budget. Here every sparse router processes the
same number of expert slots per group, and the dense ViT does the same MLP
work per token:

the budget is `C = ceil(S * K * c / E)` slots per expert (what Token Choice
with `K` experts per token at capacity factor `c` fills), and each router's
`equal_compute_config` (in its own file under `keras_vmoe/routers/`) gives
the settings that fill exactly `C` slots: Token Choice `K` experts per token
with capacity `C`, Expert Choice capacity `C`, Soft MoE `C` slots per
expert. Capacities are not rounded up to a multiple of 4 and evaluation uses
the training capacity, so every router runs `E * C` expert slots per group,
in training and in evaluation alike. The experts'
hidden size is `mlp_dim / K`, so the `K * c` slots per token cost what one
dense MLP of hidden size `mlp_dim` costs at `c = 1`: the dense ViT (all
blocks dense, hidden size `mlp_dim`) has the per-token MLP compute of the
MoE models with `K = 2`, `c = 1`; the MoE models only add their routers.
"""

import dataclasses
import math

from keras_vmoe.routers import ComputeBudget, get_class, router_names

DENSE = "dense"


def model_names():
    """`"dense"` and every registered router name (routers added later too)."""
    return (DENSE,) + router_names()


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one router study: data, model, training and evaluation.

    Args:
        train_size: int or None. Training images (the first ones of the
            Animal-MNIST train split). Defaults to `None` (all 8,000).
        test_size: int or None. Test images. Defaults to `None` (all 2,000).
        classes: tuple of int or None. Train and test on these Animal-MNIST
            classes only (relabelled 0..n-1). Defaults to `None` (all 10).
        image_size: int. Square input size. Defaults to `28`.
        patch_size: int. Patch size. Defaults to `7` (4x4 patches + class
            token = 17 tokens per image).
        num_layers: int. Encoder blocks. Defaults to `4`.
        num_heads: int. Attention heads. Defaults to `4`.
        hidden_dim: int. Token width. Defaults to `64`.
        mlp_dim: int. Hidden size of the dense MLPs; experts get
            `mlp_dim // num_selected_experts`. Defaults to `128`.
        representation_size: int or None. Width of the `"pre_logits"`
            Dense + tanh layer, whose output is the few-shot feature; `None`
            makes `"pre_logits"` the identity on the pooled class token.
            Defaults to `None` (measured: 10-shot digits accuracy 0.45 on the
            pooled token vs 0.31 on a 64-wide tanh layer, dense ViT).
        moe_layers: str. MoE placement (`parse_moe_layers`). Defaults to
            `"last_odd:2"` (blocks 1 and 3 of 4).
        num_experts: int. Experts per MoE layer `E`. Defaults to `8`.
        group_size: int. Images per routing group. Defaults to `4`.
        num_selected_experts: int. `K` of Token Choice (and of the compute
            match). Defaults to `2`.
        capacity_factor: float. `c`. Defaults to `1.0`.
        epochs: int. Training epochs. Defaults to `6`.
        batch_size: int. Training batch (a multiple of `group_size`).
            Defaults to `128`.
        learning_rate: float. Peak learning rate. Defaults to `3e-3`.
        warmup_fraction: float. Linear warmup, as a fraction of the steps.
            Defaults to `0.1`.
        weight_decay: float. Decoupled weight decay on kernels. Defaults to
            `0.1` (V-MoE).
        eval_batch_size: int. Batch for evaluation (a multiple of
            `group_size`). Defaults to `200`.
        shots: tuple of int. Few-shot sizes. Defaults to `(1, 5, 10, 25)`.
        fewshot_l2: float. Ridge strength of the few-shot probe. Defaults to
            `2.0**10` (big_vision).
        fewshot_train_size: int or None. Digits images in the few-shot pool
            (the first ones of its train split). Defaults to `None` (1,437).
        fewshot_test_size: int or None. Digits test images. Defaults to
            `None` (360).
        routing_images: int. Test images in the routing picture (rounded up
            to a multiple of `group_size`). Defaults to `8`.
        jit_compile: bool or `"auto"`. Passed to `model.compile`. Defaults
            to `"auto"`.

    Example:
    >>> config = StudyConfig()
    >>> config.tokens_per_image, config.tokens_per_group, config.expert_hidden_dim
    (17, 68, 64)
    """

    train_size: int | None = None
    test_size: int | None = None
    classes: tuple | None = None
    image_size: int = 28
    patch_size: int = 7
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 64
    mlp_dim: int = 128
    representation_size: int | None = None
    moe_layers: str = "last_odd:2"
    num_experts: int = 8
    group_size: int = 4
    num_selected_experts: int = 2
    capacity_factor: float = 1.0
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    eval_batch_size: int = 200
    shots: tuple = (1, 5, 10, 25)
    fewshot_l2: float = 2.0**10
    fewshot_train_size: int | None = None
    fewshot_test_size: int | None = None
    routing_images: int = 8
    jit_compile: object = "auto"

    @property
    def tokens_per_image(self):
        return (self.image_size // self.patch_size) ** 2 + 1  # + class token

    @property
    def tokens_per_group(self):
        return self.group_size * self.tokens_per_image

    @property
    def expert_hidden_dim(self):
        return self.mlp_dim // self.num_selected_experts

    def replace(self, **changes):
        """A copy with some settings changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Raises `ValueError` naming the first inconsistent setting."""
        for name in (
            "image_size",
            "patch_size",
            "num_layers",
            "num_heads",
            "hidden_dim",
            "mlp_dim",
            "num_experts",
            "group_size",
            "num_selected_experts",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "routing_images",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        size = self.representation_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"representation_size must be None or >= 1, got {size!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}."
            )
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) % self.group_size:
                raise ValueError(
                    f"{name.replace('_', '-')} must be a multiple of the routing "
                    f"group ({self.group_size} images), got {getattr(self, name)}."
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
        equal_compute(self)  # raises if the routers cannot be matched
        return self


# The default study (what `make demo` runs) and the `--quick` smoke test.
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
    routing_images=4,
)


def equal_compute(config):
    """The router settings that give every sparse router the same slots.

    Args:
        config: `StudyConfig`.

    Returns:
        dict with `tokens_per_group` (S), `num_experts` (E),
        `num_selected_experts` (K), `capacity_factor` (c),
        `slots_per_expert` (C), `slots_per_group` (E * C), `slots_per_token`
        (E * C / S), `expert_hidden_dim`, and `router_configs`: router name
        -> the `router_config` of `VisionMoEBackbone`.

    Example:
    >>> plan = equal_compute(StudyConfig())  # S = 4 * 17 = 68, E = 8, K = 2
    >>> plan["slots_per_expert"], plan["slots_per_group"]  # ceil(68*2/8) = 17
    (17, 136)
    >>> plan["router_configs"]["softmax_expert_choice"]
    {'capacity': 17, 'capacity_multiple_of': 1}
    >>> plan["router_configs"]["soft"]
    {'num_slots': 17}
    """
    s, e = config.tokens_per_group, config.num_experts
    k, c = config.num_selected_experts, float(config.capacity_factor)
    budget = ComputeBudget.from_capacity_factor(s, e, k, c)
    slots = budget.slots_per_expert
    router_configs = {
        name: get_class(name).equal_compute_config(budget) for name in router_names()
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
        "router_configs": router_configs,
    }


def describe_equal_compute(config):
    """One paragraph stating what is matched (printed and saved in JSON)."""
    p = equal_compute(config)
    exact = p["tokens_per_group"] * p["num_selected_experts"] * p["capacity_factor"]
    exact /= p["num_experts"]
    return (
        f"Equal compute: every router fills E x C = {p['num_experts']} x "
        f"{p['slots_per_expert']} = {p['slots_per_group']} expert slots per group "
        f"of {p['images_per_group']} images (S = {p['tokens_per_group']} tokens), "
        f"{p['slots_per_token']:.3g} per token, C = ceil(S*K*c/E) = "
        f"ceil({exact:g}) for K = {p['num_selected_experts']} and capacity factor "
        f"c = {p['capacity_factor']:g}: Token Choice with K = "
        f"{p['num_selected_experts']} and capacity C, Expert Choice with capacity "
        f"C, Soft MoE with C slots per expert; no rounding to multiples of 4, "
        "same capacity in training and evaluation. Experts have "
        f"{p['expert_hidden_dim']} hidden units (mlp_dim / K), so the expert "
        f"compute per token equals the dense ViT's MLP ({p['dense_mlp_dim']} hidden "
        f"units) at c = 1: the dense ViT matches K = {p['num_selected_experts']}, "
        "c = 1 and the MoE models add only their routers."
    )


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
    >>> backbone_config(StudyConfig(), "soft")["router_config"]
    {'num_slots': 17}
    """
    args = {
        "image_shape": (config.image_size, config.image_size, 1),
        "patch_size": config.patch_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "hidden_dim": config.hidden_dim,
        "mlp_dim": config.mlp_dim,
    }
    if model_name == DENSE:
        return {**args, "router": None}
    if model_name not in router_names():
        raise ValueError(f"Unknown model {model_name!r}; choose from {model_names()}.")
    return {
        **args,
        "router": model_name,
        "router_config": equal_compute(config)["router_configs"][model_name],
        "moe_layers": config.moe_layers,
        "num_experts": config.num_experts,
        "expert_hidden_dim": config.expert_hidden_dim,
        "group_size": config.group_size,
    }


def warmup_steps(config, total_steps):
    """Linear-warmup steps: `warmup_fraction` of the run, fewer than all."""
    return min(math.floor(config.warmup_fraction * total_steps), total_steps - 1)
