"""int8 quantization of a small trained V-MoE: accuracy and weight memory.

Run: `KERAS_BACKEND=jax python -m benchmarks.quantization` (any backend).

A V-MoE classifier is trained briefly on the bundled `digits` data (8x8
grey images rescaled to [-1, 1], 1,437 training and 360 test images):
patch 2 (16 patches + class token), width 64, 4 blocks with Softmax Token
Choice MoE blocks 1 and 3 ("every:2"), 8 experts of hidden size 256 (so
the experts hold most of the weights, as in V-MoE), groups of 4 images,
Adam 1e-3, batch 32, 15 epochs. The trained model is then evaluated in
float32 and after `model.quantize("int8")`, once with every quantizable
layer (attention, dense MLPs, experts, head) and once with the experts
only (`filters=`). "weights MiB" is the size of all the model's variables
(int8 kernels count one byte per value, their float32 scales four);
"agreement" the share of test images whose predicted class is unchanged;
"max logit change" the largest |int8 - float32| logit over the test set,
relative to the largest float32 logit.
"""

import keras
import numpy as np

from benchmarks.common import markdown_table
from keras_vmoe.data.bundled import bundled_arrays
from keras_vmoe.layers import MlpExperts
from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier

COLUMNS = (
    "model",
    "test accuracy",
    "agreement",
    "max logit change",
    "weights MiB",
    "memory ratio",
    "expert share",
)
EPOCHS, BATCH = 15, 32


def load(split):
    images, labels = bundled_arrays("digits", split)
    return images.astype("float32") / 127.5 - 1.0, labels


def make_model():
    backbone = VisionMoEBackbone(
        image_shape=(8, 8, 1),
        patch_size=2,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=256,
        router="softmax_token_choice",
        num_experts=8,
        group_size=4,
    )
    return VisionMoEImageClassifier(backbone, num_classes=10)


def weight_bytes(model):
    return sum(
        int(np.prod(v.shape))
        * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in model.weights
    )


def expert_bytes(model):
    return sum(
        weight_bytes(layer)
        for layer in model._flatten_layers()
        if isinstance(layer, MlpExperts)
    )


def evaluate(model, images, labels):
    # Batches of 40 = 10 routing groups; 360 test images = 9 batches.
    logits = np.asarray(model.predict(images, batch_size=40, verbose=0), "float32")
    return logits, float((logits.argmax(-1) == labels).mean())


def run(epochs=EPOCHS):
    keras.utils.set_random_seed(0)
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    # Whole batches of whole routing groups: 1,437 -> 1,408 = 44 x 32.
    keep = len(x_train) // BATCH * BATCH
    model = make_model()
    model.fit(
        x_train[:keep], y_train[:keep], batch_size=BATCH, epochs=epochs, verbose=0
    )
    weights = model.get_weights()
    float_logits, float_accuracy = evaluate(model, x_test, y_test)
    float_bytes = weight_bytes(model)
    rows = [
        _row("float32", float_accuracy, float_logits, float_logits, model, float_bytes)
    ]
    for name, filters in (
        ("int8, experts only", lambda layer: isinstance(layer, MlpExperts)),
        ("int8, all quantizable layers", None),
    ):
        quantized = make_model()
        quantized.set_weights(weights)
        quantized.quantize("int8", filters=filters)
        logits, accuracy = evaluate(quantized, x_test, y_test)
        rows.append(_row(name, accuracy, logits, float_logits, quantized, float_bytes))
    return rows


def _row(name, accuracy, logits, float_logits, model, float_bytes):
    size = weight_bytes(model)
    return {
        "model": name,
        "test accuracy": accuracy,
        "agreement": float((logits.argmax(-1) == float_logits.argmax(-1)).mean()),
        "max logit change": float(
            np.abs(logits - float_logits).max() / np.abs(float_logits).max()
        ),
        "weights MiB": size / 2**20,
        "memory ratio": size / float_bytes,
        "expert share": expert_bytes(model) / size,
    }


if __name__ == "__main__":
    print(markdown_table(run(), COLUMNS))
