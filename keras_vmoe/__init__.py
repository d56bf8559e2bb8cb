"""keras_vmoe: Vision Mixture of Experts for Keras 3.

Importing the package registers every public layer and model for Keras
serialization (package "keras_vmoe").
"""

import os

# TensorFlow's C++ start-up chatter hides the useful output; keep a user's
# own setting if there is one.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_vmoe import (  # noqa: E402
    callbacks,
    data,
    distribution,
    evaluation,
    layers,
    models,
    ot,
    routers,
    training,
)

__version__ = "0.1.0"
__all__ = [
    "callbacks",
    "data",
    "distribution",
    "evaluation",
    "layers",
    "models",
    "ot",
    "routers",
    "training",
]
