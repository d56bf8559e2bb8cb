"""Sharding V-MoE models with `keras.distribution` (JAX).

The public entry point for expert parallelism. The layout itself belongs to
the V-MoE family and lives beside its backbone
(`keras_vmoe.models.vision_moe.layout_map`, also
`VisionMoEBackbone.get_layout_map`); see that module for what is sharded.
"""

from keras_vmoe.models.vision_moe.layout_map import (  # noqa: F401
    EXPERT_WEIGHTS,
    LayoutProblem,
    check_layouts,
    get_layout_map,
    layout_problems,
    validate_layouts,
)
