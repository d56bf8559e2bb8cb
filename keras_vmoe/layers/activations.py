"""Activations of the MLPs and experts, by name.

Keras' `"gelu"` is the exact GELU, `x * Phi(x)`. flax's `nn.gelu`, and so
every MLP of google-research/vmoe and vit_jax, defaults to the tanh
approximation, `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`; the two
differ by up to about 1e-3 per unit, enough to move a converted model's
logits visibly. `"gelu_approximate"` names the approximation here.
"""

import keras

_PACKAGE = "keras_vmoe"


@keras.saving.register_keras_serializable(package=_PACKAGE)
def gelu_approximate(x):
    """GELU with the tanh approximation (flax's `nn.gelu` default).

    Example:
    >>> import numpy as np
    >>> y = keras.ops.convert_to_numpy(gelu_approximate(np.array([1.0], "float32")))
    >>> round(float(y[0]), 5)  # exact GELU: 0.84134
    0.84119
    """
    return keras.activations.gelu(x, approximate=True)


# Names accepted besides Keras' own activation names.
ACTIVATIONS = {"gelu_approximate": gelu_approximate}


def get_activation(identifier):
    """An activation function from a name, a Keras config or a callable.

    Args:
        identifier: str, dict or callable. A name from `ACTIVATIONS`
            (`"gelu_approximate"`), any Keras activation name (`"gelu"`,
            `"relu"`, ...) or serialized activation, or a callable.

    Returns:
        callable.

    Raises:
        ValueError: `identifier` names no activation.

    Example:
    >>> get_activation("gelu_approximate") is gelu_approximate
    True
    """
    if isinstance(identifier, str) and identifier in ACTIVATIONS:
        return ACTIVATIONS[identifier]
    try:
        return keras.activations.get(identifier)
    except (ValueError, TypeError):
        raise ValueError(
            "`activation` must be the name of a Keras activation (e.g. 'gelu', "
            f"'relu', 'silu'), one of {sorted(ACTIVATIONS)}, or a callable, got "
            f"{identifier!r}."
        ) from None


def serialize_activation(activation):
    """The config form of an activation: its name for `ACTIVATIONS`.

    Example:
    >>> serialize_activation(gelu_approximate), serialize_activation(keras.activations.gelu)
    ('gelu_approximate', 'gelu')
    """
    for name, function in ACTIVATIONS.items():
        if activation is function:
            return name
    return keras.activations.serialize(activation)
