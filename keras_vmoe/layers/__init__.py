"""Layers: the MoE layer and its experts."""

from keras_vmoe.layers.activations import gelu_approximate, get_activation
from keras_vmoe.layers.experts import ExpertGlorotUniform, MlpExperts
from keras_vmoe.layers.moe import MoE

__all__ = [
    "ExpertGlorotUniform",
    "MlpExperts",
    "MoE",
    "gelu_approximate",
    "get_activation",
]
