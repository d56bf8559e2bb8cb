"""Learning-rate schedules of the V-MoE and Soft MoE recipes.

Both start with a linear warmup from 0 to the peak rate, then:
- `WarmupLinearDecay` (V-MoE): linear decay to `end_learning_rate` at
  `total_steps`.
- `WarmupRsqrtCooldown` (Soft MoE): inverse square root decay with time
  scale `timescale`, and a linear cooldown to 0 over the last
  `cooldown_steps`.
`PerUpdate` wraps a schedule for gradient accumulation (its steps are
optimizer updates, not batches).
For warmup then cosine decay use Keras' own
`keras.optimizers.schedules.CosineDecay(0.0, decay_steps, warmup_target=peak,
warmup_steps=...)`; `warmup_cosine()` below builds it.
"""

import keras
from keras import ops

from keras_vmoe.utils.checks import (
    check_non_negative,
    check_positive_float,
    check_positive_int,
)


def _check(name, value, minimum=0):
    return check_positive_int(name, value, minimum)


def _warmup(step, warmup_steps):
    if warmup_steps == 0:
        return 1.0
    return ops.minimum(1.0, step / warmup_steps)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_learning_rate`, then linear decay to an end value.

    For `step <= warmup_steps`: `peak * step / warmup_steps`. After it, with
    `progress = (step - warmup) / (total - warmup)` clipped to [0, 1]:
    `end + (peak - end) * (1 - progress)`.

    Args:
        peak_learning_rate: float > 0. The rate at the end of the warmup.
        total_steps: int >= 1. Steps of the whole run.
        warmup_steps: int >= 0, less than `total_steps`. Defaults to 10000
            (V-MoE).
        end_learning_rate: float >= 0. Defaults to 1e-5 (V-MoE).

    Example:
    >>> schedule = WarmupLinearDecay(1e-3, total_steps=100, warmup_steps=10)
    >>> round(float(schedule(5)), 6)  # halfway through the warmup
    0.0005
    """

    def __init__(
        self,
        peak_learning_rate,
        total_steps,
        warmup_steps=10_000,
        end_learning_rate=1e-5,
    ):
        self.peak_learning_rate = check_positive_float(
            "peak_learning_rate", peak_learning_rate
        )
        self.total_steps = _check("total_steps", total_steps, 1)
        self.warmup_steps = _check("warmup_steps", warmup_steps)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"`warmup_steps` ({warmup_steps}) must be less than `total_steps` "
                f"({total_steps})."
            )
        self.end_learning_rate = check_non_negative(
            "end_learning_rate", end_learning_rate
        )

    def __call__(self, step):
        step = ops.cast(step, "float32")
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        progress = ops.clip(progress, 0.0, 1.0)
        peak, end = self.peak_learning_rate, self.end_learning_rate
        decayed = end + (peak - end) * (1.0 - progress)
        return ops.where(
            step < self.warmup_steps, peak * _warmup(step, self.warmup_steps), decayed
        )

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "end_learning_rate": self.end_learning_rate,
        }


@keras.saving.register_keras_serializable(package="keras_vmoe")
class WarmupRsqrtCooldown(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, inverse square root decay, linear cooldown to zero.

    `lr(step) = peak * w(step) * r(step) * c(step)` with
    - warmup `w = min(1, step / warmup_steps)`;
    - decay `r = sqrt(timescale / (step - warmup_steps + timescale))` after
      the warmup (1 during it);
    - cooldown `c = min(1, (total_steps - step) / cooldown_steps)`.

    Args:
        peak_learning_rate: float.
        total_steps: int.
        warmup_steps: int. Defaults to 10000.
        timescale: int. Defaults to 10000.
        cooldown_steps: int. Defaults to 50000 (0 for none).

    Example:
    >>> schedule = WarmupRsqrtCooldown(1.0, 400, warmup_steps=100,
    ...                                timescale=100, cooldown_steps=100)
    >>> round(float(schedule(400 - 100)), 4)  # 1/sqrt(3), cooldown starts
    0.5774
    """

    def __init__(
        self,
        peak_learning_rate,
        total_steps,
        warmup_steps=10_000,
        timescale=10_000,
        cooldown_steps=50_000,
    ):
        self.peak_learning_rate = check_positive_float(
            "peak_learning_rate", peak_learning_rate
        )
        self.total_steps = _check("total_steps", total_steps, 1)
        self.warmup_steps = _check("warmup_steps", warmup_steps)
        self.timescale = _check("timescale", timescale, 1)
        self.cooldown_steps = _check("cooldown_steps", cooldown_steps)
        if self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise ValueError(
                f"`warmup_steps` + `cooldown_steps` ({warmup_steps} + {cooldown_steps}) "
                f"must not exceed `total_steps` ({total_steps})."
            )

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = self.peak_learning_rate * _warmup(step, self.warmup_steps)
        after = ops.maximum(step - self.warmup_steps, 0.0)
        lr = lr * ops.sqrt(self.timescale / (after + self.timescale))
        if self.cooldown_steps:
            lr = lr * ops.clip(
                (self.total_steps - step) / self.cooldown_steps, 0.0, 1.0
            )
        return lr

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "timescale": self.timescale,
            "cooldown_steps": self.cooldown_steps,
        }


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule over optimizer updates, for gradient accumulation.

    With `gradient_accumulation_steps=k`, a Keras optimizer updates the
    weights every `k` batches but calls its learning-rate schedule with the
    count of batches. This wrapper calls `schedule(batches // k)`, so the
    `k` batches of update `u` all see `schedule(u)`: the schedule runs over
    updates, as without accumulation.

    Args:
        schedule: `LearningRateSchedule` over updates.
        accumulation_steps: int >= 1. Batches per update (`k`).

    Example (a warmup over 10 updates; update 1 is batches 4 to 7):
    >>> schedule = PerUpdate(WarmupLinearDecay(1e-3, 100, 10), 4)
    >>> [round(float(schedule(b)), 6) for b in (3, 4, 7, 8)]
    [0.0, 0.0001, 0.0001, 0.0002]
    """

    def __init__(self, schedule, accumulation_steps):
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                "`schedule` must be a keras LearningRateSchedule, got "
                f"{type(schedule).__name__}."
            )
        self.schedule = schedule
        self.accumulation_steps = _check("accumulation_steps", accumulation_steps, 1)

    def __call__(self, step):
        return self.schedule(ops.floor_divide(step, self.accumulation_steps))

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def warmup_cosine(
    peak_learning_rate, total_steps, warmup_steps=10_000, end_fraction=0.0
):
    """Linear warmup to the peak, then cosine decay (Keras' `CosineDecay`).

    Args:
        peak_learning_rate: float.
        total_steps: int.
        warmup_steps: int. Defaults to 10000.
        end_fraction: float in [0, 1]. Final rate as a fraction of the peak.
            Defaults to 0.
    """
    check_positive_float("peak_learning_rate", peak_learning_rate)
    warmup_steps = _check("warmup_steps", warmup_steps)
    total_steps = _check("total_steps", total_steps, warmup_steps + 1)
    if not check_non_negative("end_fraction", end_fraction) <= 1:
        raise ValueError(f"`end_fraction` must be in [0, 1], got {end_fraction!r}.")
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=total_steps - warmup_steps,
        alpha=end_fraction,
        warmup_target=peak_learning_rate,
        warmup_steps=warmup_steps,
    )
