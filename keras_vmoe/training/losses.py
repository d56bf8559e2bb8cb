"""Classification losses of the recipes.

Both are `keras_vmoe.models.ClassificationCrossEntropy` with the loss type
fixed (one implementation, `keras_vmoe/models/losses.py`); they stay
separate registered classes so that `compile_with_recipe(loss="sigmoid" |
"softmax")`, presets and saved `.keras` files keep their names.
"""

import keras

from keras_vmoe.models.vision_moe.losses import ClassificationCrossEntropy


class _FixedTypeCrossEntropy(ClassificationCrossEntropy):
    """`ClassificationCrossEntropy` whose `loss_type` is the class's."""

    LOSS_TYPE = None

    def __init__(self, from_logits=True, label_smoothing=0.0, name=None, **kwargs):
        super().__init__(
            self.LOSS_TYPE,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            name=name or f"{self.LOSS_TYPE}_cross_entropy",
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        del config["loss_type"]
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SigmoidCrossEntropy(_FixedTypeCrossEntropy):
    """Sigmoid cross-entropy summed over classes, averaged over examples.

    The V-MoE recipe's loss: each class is an independent binary problem,
    and the per-example loss is the sum over classes (not the mean, as in
    `keras.losses.BinaryCrossentropy`). Same as
    `ClassificationCrossEntropy("sigmoid", ...)`.

    Args:
        from_logits: bool. Whether predictions are logits. Defaults to `True`.
        label_smoothing: float in [0, 1). Targets become
            `y * (1 - label_smoothing) + label_smoothing / num_classes`.
            Defaults to `0`.
        name: str or None. Defaults to `"sigmoid_cross_entropy"`.
        **kwargs: `keras.losses.Loss` arguments (`reduction`).

    Labels may be one-hot `(batch, classes)` or integer class ids `(batch,)`.

    Example:
    >>> import numpy as np
    >>> loss = SigmoidCrossEntropy()
    >>> round(float(loss(np.array([1]), np.zeros((1, 2), "float32"))), 4)  # 2 * log 2
    1.3863
    """

    LOSS_TYPE = "sigmoid"


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftmaxCrossEntropy(_FixedTypeCrossEntropy):
    """Softmax cross-entropy for integer or one-hot labels, with smoothing.

    Keras' `SparseCategoricalCrossentropy` has no label smoothing and
    `CategoricalCrossentropy` needs one-hot labels; this takes both. Same as
    `ClassificationCrossEntropy("softmax", ...)`.

    Args:
        from_logits: bool. Whether predictions are logits. Defaults to `True`.
        label_smoothing: float in [0, 1). Targets become
            `y * (1 - label_smoothing) + label_smoothing / num_classes`.
            Defaults to `0`.
        name: str or None. Defaults to `"softmax_cross_entropy"`.
        **kwargs: `keras.losses.Loss` arguments (`reduction`).

    Example:
    >>> import numpy as np
    >>> loss = SoftmaxCrossEntropy()
    >>> round(float(loss(np.array([1]), np.zeros((1, 4), "float32"))), 4)  # log 4
    1.3863
    """

    LOSS_TYPE = "softmax"
