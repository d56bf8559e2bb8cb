"""Training options for an upcycled V-MoE (`keras_vmoe.models.upcycle`).

Two choices that matter when training continues from a dense checkpoint
(Komatsuzaki et al. 2023, "Sparse Upcycling",
https://arxiv.org/abs/2212.05055):

- the learning-rate schedule: `"restart"` warms up again from zero to the
  peak rate and decays over the new run (a fresh run of the recipe);
  `"continue"` skips the warmup and starts at the given rate, as when the
  dense run's schedule goes on (pass the rate the dense run ended at);
- freezing: train only the MoE layers (routers and experts) and the
  classification head, keeping every other backbone weight at its dense
  value (`freeze_non_expert_weights`).

`apply_upcycling_options` applies both before `compile_with_recipe`;
`keras-vmoe train` calls it for `--lr-schedule` and `--freeze-non-experts`.
"""

LR_SCHEDULES = ("restart", "continue")


def freeze_non_expert_weights(model):
    """Makes every backbone weight outside the MoE layers non-trainable.

    The MoE layers (routers and experts) stay trainable, and so does a
    classifier's head (`pre_logits`, `head`); the patch and position
    embeddings, the class token, attention, layer norms, dense MLPs and the
    final norm are frozen. Call it before `compile`.

    Args:
        model: `VisionMoEBackbone` or `VisionMoEImageClassifier`.

    Returns:
        int: the number of weights left trainable (scalars counted).

    Raises:
        ValueError: the model has no MoE layer (nothing would train).

    Example:
    >>> from keras_vmoe.models import VisionMoEBackbone
    >>> backbone = VisionMoEBackbone(image_shape=(8, 8, 3), patch_size=4,
    ...     num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
    ...     router="soft", num_experts=2, moe_layers=[1], group_size=1)
    >>> # Slots (8, 2, 1): 16, scale: 1, experts 2 * (8*16 + 16 + 16*8 + 8): 560.
    >>> freeze_non_expert_weights(backbone)
    577
    >>> sorted({v.path.split("/")[2] for v in backbone.trainable_weights})
    ['experts', 'router']
    """
    backbone = getattr(model, "backbone", model)
    moe_blocks = [b for b in backbone.layers if getattr(b, "is_moe", False)]
    if not moe_blocks:
        raise ValueError(
            "The model has no MoE layer: freezing the non-expert weights would "
            "leave nothing of the backbone to train."
        )
    for layer in backbone.layers:
        if getattr(layer, "is_moe", False):
            for sublayer in (layer.ln_1, layer.attention, layer.ln_2):
                sublayer.trainable = False
            layer.mlp.trainable = True
        else:
            layer.trainable = False
    return int(sum(int(_size(v.shape)) for v in model.trainable_weights))


def _size(shape):
    size = 1
    for s in shape:
        size *= int(s)
    return size


def apply_upcycling_options(
    model, lr_schedule="restart", freeze_non_experts=False, warmup_steps=None
):
    """Applies the upcycling options; returns the warmup for the recipe.

    Args:
        model: the classifier about to be compiled.
        lr_schedule: str. `"restart"` (warm up again) or `"continue"` (no
            warmup). Defaults to `"restart"`.
        freeze_non_experts: bool. `freeze_non_expert_weights(model)`.
            Defaults to `False`.
        warmup_steps: int or None. The warmup asked for (`None`: the
            recipe's default).

    Returns:
        int or None: `warmup_steps` for `compile_with_recipe` (0 when
        continuing).

    Example:
    >>> apply_upcycling_options(None, "continue"), apply_upcycling_options(None)
    (0, None)
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"`lr_schedule` must be one of {LR_SCHEDULES}, got {lr_schedule!r}."
        )
    if lr_schedule == "continue" and warmup_steps:
        raise ValueError(
            f"`lr_schedule='continue'` starts without a warmup; got "
            f"warmup_steps={warmup_steps}."
        )
    if freeze_non_experts:
        freeze_non_expert_weights(model)
    return 0 if lr_schedule == "continue" else warmup_steps
