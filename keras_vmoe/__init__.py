"""keras_vmoe: Vision Mixture of Experts for Keras 3.

Importing the package registers every public layer and model for Keras
serialization (package "keras_vmoe").
"""

from keras_vmoe import layers, routers

__version__ = "0.1.0"
__all__ = ["layers", "routers"]
