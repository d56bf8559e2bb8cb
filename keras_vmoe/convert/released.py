"""The V-MoE checkpoints released by google-research/vmoe, and how to convert them.

`RELEASED_CHECKPOINTS` maps each checkpoint name listed in the "Checkpoints"
section of google-research/vmoe's README.md (commit `02f2240a`) to a
`ReleasedCheckpoint` record: where to download it, the vmoe model config
(`config.model`) it was trained with, taken from vmoe's config files, and the
`keras-vmoe convert` command that turns it into a preset.

Every value comes from vmoe's README or config files, and each record names
its source (`config_source`). What neither says is recorded as unknown, never
guessed:

- the number of `.data-NNNNN-of-NNNNN` shards of a checkpoint (the README
  gives only prefixes and says to list the files with gsutil), so `files`
  holds the `.index` file and the `.data-*` pattern;
- `vmoe_s32_last2_ilsvrc2012_randaug_medium` has no config file in vmoe: its
  record builds the config the way vmoe's V-MoE paper configs do
  (`vmoe/configs/vmoe_paper/common.py`, `get_vmoe_config`) from the README's
  description, and lists in `assumed` the values that no vmoe file states
  for this checkpoint;
- the E3 (Efficient Ensemble of Experts) pre-training config is not in vmoe.

E3 checkpoints (`VisionTransformerMoeEnsemble`) are listed but not
supported: keras_vmoe has no ensemble routing (each ensemble member routes
its copy of the tokens to its own partition of the experts), so
`supported` is `False` and `convert_command` is `None`.

The checkpoints are public in `gs://vmoe_checkpoints/` (download with
`gsutil -m cp 'gs://vmoe_checkpoints/NAME.*' DIR/`); the converter reads the
local files (`keras_vmoe.convert.from_vmoe_checkpoint`).
"""

import copy
import dataclasses
import difflib
import math

BUCKET = "gs://vmoe_checkpoints"
VMOE_REPO = "google-research/vmoe"
# The commits the records were read from (the README and each config file).
README_SOURCE = f"{VMOE_REPO} README.md, section 'Checkpoints' (commit 02f2240a)"
SHARD_COUNT_UNKNOWN = (
    "vmoe's README gives only the prefix: the number of .data shards is not "
    "stated; list them with `gsutil ls 'PREFIX.*'`."
)


@dataclasses.dataclass(frozen=True)
class ReleasedCheckpoint:
    """One checkpoint released in `gs://vmoe_checkpoints/`.

    Attributes:
        name: str. The checkpoint's prefix without the bucket, e.g.
            `"vmoe_s32_last2_ilsvrc2012_randaug_light1"`.
        description: str. What the README says the checkpoint is.
        dataset: str. What it was (last) trained on.
        image_size: int or None. The input resolution of its training
            config (vmoe's `config.model` has none: the position embedding
            fixes it).
        model_config: dict or None. vmoe's `config.model` (tuples as lists,
            as JSON has them); `None` if no vmoe file gives it.
        config_source: str. Where `model_config` comes from.
        supported: bool. Whether `keras-vmoe convert` converts it.
        assumed: tuple of str. Entries of `model_config` that no vmoe file
            states for this checkpoint (empty for every checkpoint with a
            config file).
        notes: tuple of str. Anything else a user should know.
        evaluation_overrides: dict or None. What vmoe's config changes in
            `config.model` for evaluation (`config.evaluate.model_overrides`).
        fine_tuned_from: str or None. The checkpoint it was fine-tuned from.
    """

    name: str
    description: str
    dataset: str
    image_size: int | None
    model_config: dict | None
    config_source: str
    supported: bool = True
    assumed: tuple = ()
    notes: tuple = ()
    evaluation_overrides: dict | None = None
    fine_tuned_from: str | None = None

    @property
    def prefix(self):
        """`gs://vmoe_checkpoints/NAME`, the prefix the README lists."""
        return f"{BUCKET}/{self.name}"

    @property
    def files(self):
        """The files to download: the `.index` file and the `.data-*` shards.

        The shard count is not published (`SHARD_COUNT_UNKNOWN`), hence the
        pattern.
        """
        return (f"{self.prefix}.index", f"{self.prefix}.data-*")

    @property
    def download_command(self):
        """A gsutil command that downloads the checkpoint into `checkpoints/`."""
        return f"gsutil -m cp '{self.prefix}.*' checkpoints/"

    @property
    def convert_command(self):
        """The `keras-vmoe convert` command, after `download_command`.

        `None` for a checkpoint keras_vmoe cannot convert (E3 ensembles).
        """
        if not self.supported:
            return None
        return (
            f"keras-vmoe convert --checkpoint checkpoints/{self.name} "
            f"--config {self.name} --output converted/{self.name}"
        )

    def vmoe_config(self):
        """A copy of `model_config` (vmoe's `config.model`), for the converter.

        Raises:
            ValueError: the record has no config or is not supported.
        """
        if not self.supported:
            raise ValueError(
                f"{self.name} is not supported: {self.notes[0] if self.notes else ''}"
            )
        if self.model_config is None:
            raise ValueError(f"{self.name}: no model config is known.")
        return copy.deepcopy(self.model_config)


def _vmoe_paper_config(
    variant, patch, num_experts, k, where, where_num, image_size, num_classes
):
    """vmoe's `config.model` for a V-MoE paper model (its `get_vmoe_config`).

    A transcription of `vmoe/configs/vmoe_paper/common.py`, `get_vmoe_config`
    (commit 652f8bd5), for the description
    `f"ViT-{variant}/{patch}, E={num_experts}, K={k}, {where} {where_num}, ..."`;
    tuples are lists. The configs below then apply their own changes, as
    vmoe's config files do.

    Example:
    >>> config = _vmoe_paper_config("S", 32, 8, 2, "Last", 2, 224, 1000)
    >>> config["encoder"]["moe"]["layers"], config["encoder"]["moe"]["group_size"]
    ([5, 7], 400)
    """
    i = ["S", "B", "L", "H"].index(variant)
    num_layers = [8, 12, 24, 32][i]
    hidden = [512, 768, 1024, 1280][i]
    if where == "Every":
        layers = list(range(where_num - 1, num_layers, where_num))
    elif where == "Last":
        layers = list(range(1, num_layers, 2))[-where_num:]
    else:
        raise ValueError(f"Unknown position for expert layers: {where} {where_num}")
    # Groups of 8 images (the smallest batch per device vmoe assumes).
    group_size = 8 * ((image_size // patch) * (image_size // patch) + 1)
    return {
        "name": "VisionTransformerMoe",
        "num_classes": num_classes,
        "patch_size": [patch, patch],
        "hidden_size": hidden,
        "classifier": "token",
        "representation_size": hidden,
        "head_bias_init": -math.log(num_classes),
        "encoder": {
            "num_layers": num_layers,
            "mlp_dim": [2048, 3072, 4096, 5120][i],
            "num_heads": [8, 12, 16, 16][i],
            "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "moe": {
                "num_experts": num_experts,
                "layers": layers,
                "dropout_rate": 0.0,
                "split_rngs": False,
                "group_size": group_size,
                "router": {
                    "num_selected_experts": k,
                    "noise_std": 1.0,
                    "importance_loss_weight": 0.005,
                    "load_loss_weight": 0.005,
                    "dispatcher": {
                        "name": "einsum",
                        "bfloat16": True,
                        "capacity_factor": 1.05,
                        "partition_spec": [["expert", "replica"]],
                        "batch_priority": False,
                    },
                },
            },
        },
    }


def _with(config, **changes):
    """A copy of `config` with entries changed.

    Keys are paths with `__` between levels, e.g. `encoder__moe__dropout_rate`;
    each must exist already (a typo raises `KeyError`).
    """
    config = copy.deepcopy(config)
    for path, value in changes.items():
        node = config
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        if last not in node:
            raise KeyError(path)
        node[last] = value
    return config


def _source(path, commit, function=None):
    where = f"{VMOE_REPO} {path} (commit {commit})"
    return f"{where}, {function}" if function else where


_PAPER = "vmoe/configs/vmoe_paper"
_S32_LIGHT1 = _with(
    _vmoe_paper_config("S", 32, 8, 2, "Last", 2, 224, 1000),
    encoder__moe__dropout_rate=0.2,
)
_S32_LIGHT1_FT = _with(
    _vmoe_paper_config("S", 32, 8, 2, "Last", 2, 384, 1000),
    representation_size=None,
    encoder__moe__router__dispatcher__capacity_factor=1.5,
)
# pretrain_imagenet21k.py has its own copy of get_vmoe_config, with 21,843
# classes, no pre-logits and head bias -10.
_B16_I21K = _with(
    _vmoe_paper_config("B", 16, 8, 2, "Every", 2, 224, 21_843),
    representation_size=None,
    head_bias_init=-10.0,
)
_B16_I21K_FT = _with(
    _vmoe_paper_config("B", 16, 8, 2, "Every", 2, 384, 1000),
    representation_size=None,
    encoder__moe__router__dispatcher__capacity_factor=1.5,
)
# vmoe/configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py, written out
# there as a dict: groups of (1024 // 8) images x 17 tokens per ensemble
# member, times 2 members.
_EEE_FT_CIFAR100 = {
    "name": "VisionTransformerMoeEnsemble",
    "num_classes": 100,
    "patch_size": [32, 32],
    "hidden_size": 512,
    "classifier": "token",
    "representation_size": 512,
    "head_bias_init": -10.0,
    "encoder": {
        "num_layers": 8,
        "num_heads": 8,
        "mlp_dim": 2048,
        "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0,
        "moe": {
            "ensemble_size": 2,
            "num_experts": 8,
            "group_size": (1024 // 8) * ((128 // 32) ** 2 + 1) * 2,
            "layers": [5, 7],
            "dropout_rate": 0.0,
            "split_rngs": False,
            "router": {
                "num_selected_experts": 1,
                "noise_std": 1.0,
                "importance_loss_weight": 0.005,
                "load_loss_weight": 0.005,
                "dispatcher": {
                    "name": "einsum",
                    "bfloat16": True,
                    "capacity_factor": 1.5,
                    "partition_spec": [["expert", "replica"]],
                    "batch_priority": False,
                },
            },
        },
    },
}
_ENSEMBLE_NOTE = (
    "E3 ensembles are not supported: keras_vmoe has no ensemble routing "
    "(VisionTransformerMoeEnsemble repeats each image once per ensemble "
    "member and routes each copy within its member's partition of the experts)."
)

RELEASED_CHECKPOINTS = {
    record.name: record
    for record in (
        ReleasedCheckpoint(
            name="vmoe_s32_last2_ilsvrc2012_randaug_light1",
            description=(
                "V-MoE S/32, 8 experts on the last two odd blocks, trained from "
                "scratch on ILSVRC2012 with RandAugment for 300 epochs."
            ),
            dataset="ILSVRC2012 (1,000 classes)",
            image_size=224,
            model_config=_S32_LIGHT1,
            config_source=_source(
                f"{_PAPER}/vmoe_s32_last2_ilsvrc2012_randaug_light1.py",
                "0c108255",
                "get_vmoe_params('ViT-S/32, E=8, K=2, Last 2, 300 Epochs')",
            ),
            notes=(
                "ViT-S here is vmoe's 8-block S (d=512), not the 12-block ViT-S.",
                "Trained with sigmoid cross-entropy.",
            ),
            evaluation_overrides={
                "encoder": {"moe": {"router": {"dispatcher": {"capacity_factor": 4.0}}}}
            },
        ),
        ReleasedCheckpoint(
            name="vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
            description=(
                "vmoe_s32_last2_ilsvrc2012_randaug_light1 fine-tuned on ILSVRC2012 "
                "with a resolution of 384 pixels."
            ),
            dataset="ILSVRC2012 (1,000 classes)",
            image_size=384,
            model_config=_S32_LIGHT1_FT,
            config_source=_source(
                f"{_PAPER}/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py",
                "652f8bd5",
                "get_vmoe_config('ViT-S/32, E=8, K=2, Last 2, 300 Epochs')",
            ),
            notes=(
                "ViT-S here is vmoe's 8-block S (d=512), not the 12-block ViT-S.",
                "Fine-tuned with softmax cross-entropy and a new head.",
            ),
            fine_tuned_from="vmoe_s32_last2_ilsvrc2012_randaug_light1",
        ),
        ReleasedCheckpoint(
            name="vmoe_s32_last2_ilsvrc2012_randaug_medium",
            description=(
                "V-MoE S/32, 8 experts on the last two odd blocks, trained from "
                "scratch on ILSVRC2012 with RandAugment for 1000 epochs."
            ),
            dataset="ILSVRC2012 (1,000 classes)",
            image_size=224,
            model_config=_vmoe_paper_config("S", 32, 8, 2, "Last", 2, 224, 1000),
            config_source=(
                f"no config file in {VMOE_REPO} for this checkpoint: the "
                f"README's description (S/32, E=8, last two odd blocks, "
                f"ILSVRC2012) through {_PAPER}/common.py (commit 652f8bd5), "
                "get_vmoe_config('ViT-S/32, E=8, K=2, Last 2, 1000 Epochs', "
                "image_size=224, num_classes=1000)"
            ),
            assumed=(
                "encoder.moe.router.num_selected_experts: 2 (K is not stated)",
                "encoder.moe.router.dispatcher.capacity_factor: 1.05",
                "encoder.moe.group_size: 400 (8 images of 224 px)",
                "image size: 224",
                "representation_size: 512",
            ),
            notes=(
                "ViT-S here is vmoe's 8-block S (d=512), not the 12-block ViT-S.",
                "The converter checks every weight's shape against the config, "
                "so a wrong size or head fails; K and the capacity factor "
                "(routing settings, no weights) cannot be checked.",
            ),
        ),
        ReleasedCheckpoint(
            name="vmoe_b16_imagenet21k_randaug_strong",
            description=(
                "V-MoE B/16, 8 experts on every odd block, trained from scratch "
                "on ImageNet-21k with RandAugment."
            ),
            dataset="ImageNet-21k (21,843 classes)",
            image_size=224,
            model_config=_B16_I21K,
            config_source=_source(
                f"{_PAPER}/pretrain_imagenet21k.py",
                "0c108255",
                "get_vmoe_params('ViT-B/16, E=8, K=2, Every 2, 300 Epochs')",
            ),
            notes=("Trained with sigmoid cross-entropy.",),
        ),
        ReleasedCheckpoint(
            name="vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
            description=(
                "vmoe_b16_imagenet21k_randaug_strong fine-tuned on ILSVRC2012 "
                "with a resolution of 384 pixels."
            ),
            dataset="ILSVRC2012 (1,000 classes)",
            image_size=384,
            model_config=_B16_I21K_FT,
            config_source=_source(
                f"{_PAPER}/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py",
                "0c108255",
                "get_vmoe_config('ViT-B/16, E=8, K=2, Every 2, 300 Epochs')",
            ),
            notes=(
                "Fine-tuned with softmax cross-entropy and a new head.",
                "The config's first version (vmoe/configs/"
                "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py, commit "
                "a9a26d2e) routed groups of 4 images (2,308 tokens) with a fixed "
                "capacity of 865 and head_bias_init -10; which version trained "
                "the released checkpoint is not stated. Routing only: the "
                "weights are the same shapes.",
            ),
            fine_tuned_from="vmoe_b16_imagenet21k_randaug_strong",
        ),
        ReleasedCheckpoint(
            name="eee_s32_last2_ilsvrc2012",
            description=(
                "E3 S/32, 8 experts on the last two odd blocks, with two ensemble "
                "members (the 8 experts partitioned into two groups), trained "
                "from scratch on ILSVRC2012 with RandAugment for 300 epochs."
            ),
            dataset="ILSVRC2012 (1,000 classes)",
            image_size=224,
            model_config=None,
            config_source=(
                f"no pre-training config in {VMOE_REPO}; the fine-tuning config "
                "vmoe/configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py "
                "says it was pre-trained at 224 px"
            ),
            supported=False,
            notes=(_ENSEMBLE_NOTE,),
        ),
        ReleasedCheckpoint(
            name="eee_s32_last2_ilsvrc2012_ft_cifar100",
            description="eee_s32_last2_ilsvrc2012 fine-tuned on CIFAR100.",
            dataset="CIFAR100 (100 classes)",
            image_size=128,
            model_config=_EEE_FT_CIFAR100,
            config_source=_source(
                "vmoe/configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py",
                "0c108255",
                "config.model",
            ),
            supported=False,
            notes=(_ENSEMBLE_NOTE,),
            fine_tuned_from="eee_s32_last2_ilsvrc2012",
        ),
    )
}


def released_checkpoint(name):
    """The `ReleasedCheckpoint` of a name, with a suggestion if misspelt.

    Args:
        name: str. A key of `RELEASED_CHECKPOINTS` (a `gs://vmoe_checkpoints/`
            prefix is accepted).

    Raises:
        KeyError: no released checkpoint has that name.

    Example:
    >>> released_checkpoint("vmoe_b16_imagenet21k_randaug_strong").image_size
    224
    >>> released_checkpoint("eee_s32_last2_ilsvrc2012").supported
    False
    """
    key = str(name).removeprefix(f"{BUCKET}/")
    if key in RELEASED_CHECKPOINTS:
        return RELEASED_CHECKPOINTS[key]
    close = difflib.get_close_matches(key, RELEASED_CHECKPOINTS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"No released V-MoE checkpoint is named {name!r}.{hint}")


def is_released_name(name):
    """Whether `name` names a released checkpoint.

    Example:
    >>> is_released_name("vmoe_s32_last2_ilsvrc2012_randaug_medium")
    True
    >>> is_released_name("config.json")
    False
    """
    return str(name).removeprefix(f"{BUCKET}/") in RELEASED_CHECKPOINTS


def markdown_table():
    """The table of the released checkpoints, as in the README.

    Example:
    >>> print(markdown_table().splitlines()[0])
    | checkpoint | model | trained on | image size | convert |
    """
    lines = [
        "| checkpoint | model | trained on | image size | convert |",
        "| --- | --- | --- | --- | --- |",
    ]
    for record in RELEASED_CHECKPOINTS.values():
        convert = (
            f"`{record.convert_command}`"
            if record.supported
            else "not supported (E3 ensemble)"
        )
        lines.append(
            f"| `{record.name}` | {record.description} | {record.dataset} | "
            f"{record.image_size} | {convert} |"
        )
    return "\n".join(lines)
