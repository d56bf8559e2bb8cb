"""The pre-training recipes in one call, and a backup that resumes exactly.

- `compile_with_recipe(model, "vmoe" | "soft_moe", total_steps=...)`:
  the optimiser, learning-rate schedule, loss and metric of the V-MoE
  (Riquelme et al. 2021) or Soft MoE (Puigcerver et al. 2024) recipe
  (docs/routers.md, "Pre-training recipe"): Adam(0.9, 0.999) with decoupled weight decay
  chosen per variable, global norm clipping 1.0, linear warmup then linear
  decay to 1e-5 (V-MoE) or inverse square root with a linear cooldown
  (Soft MoE), sigmoid cross-entropy (or softmax), top-1 accuracy. It is the
  one compile path of the package: `keras-vmoe train` and the router study
  (`keras_vmoe.study.runner`, the V-MoE recipe with softmax cross-entropy
  and its own learning rate, warmup and weight decay) both call it.
- `BackupAndRestoreWithRNG`: `keras.callbacks.BackupAndRestore` plus the
  random-number state. Keras' callback saves the weights and the optimizer
  (`model.save_weights`) but not the `keras.random.SeedGenerator` states
  of the layers (router noise, dropout): `Layer.save_own_variables` writes
  only trainable and non-trainable *weights*, and seed states are neither.
  A resumed run would then draw the noise of epoch 0 again. This callback
  saves those states next to Keras' backup and restores them with it, so
  an interrupted and resumed `fit()` ends with the same weights as an
  uninterrupted one (given the same data order).
"""

import json
import os

import keras
import numpy as np

from keras_vmoe.training.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy
from keras_vmoe.training.optimizer import (
    SOFT_MOE_WEIGHT_DECAY,
    VMOE_WEIGHT_DECAY,
    DecoupledWeightDecayAdam,
)
from keras_vmoe.training.schedules import (
    PerUpdate,
    WarmupLinearDecay,
    WarmupRsqrtCooldown,
    warmup_cosine,
)

# recipe -> (weight-decay rules, default schedule).
RECIPES = {
    "vmoe": (VMOE_WEIGHT_DECAY, "linear"),
    "soft_moe": (SOFT_MOE_WEIGHT_DECAY, "rsqrt"),
}
SCHEDULES = ("linear", "rsqrt", "cosine", "constant")
LOSSES = ("sigmoid", "softmax")


def _weight_decay_rules(recipe_rules, weight_decay):
    if weight_decay is None:
        return recipe_rules
    if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        return ((r"kernel$", float(weight_decay)),)
    return tuple(tuple(rule) for rule in weight_decay)


def _accumulation_steps(steps):
    """Keras' `gradient_accumulation_steps` (`None` for one batch per update)."""
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"`gradient_accumulation_steps` must be None or an int >= 1, got {steps!r}."
        )
    return steps if steps > 1 else None


def make_schedule(
    schedule,
    peak_learning_rate,
    total_steps,
    warmup_steps=None,
    end_learning_rate=1e-5,
    timescale=10_000,
    cooldown_steps=None,
):
    """The learning-rate schedule of a recipe, with defaults that fit short runs.

    Args:
        schedule: str. `"linear"` (V-MoE `WarmupLinearDecay`), `"rsqrt"`
            (Soft MoE `WarmupRsqrtCooldown`), `"cosine"` (`warmup_cosine`)
            or `"constant"` (linear warmup, then flat).
        peak_learning_rate: float. Rate at the end of the warmup.
        total_steps: int. Optimizer steps of the whole run.
        warmup_steps: int or None. Defaults to `None`: the papers' 10,000,
            capped at a tenth of `total_steps`.
        end_learning_rate: float. Final rate of `"linear"` (and
            `end_learning_rate / peak` the final fraction of `"cosine"`).
            Defaults to `1e-5`.
        timescale: int. Time scale of `"rsqrt"`. Defaults to `10_000`.
        cooldown_steps: int or None. Linear cooldown of `"rsqrt"`. Defaults
            to `None`: 50,000 capped at a tenth of `total_steps`.

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`.

    Example:
    >>> s = make_schedule("linear", 1e-3, total_steps=100)  # warmup 10
    >>> round(float(s(5)), 6), round(float(s(100)), 6)
    (0.0005, 1e-05)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
    if not peak_learning_rate > 0:
        raise ValueError(
            f"`peak_learning_rate` must be > 0, got {peak_learning_rate!r}."
        )
    if isinstance(total_steps, bool) or int(total_steps) != total_steps:
        raise ValueError(f"`total_steps` must be an int >= 1, got {total_steps!r}.")
    total_steps = int(total_steps)
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be an int >= 1, got {total_steps!r}.")
    if warmup_steps is None:
        warmup_steps = min(10_000, total_steps // 10)
    if schedule == "linear":
        return WarmupLinearDecay(
            peak_learning_rate, total_steps, warmup_steps, end_learning_rate
        )
    if schedule == "rsqrt":
        if cooldown_steps is None:
            cooldown_steps = min(50_000, total_steps // 10)
        return WarmupRsqrtCooldown(
            peak_learning_rate, total_steps, warmup_steps, timescale, cooldown_steps
        )
    if schedule == "cosine":
        if not 0 <= end_learning_rate <= peak_learning_rate:
            raise ValueError(
                "`end_learning_rate` must be in [0, peak_learning_rate] for the "
                f"cosine schedule, got {end_learning_rate!r}."
            )
        return warmup_cosine(
            peak_learning_rate,
            total_steps,
            warmup_steps,
            end_fraction=end_learning_rate / peak_learning_rate,
        )
    # Constant after the warmup: a linear "decay" that ends at the peak.
    return WarmupLinearDecay(
        peak_learning_rate, total_steps, warmup_steps, peak_learning_rate
    )


def compile_with_recipe(
    model,
    recipe="vmoe",
    *,
    total_steps,
    peak_learning_rate=1e-3,
    warmup_steps=None,
    schedule=None,
    end_learning_rate=1e-5,
    timescale=10_000,
    cooldown_steps=None,
    weight_decay=None,
    global_clipnorm=1.0,
    beta_1=0.9,
    beta_2=0.999,
    loss="sigmoid",
    label_smoothing=0.0,
    from_logits=None,
    metrics="auto",
    gradient_accumulation_steps=None,
    **compile_kwargs,
):
    """Compiles a classifier with the V-MoE or Soft MoE pre-training recipe.

    One call sets, as in docs/routers.md, "Pre-training recipe":

    - optimiser: `DecoupledWeightDecayAdam(beta_1=0.9, beta_2=0.999)` with
      global norm clipping 1.0 and the recipe's decay rules (V-MoE: 0.1 on
      every kernel; Soft MoE: 3.0 on the head kernel, 0.03 on other kernels
      and on the Soft MoE router's `scale`);
    - schedule: linear warmup, then linear decay to `end_learning_rate`
      (V-MoE) or inverse square root with a linear cooldown (Soft MoE);
    - loss: sigmoid cross-entropy summed over classes (both papers) or
      softmax cross-entropy, with optional label smoothing; integer or
      one-hot labels; the MoE auxiliary losses are added by `fit()`;
    - metric: top-1 accuracy (`keras_vmoe.models.Top1Accuracy`).

    Args:
        model: keras.Model. Usually a `VisionMoEImageClassifier`.
        recipe: str. `"vmoe"` or `"soft_moe"`. Defaults to `"vmoe"`.
        total_steps: int. Optimizer steps of the whole run (the schedule
            ends there).
        peak_learning_rate: float. Rate after the warmup. Defaults to `1e-3`.
        warmup_steps: int or None. Defaults to `None`: 10,000 (the papers)
            capped at a tenth of `total_steps`.
        schedule: str or None. Override the recipe's schedule: `"linear"`,
            `"rsqrt"`, `"cosine"` or `"constant"`. Defaults to `None`.
        end_learning_rate: float. End of the linear decay. Defaults to `1e-5`.
        timescale: int. Time scale of the rsqrt decay. Defaults to `10_000`.
        cooldown_steps: int or None. Linear cooldown of the rsqrt schedule.
            Defaults to `None`: 50,000 capped at a tenth of `total_steps`.
        weight_decay: None, float or sequence of `(regex, rate)`. `None`
            keeps the recipe's rules; a float decays every kernel at that
            rate; rules are matched against variable paths (first match).
            Defaults to `None`.
        global_clipnorm: float or None. Defaults to `1.0`.
        beta_1: float. Defaults to `0.9`.
        beta_2: float. Defaults to `0.999`.
        loss: str or `keras.losses.Loss`. `"sigmoid"` or `"softmax"`, or any
            Keras loss. Defaults to `"sigmoid"`.
        label_smoothing: float in [0, 1). Defaults to `0`.
        from_logits: bool or None. Defaults to `None`: logits unless the
            model has an output `activation`.
        metrics: `"auto"` (top-1 accuracy) or a list. Defaults to `"auto"`.
        gradient_accumulation_steps: int or None. Average the gradients of
            this many consecutive batches into one optimizer update (Keras'
            gradient accumulation): `fit()` with batches of `B / k` images
            and `k` steps makes the updates of batches of `B` images (the
            schedule, Adam's step count and the weight decay count updates,
            not batches). `total_steps` and `warmup_steps` count updates.
            `None` or `1`: one update per batch. Defaults to `None`.
        **compile_kwargs: other `model.compile` arguments
            (`steps_per_execution`, `jit_compile`, ...).

    Returns:
        The model, compiled.

    Example:
    >>> from keras_vmoe.models import from_preset
    >>> model = from_preset("vmoe_softmax_tc_s32_e32_224", num_classes=10,
    ...     image_size=16, patch_size=8, num_layers=2, hidden_dim=16,
    ...     mlp_dim=32, num_heads=2, num_experts=4, group_size=2)
    >>> model = compile_with_recipe(model, "vmoe", total_steps=100)
    >>> model.optimizer.weight_decay_rate_for("head/kernel")
    0.1
    >>> round(float(model.optimizer.learning_rate), 6)  # step 0 of the warmup
    0.0
    """
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)}, got {recipe!r}.")
    rules, default_schedule = RECIPES[recipe]
    lr = make_schedule(
        schedule or default_schedule,
        peak_learning_rate,
        total_steps,
        warmup_steps=warmup_steps,
        end_learning_rate=end_learning_rate,
        timescale=timescale,
        cooldown_steps=cooldown_steps,
    )
    accumulation = _accumulation_steps(gradient_accumulation_steps)
    if accumulation:
        lr = PerUpdate(lr, accumulation)  # Keras calls it with batches
    optimizer = DecoupledWeightDecayAdam(
        lr,
        weight_decay_rules=_weight_decay_rules(rules, weight_decay),
        beta_1=beta_1,
        beta_2=beta_2,
        global_clipnorm=global_clipnorm,
        gradient_accumulation_steps=accumulation,
    )
    if from_logits is None:
        from_logits = getattr(model, "activation", None) is None
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
        cls = SigmoidCrossEntropy if loss == "sigmoid" else SoftmaxCrossEntropy
        loss = cls(from_logits=from_logits, label_smoothing=label_smoothing)
    if metrics == "auto":
        from keras_vmoe.models.vision_moe.image_classifier import Top1Accuracy

        metrics = [Top1Accuracy()]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **compile_kwargs)
    return model


def seed_state_variables(model):
    """The `SeedGenerator` state variables of a model, in a stable order.

    These are `model.variables` that are not `model.weights`: Keras keeps
    them apart, and `save_weights` does not write them.

    Example:
    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))
    >>> [tuple(v.shape) for v in seed_state_variables(model)]
    [(2,)]
    """
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


class BackupAndRestoreWithRNG(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that also restores the RNG state.

    Keras' callback backs up the weights and the optimizer state at the end
    of every epoch and restores them (and the epoch counter) when `fit()`
    starts again. It leaves out the states of the layers' `SeedGenerator`s
    (router noise, dropout), so a resumed run would replay the random
    numbers of the first epochs. This subclass writes those states to
    `seed_generator_states.npz` in `backup_dir` with every backup and
    assigns them back on restore (by position in `seed_state_variables`;
    their count and shapes are checked).

    On the torch backend, Keras draws the dropout masks of layers created
    without an explicit seed from torch's *global* generator (its fused
    dropout cannot be seeded), and Keras' torch data loaders draw from that
    generator too, a varying number of times; such a run cannot be replayed.
    So on torch this callback, when `fit()` starts, switches those layers to
    Keras' seeded dropout path (as if they had been given a seed): their
    masks then come from their own `SeedGenerator`, whose state is backed
    up. Use the callback in the uninterrupted run too, so that both draw
    the same numbers.

    Exact resumption also needs the input data of epoch `k` not to depend on
    how many epochs this process has run: pass `fit()` data whose order is
    fixed, or a stream that starts at `resume_epoch(backup_dir)` (what
    `keras-vmoe train` does).

    Backups are taken at epoch ends only: Keras restores the epoch, not the
    batch, so a mid-epoch backup could not be resumed exactly. Each backup
    is written atomically (a temporary folder renamed into place): a crash
    while saving leaves the previous backup intact.

    Args:
        backup_dir: str. Folder of the backup (used by this callback only).
        delete_checkpoint: bool. Delete the backup when `fit()` completes.
            Defaults to `True`.

    Example:

    ```python
    backup = BackupAndRestoreWithRNG("run/backup")
    try:
        model.fit(x, y, epochs=10, shuffle=False, callbacks=[backup])
    except KeyboardInterrupt:
        pass
    model.fit(x, y, epochs=10, shuffle=False, callbacks=[backup])  # resumes
    ```
    """

    SEEDS_FILE = "seed_generator_states.npz"

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__(
            backup_dir, save_freq="epoch", delete_checkpoint=delete_checkpoint
        )
        self._seeds_path = os.path.join(backup_dir, self.SEEDS_FILE)

    @staticmethod
    def resume_epoch(backup_dir):
        """The epoch a `fit()` with a backup in `backup_dir` starts at (0: none).

        Example:
        >>> BackupAndRestoreWithRNG.resume_epoch("/no/such/folder")
        0
        """
        path = os.path.join(backup_dir, "training_metadata.json")
        weights = os.path.join(backup_dir, "latest.weights.h5")
        if not (os.path.isfile(path) and os.path.isfile(weights)):
            return 0
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["epoch"])

    def on_train_begin(self, logs=None):
        if keras.backend.backend() == "torch":
            use_seeded_dropout(self.model)
        super().on_train_begin(logs)

    def _save_model(self):
        """Writes the backup atomically: weights, epoch and seed states.

        Keras writes the weights file in place, then the epoch; a crash in
        between leaves a truncated file or a mismatched pair. Here all three
        files go into a temporary folder that replaces `backup_dir` when
        complete (`keras_vmoe.utils.atomic`), so the previous backup stays
        usable until the new one is whole.
        """
        from keras_vmoe.utils.atomic import atomic_directory

        states = seed_state_variables(self.model)
        arrays = {
            f"state_{i}": keras.ops.convert_to_numpy(v.value)
            for i, v in enumerate(states)
        }
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        metadata_file = os.path.basename(self._training_metadata_path)
        with atomic_directory(self.backup_dir, marker=metadata_file) as staging:
            np.savez(os.path.join(staging, self.SEEDS_FILE), **arrays)
            self.model.save_weights(
                os.path.join(staging, os.path.basename(self._weights_path))
            )
            with open(os.path.join(staging, metadata_file), "w") as f:
                json.dump(metadata, f)

    def _load_model(self):
        super()._load_model()
        if not (
            os.path.isfile(self._weights_path) and os.path.isfile(self._seeds_path)
        ):
            return
        states = seed_state_variables(self.model)
        with np.load(self._seeds_path) as saved:
            files = [f for f in saved.files if f.startswith("state_")]
            if len(files) != len(states):
                raise ValueError(
                    f"The backup in {self.backup_dir} has {len(files)} "
                    f"random-seed states, the model {len(states)}: it belongs "
                    "to another model."
                )
            for i, variable in enumerate(states):
                value = saved[f"state_{i}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"Random-seed state {i} in {self._seeds_path} has shape "
                        f"{value.shape}, the model's {variable.shape}."
                    )
                variable.assign(value.astype(variable.dtype))


def use_seeded_dropout(model):
    """Makes unseeded random layers draw from their own `SeedGenerator` (torch).

    On the torch backend, `keras.random.dropout` with a `SeedGenerator`
    created without a seed takes torch's global generator (fast path), so
    the layer's saved seed state does not determine its masks. Marking each
    such generator as seeded (with its current state) selects Keras' seeded
    path. Other backends always use the generator; this is then a no-op for
    the numbers drawn.

    Args:
        model: keras.Model.

    Returns:
        int, how many generators were switched.

    Example:
    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))
    >>> use_seeded_dropout(model), use_seeded_dropout(model)
    (1, 0)
    """
    switched = 0
    for layer in model._flatten_layers(include_self=True):
        for generator in getattr(layer, "_seed_generators", ()):
            if getattr(generator, "_initial_seed", 0) is None:
                state = keras.ops.convert_to_numpy(generator.state.value)
                generator._initial_seed = int(state[0])
                switched += 1
    return switched
