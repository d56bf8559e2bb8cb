"""Keras callbacks: few-shot evaluation and routing statistics during training.

Example:

```python
from keras_vmoe.callbacks import FewShotEvaluator

model.fit(train_ds, epochs=10,
          callbacks=[FewShotEvaluator({"digits": (train, test)})])
```
"""

from keras_vmoe.callbacks.fewshot import FewShotEvaluator, model_group_size
from keras_vmoe.callbacks.routing import RoutingStatistics, tracking_statistics

__all__ = [
    "FewShotEvaluator",
    "RoutingStatistics",
    "model_group_size",
    "tracking_statistics",
]
