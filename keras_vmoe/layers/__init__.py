"""Layers: the MoE layer and its experts."""

from keras_vmoe.layers.experts import ExpertGlorotUniform, MlpExperts
from keras_vmoe.layers.moe import MoE

__all__ = ["ExpertGlorotUniform", "MlpExperts", "MoE"]
