"""The one place where backends differ.

Order-stable top-k: routers must agree on every backend, so ties must break
the same way everywhere: on equal values the lower index wins.
`jax.lax.top_k` and `tf.math.top_k` already guarantee this; `torch.topk`
does not, so torch fixes up its ties (or sorts stably when k is large).
Under a `keras.distribution` device mesh, JAX sorts stably too: XLA would
replicate a TopK on every device (all-gathering its operand), while it keeps
a sort sharded along the batch dimensions.

Per-group gather and segment sum: routing indexes tokens within their own
group. On JAX these are written as `vmap`s over the group axis, so XLA sees
the group axis as a batch dimension of the gather / scatter and can keep it
sharded under `keras.distribution` (a flat index into all groups' tokens
would make every device gather every group). Other backends use the flat
equivalent.
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
        return _torch_top_k(ops.convert_to_tensor(x), k)
    if keras.backend.backend() == "jax" and keras.distribution.distribution():
        # Under a device mesh XLA replicates TopK (it all-gathers the whole
        # operand) but partitions a sort along its batch dimensions, so the
        # routing of each group stays on the group's devices.
        import jax.numpy as jnp

        indices = jnp.argsort(x, axis=-1, stable=True, descending=True)[..., :k]
        return jnp.take_along_axis(x, indices, axis=-1), indices.astype("int32")
    values, indices = ops.top_k(x, k, sorted=True)
    return values, ops.cast(indices, "int32")


def _torch_top_k(x, k):
    """`top_k` on torch: `torch.topk`, with its ties re-broken by index.

    `torch.topk` returns the right k-th value but an arbitrary subset of the
    entries tied at it. The k entries are rebuilt as those above the k-th
    value plus the first tied ones in index order, then ordered by a stable
    sort of just those k. On CPU this is about 2x faster than a stable sort
    of the whole row for (8, 32, 520) and k = 36; when `k` is more than half
    the row, the whole-row stable sort is used. NaN ranks as +inf here
    (tied with it) instead of above it; no router produces NaN scores.

    Args:
        x: torch tensor of shape `(..., n)`.
        k: int. `1 <= k <= n`.

    Returns:
        `(values, indices)` as in `top_k`; `indices` are int32.
    """
    import torch

    n = x.shape[-1]
    if 2 * k > n:
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k].to(torch.int32)
    key = x
    if x.is_floating_point():
        key = torch.where(torch.isnan(x), float("inf"), x)  # (..., n)
    kth = torch.topk(key, k, dim=-1).values[..., -1:]  # (..., 1)
    above = key > kth  # (..., n)
    tied = key == kth  # (..., n)
    room = k - above.sum(dim=-1, keepdim=True)  # (..., 1) tied entries to take
    chosen = above | (tied & (torch.cumsum(tied, dim=-1) <= room))  # k per row
    # The chosen positions in increasing order: the k largest `n - position`.
    reversed_positions = torch.arange(n, 0, -1, device=x.device)  # (n,)
    first = torch.topk(chosen * reversed_positions, k, dim=-1).indices  # (..., k)
    order = torch.sort(
        key.gather(-1, first), dim=-1, descending=True, stable=True
    ).indices  # (..., k)
    indices = first.gather(-1, order)  # (..., k)
    return x.gather(-1, indices), indices.to(torch.int32)


def argsort_descending(x):
    """Indices that sort the last axis by decreasing value, stably."""
    return top_k(x, ops.shape(x)[-1])[1]


def grouped_take(x, indices):
    """Rows of each group picked by index: `out[g, n] = x[g, indices[g, n]]`.

    Args:
        x: tensor `(G, S, ...)`.
        indices: int tensor `(G, N)` with values in `[0, S)`.

    Returns:
        tensor `(G, N, ...)` in the dtype of `x`.
    """
    x = ops.convert_to_tensor(x)
    indices = ops.cast(indices, "int32")
    if keras.backend.backend() == "jax":
        import jax

        return jax.vmap(lambda rows, idx: rows[idx])(x, indices)
    num_groups, num_rows = ops.shape(x)[0], ops.shape(x)[1]
    flat = ops.reshape(x, (-1,) + tuple(ops.shape(x)[2:]))  # (G*S, ...)
    offsets = ops.arange(num_groups, dtype="int32")[:, None] * num_rows
    return ops.take(flat, indices + offsets, axis=0)  # (G, N, ...)


def grouped_segment_sum(data, segment_ids, num_segments):
    """Segment sum within each group: `out[g, i] = sum_{n: ids[g,n]=i} data[g, n]`.

    Args:
        data: tensor `(G, N, ...)`.
        segment_ids: int tensor `(G, N)` with values in `[0, num_segments)`.
        num_segments: int. Segments per group.

    Returns:
        tensor `(G, num_segments, ...)` in the dtype of `data`.
    """
    data = ops.convert_to_tensor(data)
    segment_ids = ops.cast(segment_ids, "int32")
    if keras.backend.backend() == "jax":
        import jax

        def one_group(values, ids):
            return jax.ops.segment_sum(values, ids, num_segments=num_segments)

        return jax.vmap(one_group)(data, segment_ids)
    shape = ops.shape(data)
    num_groups, tail = shape[0], tuple(shape[2:])
    offsets = ops.arange(num_groups, dtype="int32")[:, None] * num_segments
    flat = ops.segment_sum(
        ops.reshape(data, (-1,) + tail),
        ops.reshape(segment_ids + offsets, (-1,)),
        num_segments=num_groups * num_segments,
    )
    return ops.reshape(flat, (num_groups, num_segments) + tail)


def is_traced(x):
    """Whether `x` is a traced or symbolic tensor rather than eager values.

    JAX: a tracer (inside `jit`, `fit`, `predict`); TensorFlow: not
    executing eagerly (inside a `tf.function`); torch: a meta tensor (Keras'
    symbolic shapes) or inside `torch.compile`.
    """
    name = keras.backend.backend()
    if name == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if name == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if name == "torch":
        import torch

        return x.device.type == "meta" or torch.compiler.is_compiling()
    return False
