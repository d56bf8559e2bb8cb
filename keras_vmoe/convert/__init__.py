"""Importing google-research/vmoe checkpoints (docs/architecture.md, "Packages and layers").

- `read_vmoe_checkpoint(prefix)`: a vmoe partitioned checkpoint as nested
  dicts of NumPy arrays (msgpack and NumPy only; streamed shard by shard).
- `from_vmoe_checkpoint(prefix, config)`: the `VisionMoEImageClassifier` of
  vmoe's model config with the checkpoint's weights, matching vmoe's logits.
"""

from keras_vmoe.convert.checkpoint import (
    CheckpointError,
    VmoeIndex,
    iter_vmoe_blocks,
    iter_vmoe_checkpoint,
    read_vmoe_checkpoint,
    read_vmoe_index,
)
from keras_vmoe.convert.vmoe import (
    CheckpointMismatch,
    UnsupportedVmoeOption,
    from_vmoe_checkpoint,
    load_vmoe_config,
    vmoe_config_to_keras,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "UnsupportedVmoeOption",
    "VmoeIndex",
    "from_vmoe_checkpoint",
    "iter_vmoe_blocks",
    "iter_vmoe_checkpoint",
    "load_vmoe_config",
    "read_vmoe_checkpoint",
    "read_vmoe_index",
    "vmoe_config_to_keras",
]
