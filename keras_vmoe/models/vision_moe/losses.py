"""Classification cross-entropy: softmax or sigmoid, integer or dense labels.

The one implementation behind every classification loss of the package:
the classifier's default `compile()` loss (`ClassificationCrossEntropy`)
and the recipes' `SigmoidCrossEntropy` and `SoftmaxCrossEntropy`
(`keras_vmoe.training.losses`), which only fix `loss_type`.
"""

import keras
from keras import ops

from keras_vmoe.utils.checks import check_rate

LOSS_TYPES = ("softmax", "sigmoid")


def is_sparse_labels(y_true, y_pred):
    """Whether `y_true` holds integer class ids rather than dense targets.

    Class ids have a lower rank than the predictions, or a trailing axis of
    1 where the predictions have more than one class.

    Example:
    >>> import numpy as np
    >>> logits = np.zeros((2, 3), "float32")
    >>> is_sparse_labels(np.array([0, 2]), logits)
    True
    >>> is_sparse_labels(np.eye(3, dtype="float32")[:2], logits)
    False
    """
    y_true = ops.convert_to_tensor(y_true)
    true_shape, pred_shape = ops.shape(y_true), ops.shape(y_pred)
    if len(true_shape) < len(pred_shape):
        return True
    return true_shape[-1] == 1 and pred_shape[-1] != 1


def dense_targets(y_true, y_pred):
    """`y_true` as dense targets of `y_pred`'s shape and dtype (ids one-hot)."""
    y_true = ops.convert_to_tensor(y_true)
    if is_sparse_labels(y_true, y_pred):
        ids = ops.reshape(ops.cast(y_true, "int32"), ops.shape(y_pred)[:-1])
        return ops.one_hot(ids, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
    return ops.cast(y_true, y_pred.dtype)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ClassificationCrossEntropy(keras.losses.Loss):
    """Softmax or sigmoid cross-entropy for integer or one/multi-hot labels.

    `"softmax"`: categorical cross-entropy. `"sigmoid"`: the sum over classes
    of per-class binary cross-entropies (big_vision / V-MoE `sigmoid_xent`;
    a sum, not the mean of `keras.losses.BinaryCrossentropy`). Labels may be
    integer class ids `(B,)` / `(B, 1)` or dense targets `(B, num_classes)`;
    both give the same value for one-hot targets. Predictions are cast to
    float32 first (bfloat16 heads).

    Args:
        loss_type: str. `"softmax"` or `"sigmoid"`. Defaults to `"softmax"`.
        from_logits: bool. Whether predictions are logits. Defaults to `True`.
        label_smoothing: float in [0, 1). Targets become
            `y * (1 - label_smoothing) + label_smoothing / num_classes`.
            Defaults to `0`.
        **kwargs: `keras.losses.Loss` arguments (`reduction`, `name`).
            The name defaults to `"<loss_type>_cross_entropy"`.

    Example:
    >>> loss = ClassificationCrossEntropy("sigmoid")
    >>> round(float(loss([1], [[0.0, 0.0]])), 4)  # 2 * log(2)
    1.3863
    >>> loss = ClassificationCrossEntropy("softmax", label_smoothing=0.1)
    >>> round(float(loss([1], [[0.0, 0.0, 0.0, 0.0]])), 4)  # log(4)
    1.3863
    """

    def __init__(
        self, loss_type="softmax", from_logits=True, label_smoothing=0.0, **kwargs
    ):
        kwargs.setdefault("name", f"{loss_type}_cross_entropy")
        super().__init__(**kwargs)
        if loss_type not in LOSS_TYPES:
            raise ValueError(
                f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}."
            )
        self.loss_type = loss_type
        self.from_logits = bool(from_logits)
        self.label_smoothing = check_rate("label_smoothing", label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        targets = dense_targets(y_true, y_pred)
        if self.loss_type == "softmax":
            return keras.losses.categorical_crossentropy(
                targets,
                y_pred,
                from_logits=self.from_logits,
                label_smoothing=self.label_smoothing,
            )
        if self.label_smoothing:
            num_classes = ops.shape(y_pred)[-1]
            smoothing = self.label_smoothing
            targets = targets * (1 - smoothing) + smoothing / num_classes
        per_class = ops.binary_crossentropy(
            targets, y_pred, from_logits=self.from_logits
        )
        return ops.sum(per_class, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "loss_type": self.loss_type,
                "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing,
            }
        )
        return config
