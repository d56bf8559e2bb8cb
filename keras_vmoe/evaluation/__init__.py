"""Few-shot linear evaluation on frozen features (NumPy, any backend).

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

__all__ = [
    "BIAS_VALUE",
    "DEFAULT_L2",
    "DEFAULT_SHOTS",
    "L2_SWEEP",
    "STD_EPS",
    "best_l2",
    "fewshot_indices",
    "fewshot_linear_accuracy",
    "linear_probe_accuracy",
    "ridge_weights",
]
