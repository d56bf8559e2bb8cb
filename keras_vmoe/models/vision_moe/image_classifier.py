"""`VisionMoEImageClassifier`: pooled V-MoE features -> pre-logits -> head."""

import math
import numbers

import keras
from keras import ops
from keras_hub.models import ImageClassifier
from keras_hub.src.models.task import Task

from keras_vmoe.models import preset_loader
from keras_vmoe.models.vision_moe.backbone import VisionMoEBackbone
from keras_vmoe.models.vision_moe.image_classifier_preprocessor import (
    VisionMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vision_moe.losses import (
    LOSS_TYPES,
    ClassificationCrossEntropy,
    is_sparse_labels,
)
from keras_vmoe.utils.atomic import atomic_preset_save
from keras_vmoe.utils.checks import check_positive_int, check_rate

_ACTIVATIONS = (None, "softmax", "sigmoid")


def top1_accuracy(y_true, y_pred):
    """1.0 where the arg-max prediction is the (arg-max) label, else 0.0."""
    y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
    if is_sparse_labels(y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), ops.shape(y_pred)[:-1])
    else:
        labels = ops.cast(ops.argmax(y_true, axis=-1), "int32")
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    return ops.cast(ops.equal(labels, predicted), "float32")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class Top1Accuracy(keras.metrics.MeanMetricWrapper):
    """Top-1 accuracy for integer or one/multi-hot labels.

    Example:
    >>> m = Top1Accuracy()
    >>> m.update_state([1, 0], [[0.1, 0.9], [0.2, 0.8]])
    >>> float(m.result())
    0.5
    """

    def __init__(self, name="accuracy", dtype=None):
        super().__init__(fn=top1_accuracy, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def _check_dtype_is_the_backbones(dtype, backbone):
    """A ValueError unless `dtype` is None or the backbone's policy."""
    if dtype is None or not isinstance(backbone, keras.Model):
        return
    policy = keras.dtype_policies.get(dtype)
    serialize = keras.dtype_policies.serialize
    if serialize(policy) != serialize(backbone.dtype_policy):
        raise ValueError(
            f"`dtype={policy.name!r}` differs from the backbone's dtype policy "
            f"{backbone.dtype_policy.name!r}; the classifier computes in its "
            "backbone's policy. Build the backbone with that `dtype` (or "
            "`from_preset(..., dtype=...)`), and give `head_dtype` for the head."
        )


def _layer_policy(layer):
    """The layer's own dtype policy (its entry when it has a policy map)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path]
    return policy


@keras.saving.register_keras_serializable(package="keras_vmoe")
@atomic_preset_save
class VisionMoEImageClassifier(ImageClassifier):
    """Image classifier on a `VisionMoEBackbone` (V-MoE head).

    Pooled backbone features go through an optional pre-logits layer
    (`Dense(representation_size)` + tanh), dropout, and a linear head
    `Dense(num_classes)` with a zero-initialised kernel, as in
    google-research/vmoe. The pre-logits layer is always named
    `"pre_logits"` (an identity layer when `representation_size` is None):
    few-shot evaluation reads its output.

    The default `compile()` uses Adam, the cross-entropy that matches the
    head (`loss_type`) and top-1 accuracy; labels may be integer ids or
    one/multi-hot vectors. Keras adds the MoE layers' auxiliary losses
    (`model.losses`) to the compiled loss in `fit()`.

    Args:
        backbone: `VisionMoEBackbone`. The feature extractor.
        num_classes: int. Number of classes.
        preprocessor: `VisionMoEImageClassifierPreprocessor` or None. Run
            on the inputs of `fit`, `evaluate` and `predict` (raw images in,
            resized and scaled to [-1, 1] out); `None` feeds the inputs to
            the backbone as they are (already preprocessed, e.g. by the
            `keras_vmoe.data` pipelines). `from_preset` restores the preset's.
            Defaults to `None`.
        representation_size: int or None. Size of the pre-logits Dense + tanh;
            `None` for none (identity). Defaults to `None`.
        activation: `None`, `"softmax"` or `"sigmoid"`. Output activation;
            `None` returns logits. Defaults to `None`.
        loss_type: `None`, `"softmax"` or `"sigmoid"`. The training loss of
            the default `compile()`. Defaults to `None`: the activation's
            family, softmax for logits.
        head_bias_init: float or None. Initial head bias. Defaults to
            `None`: `-log(num_classes)` for sigmoid heads (V-MoE recipe, so
            every class starts at probability ~1/num_classes), else 0.
        dropout: float. Dropout before the head. Defaults to `0.0`.
        head_dtype: `None`, str or `keras.DTypePolicy`. Dtype of the head.
            Defaults to the backbone's.
        **kwargs: `keras_hub.models.Task` arguments (`name`, `compile`).
            A `dtype` must be the backbone's own policy: the classifier
            computes in the backbone's policy (build the backbone with
            `dtype=`, or `from_preset(..., dtype=...)`).

    Example:
    >>> import numpy as np
    >>> backbone = VisionMoEBackbone(
    ...     image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2,
    ...     hidden_dim=16, mlp_dim=32)
    >>> model = VisionMoEImageClassifier(backbone, num_classes=3,
    ...     representation_size=16, loss_type="sigmoid")
    >>> x = np.random.rand(4, 16, 16, 3).astype("float32")
    >>> history = model.fit(x, np.array([0, 1, 2, 1]), epochs=1, verbose=0)
    >>> tuple(model.predict(x, verbose=0).shape)
    (4, 3)
    """

    backbone_cls = VisionMoEBackbone
    preprocessor_cls = VisionMoEImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        representation_size=None,
        activation=None,
        loss_type=None,
        head_bias_init=None,
        dropout=0.0,
        head_dtype=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "vision_moe_image_classifier")
        _check_dtype_is_the_backbones(kwargs.pop("dtype", None), backbone)
        if not isinstance(backbone, VisionMoEBackbone):
            raise ValueError(
                f"`backbone` must be a VisionMoEBackbone, got {backbone!r}."
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {_ACTIVATIONS}, got {activation!r}."
            )
        resolved_loss = loss_type or activation or "softmax"
        if resolved_loss not in LOSS_TYPES:
            raise ValueError(
                f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}."
            )
        if activation is not None and activation != resolved_loss:
            raise ValueError(
                f"`activation={activation!r}` does not match `loss_type={loss_type!r}`."
            )
        check_positive_int("num_classes", num_classes)
        if representation_size is not None:
            check_positive_int("representation_size", representation_size)
        check_rate("dropout", dropout)
        if head_bias_init is not None and not (
            isinstance(head_bias_init, numbers.Real)
            and not isinstance(head_bias_init, bool)
            and math.isfinite(head_bias_init)
        ):
            raise ValueError(
                f"`head_bias_init` must be a finite number or None, got "
                f"{head_bias_init!r}."
            )
        bias = head_bias_init
        if bias is None:
            bias = -math.log(num_classes) if resolved_loss == "sigmoid" else 0.0
        # The argument as given, for get_config (a policy serialized to JSON).
        if isinstance(head_dtype, dict):  # a serialized policy (map)
            head_dtype = keras.dtype_policies.get(head_dtype)
        head_dtype_config = head_dtype
        if isinstance(head_dtype, keras.DTypePolicy):
            head_dtype_config = keras.dtype_policies.serialize(head_dtype)
        head_dtype = head_dtype or backbone.dtype_policy

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        if representation_size is None:
            self.pre_logits = keras.layers.Identity(dtype=head_dtype, name="pre_logits")
        else:
            self.pre_logits = keras.layers.Dense(
                representation_size,
                activation="tanh",
                kernel_initializer="lecun_normal",
                dtype=head_dtype,
                name="pre_logits",
            )
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=head_dtype, name="output_dropout"
        )
        self.head = keras.layers.Dense(
            num_classes,
            activation=activation,
            kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(bias),
            dtype=head_dtype,
            name="head",
        )

        # === Functional model ===
        inputs = self.backbone.input
        features = self.backbone(inputs)["pooled_output"]
        x = self.pre_logits(features)
        x = self.output_dropout(x)
        outputs = self.head(x)
        # Read by the default compile() that Task.__init__ runs.
        self.activation = activation
        self.resolved_loss_type = resolved_loss
        # Skip ImageClassifier.__init__ (it builds its own 2D pooling head).
        Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.representation_size = representation_size
        self.activation = activation
        self.loss_type = loss_type
        self.head_bias_init = head_bias_init
        self.dropout = dropout
        self.head_dtype = head_dtype  # The resolved policy (keras-hub's).
        self._head_dtype_config = head_dtype_config

    def get_config(self):
        config = Task.get_config(self)
        config.update(
            {
                "num_classes": self.num_classes,
                "representation_size": self.representation_size,
                "activation": self.activation,
                "loss_type": self.loss_type,
                "head_bias_init": self.head_bias_init,
                "dropout": self.dropout,
                "head_dtype": self._head_dtype_for_config(),
            }
        )
        return config

    def _head_dtype_for_config(self):
        """`head_dtype` as given, or a policy map naming the quantized heads.

        After `quantize("int8")` the pre-logits and head layers hold int8
        kernels; a `DTypePolicyMap` with their quantized policies (by path)
        makes `from_config` build them quantized, so the weights load (the
        backbone records its own quantized layers the same way).
        """
        quantized = {
            layer.path: _layer_policy(layer)
            for layer in (self.pre_logits, self.head)
            if layer.quantization_mode is not None
        }
        if not quantized:
            return self._head_dtype_config
        default = self.head_dtype
        if isinstance(default, keras.dtype_policies.DTypePolicyMap):
            default = default.default_policy
        policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=default)
        for path, policy in quantized.items():
            policy_map[path] = policy
        return keras.dtype_policies.serialize(policy_map)

    def compile(self, optimizer="auto", loss="auto", *, metrics="auto", **kwargs):
        """Configures training; `"auto"` picks working defaults.

        Args:
            optimizer: `"auto"` (Adam, learning rate 1e-3) or any Keras
                optimizer.
            loss: `"auto"` (`ClassificationCrossEntropy` matching the head)
                or any Keras loss.
            metrics: `"auto"` (`Top1Accuracy`) or a list of metrics.
            **kwargs: Other `keras.Model.compile` arguments.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-3)
        if loss == "auto":
            loss = ClassificationCrossEntropy(
                self.resolved_loss_type, from_logits=self.activation is None
            )
        if metrics == "auto":
            metrics = [Top1Accuracy()]
        Task.compile(self, optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Restores the compile settings saved in a `.keras` file."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a classifier from a built-in preset name or a preset folder.

        Args:
            preset: str. A name from `keras_vmoe.models.list_presets()` or a
                local preset directory.
            load_weights: bool. Load saved weights when present. Defaults
                to `True`.
            **kwargs: Overrides of backbone or classifier arguments
                (`num_classes`, `image_size`, `router`, `num_experts`, ...).

        Example:
        >>> model = VisionMoEImageClassifier.from_preset(
        ...     "vit_dense_s32_224", num_classes=5, image_size=32,
        ...     num_layers=1, hidden_dim=16, mlp_dim=32, num_heads=2)
        >>> model.num_classes
        5
        """
        return preset_loader.load_classifier(
            preset, load_weights=load_weights, cls=cls, **kwargs
        )
