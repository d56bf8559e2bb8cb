"""Classification losses of the recipes."""

import keras
from keras import ops

from keras_vmoe.routers.base import check_rate


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SigmoidCrossEntropy(keras.losses.Loss):
    """Sigmoid cross-entropy summed over classes, averaged over examples.

    The V-MoE recipe's loss: each class is an independent binary problem,
    and the per-example loss is the sum over classes (not the mean, as in
    `keras.losses.BinaryCrossentropy`).

    Args:
        from_logits: bool. Whether predictions are logits. Defaults to `True`.
        label_smoothing: float. Targets become
            `y * (1 - label_smoothing) + label_smoothing / num_classes`.
            Defaults to 0.
        **kwargs: `keras.losses.Loss` arguments (`name`, `reduction`).

    Labels may be one-hot `(batch, classes)` or integer class ids `(batch,)`.

    Example:
    >>> import numpy as np
    >>> loss = SigmoidCrossEntropy()
    >>> round(float(loss(np.array([1]), np.zeros((1, 2), "float32"))), 4)  # 2 * log 2
    1.3863
    """

    def __init__(
        self,
        from_logits=True,
        label_smoothing=0.0,
        name="sigmoid_cross_entropy",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = check_rate("label_smoothing", label_smoothing)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        num_classes = ops.shape(y_pred)[-1]
        y_true = ops.convert_to_tensor(y_true)
        if (
            len(y_true.shape) == len(y_pred.shape) - 1
            or y_true.shape[-1] != num_classes
        ):
            y_true = ops.one_hot(
                ops.cast(ops.reshape(y_true, (-1,)), "int32"), num_classes
            )
        y_true = ops.cast(y_true, "float32")
        if self.label_smoothing:
            y_true = (
                y_true * (1 - self.label_smoothing) + self.label_smoothing / num_classes
            )
        per_class = keras.losses.binary_crossentropy(
            y_true[..., None], y_pred[..., None], from_logits=self.from_logits
        )  # (batch, classes)
        return ops.sum(per_class, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"from_logits": self.from_logits, "label_smoothing": self.label_smoothing}
        )
        return config
