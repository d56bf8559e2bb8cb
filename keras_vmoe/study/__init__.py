"""The router study: the paper's experiment, scaled down to run offline.

Trains the same small ViT-MoE on Animal-MNIST (or a dataset of your own)
with the routers and a dense ViT at equal FLOPs per image over several
seeds, then compares test accuracy, few-shot transfer to digits,
throughput, FLOPs, dropped tokens, load balance and Soft MoE's dispatch
sharpness, with paired intervals and a verdict computed from them
(`keras-vmoe study`, `make demo`).

- `config`: `StudyConfig`, `DEFAULT`, `QUICK`, `GPU`, `equal_compute`.
- `data`: the in-memory datasets. `augment`: flips and shifts.
- `runner`: train and evaluate one model. `routing_maps`: expert per patch.
- `statistics`: paired t intervals. `verdict`: comparisons and verdict.
- `report`: tables, JSON, CSV. `plots`: PNGs. `experiment`: `run_study`.

Example:

```python
from keras_vmoe.study import QUICK, run_study

result = run_study(QUICK, ["dense", "soft"], seeds=2, output_dir="/tmp/study")
print(result["verdict"]["text"])
```
"""

from keras_vmoe.study.config import (
    DEFAULT,
    DEFAULT_MODELS,
    DENSE,
    GPU,
    QUICK,
    SCALES,
    StudyConfig,
    backbone_config,
    describe_equal_compute,
    equal_compute,
    model_names,
    soft_slots_for_equal_flops,
)

_LAZY = {
    "run_study": "keras_vmoe.study.experiment",
    "train_and_evaluate": "keras_vmoe.study.runner",
    "load_study_data": "keras_vmoe.study.data",
}


def __getattr__(name):
    # The training modules import keras_hub models: load them on first use
    # so that `keras-vmoe --help` and other subcommands stay fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT",
    "DEFAULT_MODELS",
    "DENSE",
    "GPU",
    "SCALES",
    "soft_slots_for_equal_flops",
    "model_names",
    "QUICK",
    "StudyConfig",
    "backbone_config",
    "describe_equal_compute",
    "equal_compute",
    "load_study_data",
    "run_study",
    "train_and_evaluate",
]
