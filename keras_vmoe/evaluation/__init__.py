"""Evaluation: few-shot linear probes and running a model over routing groups.

- `fewshot_linear_accuracy` and its parts: the paper's few-shot metric on
  frozen features (NumPy, any backend).
- `predict_in_groups(model, images, batch_size)`: the one way to run a
  V-MoE over whole routing groups (one padding rule, `grouped.py`), with
  `model_group_size`, `pad_to_groups` and `group_padded` (tf.data).

Example:

```python
from keras_vmoe.evaluation import L2_SWEEP, best_l2, fewshot_linear_accuracy

acc = fewshot_linear_accuracy(f_train, y_train, f_test, y_test, l2_regs=L2_SWEEP)
print(best_l2(acc))  # {1: (l2, acc), 5: ..., 10: ..., 25: ...}
```
"""

from keras_vmoe.evaluation.fewshot import (
    BIAS_VALUE,
    DEFAULT_L2,
    DEFAULT_SHOTS,
    L2_SWEEP,
    STD_EPS,
    best_l2,
    fewshot_indices,
    fewshot_linear_accuracy,
    linear_probe_accuracy,
    ridge_weights,
)
from keras_vmoe.evaluation.grouped import (
    group_padded,
    group_padding_index,
    model_group_size,
    model_image_shape,
    pad_to_groups,
    predict_in_groups,
)

__all__ = [
    "BIAS_VALUE",
    "DEFAULT_L2",
    "DEFAULT_SHOTS",
    "L2_SWEEP",
    "STD_EPS",
    "best_l2",
    "fewshot_indices",
    "fewshot_linear_accuracy",
    "group_padded",
    "group_padding_index",
    "linear_probe_accuracy",
    "model_group_size",
    "model_image_shape",
    "pad_to_groups",
    "predict_in_groups",
    "ridge_weights",
]
