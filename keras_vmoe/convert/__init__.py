"""Importing google-research/vmoe checkpoints (docs/architecture.md, "Packages and layers").

- `read_vmoe_checkpoint(prefix)`: a vmoe partitioned checkpoint as nested
  dicts of NumPy arrays (msgpack and NumPy only; streamed shard by shard).
- `from_vmoe_checkpoint(prefix, config)`: the `VisionMoEImageClassifier` of
  vmoe's model config with the checkpoint's weights, matching vmoe's logits.
- `keras_vmoe.convert.released`: the checkpoints google-research/vmoe
  released (standard library only).

The names below load on first use, so that `keras_vmoe.convert.released`
imports without Keras.
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "CheckpointError": "keras_vmoe.convert.checkpoint",
    "VmoeIndex": "keras_vmoe.convert.checkpoint",
    "iter_vmoe_blocks": "keras_vmoe.convert.checkpoint",
    "iter_vmoe_checkpoint": "keras_vmoe.convert.checkpoint",
    "read_vmoe_checkpoint": "keras_vmoe.convert.checkpoint",
    "read_vmoe_index": "keras_vmoe.convert.checkpoint",
    "CheckpointMismatch": "keras_vmoe.convert.vmoe",
    "UnsupportedVmoeOption": "keras_vmoe.convert.vmoe",
    "from_vmoe_checkpoint": "keras_vmoe.convert.vmoe",
    "load_vmoe_config": "keras_vmoe.convert.vmoe",
    "vmoe_config_to_keras": "keras_vmoe.convert.vmoe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
