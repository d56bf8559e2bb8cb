"""The one place where backends differ: order-stable top-k.

Routers must agree on every backend, so ties must break the same way
everywhere: on equal values the lower index wins. `jax.lax.top_k` and
`tf.math.top_k` already guarantee this; `torch.topk` does not, so torch uses
a stable descending sort instead.
"""

import keras
from keras import ops


def top_k(x, k):
    """Largest `k` entries along the last axis; ties go to the lower index.

    Args:
        x: tensor of shape `(..., n)`.
        k: int. How many entries to take, `1 <= k <= n`.

    Returns:
        `(values, indices)`, each of shape `(..., k)`, sorted by decreasing
        value; `indices` are int32.
    """
    if keras.backend.backend() == "torch":
        import torch

        x = ops.convert_to_tensor(x)
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k].to(torch.int32)
    values, indices = ops.top_k(x, k, sorted=True)
    return values, ops.cast(indices, "int32")


def argsort_descending(x):
    """Indices that sort the last axis by decreasing value, stably."""
    return top_k(x, ops.shape(x)[-1])[1]
