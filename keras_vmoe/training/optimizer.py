"""Adam with decoupled weight decay chosen per variable by pattern.

Keras' `AdamW` decays every variable at one rate (minus an exclusion list).
The V-MoE and Soft MoE recipes decay only kernels, and Soft MoE decays the
head and the router `scale` at their own rates, so this optimizer takes
rules: `[(regex, rate), ...]`, matched against each variable's path (first
match wins; no match: no decay). The update is Keras' decoupled form
`w <- w - lr * rate * w`, applied before the Adam step, as in the
reference's optax chain.
"""

import numbers
import re

import keras
import numpy as np

from keras_vmoe.utils.checks import check_positive_float

# V-MoE: 0.1 on every kernel (dense, conv, expert and gating kernels).
VMOE_WEIGHT_DECAY = ((r"kernel$", 0.1),)
# Soft MoE: 3.0 on the classification head, 0.03 on other kernels and on the
# Soft MoE router's scale.
SOFT_MOE_WEIGHT_DECAY = (
    (r"(^|/)head/kernel$", 3.0),
    (r"kernel$", 0.03),
    (r"(^|/)scale$", 0.03),
)


def _check_hyperparameter(name, value, accepted, low, high):
    """Raises a ValueError naming `name` for a bad number (or a non-number).

    A callable (e.g. a learning-rate schedule) or a tensor is left to Keras.
    Numbers must be > `low` (>= `low` when `high` is given) and < `high`.
    """
    if callable(value) or hasattr(value, "dtype") and not np.isscalar(value):
        return
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        valid = low <= value < high if high is not None else value > low
    else:
        valid = False
    if not valid:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class DecoupledWeightDecayAdam(keras.optimizers.Adam):
    """Adam with per-pattern decoupled weight decay.

    Args:
        learning_rate: float or schedule. Defaults to 1e-3.
        weight_decay_rules: sequence of `(regex, rate)`. A variable decays
            at the rate of the first regex that `re.search`es its `path`
            (e.g. `"vmoe_backbone/encoder_block_1/moe/experts/output_kernel"`).
            Defaults to `VMOE_WEIGHT_DECAY` (0.1 on kernels).
        beta_1, beta_2, epsilon: Adam parameters. Defaults to 0.9, 0.999,
            1e-8.
        global_clipnorm: float. Clip gradients to this global norm.
            Defaults to 1.0.
        **kwargs: other `keras.optimizers.Optimizer` arguments.

    Example:
    >>> opt = DecoupledWeightDecayAdam(1e-3, weight_decay_rules=[("kernel$", 0.1)])
    >>> opt.weight_decay_rate_for("block/dense/kernel"), opt.weight_decay_rate_for("block/dense/bias")
    (0.1, 0.0)
    """

    def __init__(
        self,
        learning_rate=1e-3,
        weight_decay_rules=VMOE_WEIGHT_DECAY,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        global_clipnorm=1.0,
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        # Keras also takes tensors and callables for these: check numbers only.
        _check_hyperparameter("learning_rate", learning_rate, "a number > 0", 0, None)
        _check_hyperparameter("beta_1", beta_1, "a number in [0, 1)", 0, 1)
        _check_hyperparameter("beta_2", beta_2, "a number in [0, 1)", 0, 1)
        _check_hyperparameter("epsilon", epsilon, "a number > 0", 0, None)
        if global_clipnorm is not None:
            check_positive_float("global_clipnorm", global_clipnorm)
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            global_clipnorm=global_clipnorm,
            **kwargs,
        )
        if isinstance(weight_decay_rules, str):
            raise ValueError(
                "`weight_decay_rules` must be a sequence of (regex, rate >= 0) "
                f"pairs, got the string {weight_decay_rules!r}."
            )
        rules = []
        for rule in weight_decay_rules or ():
            if (
                not isinstance(rule, (tuple, list))
                or len(rule) != 2
                or not isinstance(rule[0], str)
                or not isinstance(rule[1], numbers.Real)
                or isinstance(rule[1], bool)
                or not rule[1] >= 0
            ):
                raise ValueError(
                    "`weight_decay_rules` must be (regex, rate >= 0) pairs, got "
                    f"{rule!r}."
                )
            try:
                rules.append((re.compile(rule[0]), float(rule[1])))
            except re.error as error:
                raise ValueError(
                    f"`weight_decay_rules` has a bad regex {rule[0]!r}: {error}."
                ) from None
        self._rules = rules

    def weight_decay_rate_for(self, path):
        """The decay rate of a variable with this path."""
        for pattern, rate in self._rules:
            if pattern.search(path):
                return rate
        return 0.0

    def _apply_weight_decay(self, variables):
        by_rate = {}
        for variable in variables:
            rate = self.weight_decay_rate_for(variable.path)
            if rate > 0:
                by_rate.setdefault(rate, []).append(variable)
        # Keras' own decay step (one per backend, distribution-aware) runs
        # once per rate on the variables that share it.
        for rate, group in by_rate.items():
            self.weight_decay = rate
            try:
                super()._apply_weight_decay(group)
            finally:
                self.weight_decay = None

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config["weight_decay_rules"] = [[p.pattern, r] for p, r in self._rules]
        return config
