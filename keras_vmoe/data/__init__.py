"""Datasets and input pipelines (TFDS builders, tf.data, NumPy).

- `load(name, split, data_dir=None, download=False, ...)`: a
  `tf.data.Dataset` of `{"image", "label"}`; bundled datasets are prepared
  locally, other TFDS datasets must be prepared already (never online by
  default).
- `load_arrays(name, split, image_size=None, ...)`: NumPy images in [-1, 1].
- `num_classes(name)` and `eval_crop_fraction(name)`: a dataset's classes
  and its evaluation crop.
- `split_block(name, split, index, count)`: the TFDS split of one of
  `count` contiguous blocks of a split (what one process of a multi-process
  run reads; `block_bounds` gives its records).
- `train_pipeline(ds, image_size, batch_size, ...)` and `eval_pipeline(...)`:
  `(images, labels)` batches for `model.fit` / `evaluate` on every backend.
- TFDS builders `AnimalMnist` (`animal_mnist`, 8,000 / 2,000) and `Digits`
  (`digits`, 1,437 / 360); importing this package registers them with TFDS.

Example:

```python
from keras_vmoe import data

train = data.train_pipeline(data.load("animal_mnist", "train"), 32, 128,
                            num_classes=10, channels=3)
x_test, y_test = data.load_arrays("animal_mnist", "test")
```
"""

from keras_vmoe.data.builders import AnimalMnist, Digits
from keras_vmoe.data.bundled import (
    ANIMAL_MNIST_CLASSES,
    BUNDLED_NAMES,
    CLASS_NAMES,
    DIGITS_CLASSES,
    SPLIT_SIZES,
    bundled_arrays,
    split_indices,
)
from keras_vmoe.data.loading import (
    DatasetNotPreparedError,
    block_bounds,
    eval_crop_fraction,
    load,
    load_arrays,
    num_classes,
    split_block,
)
from keras_vmoe.data.pipelines import eval_pipeline, train_pipeline

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "AnimalMnist",
    "BUNDLED_NAMES",
    "CLASS_NAMES",
    "DIGITS_CLASSES",
    "DatasetNotPreparedError",
    "Digits",
    "SPLIT_SIZES",
    "block_bounds",
    "bundled_arrays",
    "eval_crop_fraction",
    "eval_pipeline",
    "load",
    "load_arrays",
    "num_classes",
    "split_block",
    "split_indices",
    "train_pipeline",
]
