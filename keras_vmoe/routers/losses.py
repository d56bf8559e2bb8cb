"""Auxiliary losses that keep Token Choice routers balanced.

Each function reduces over the tokens of a group and returns one value per
group, shape `(G,)`; the MoE layer averages them over groups. Inputs are
`(G, S, E)`.
"""

import math

from keras import ops

from keras_vmoe import backend


def _cv_squared(values):
    """Squared coefficient of variation over the last axis (population)."""
    mean = ops.mean(values, axis=-1)
    return ops.var(values, axis=-1) / ops.square(mean)


def importance_loss(gates):
    """Importance loss: CV^2 of the total gate each expert receives.

    Args:
        gates: float tensor `(G, S, E)`. Softmax of the clean gating logits.

    Returns:
        float32 tensor `(G,)`.
    """
    gates = ops.cast(gates, "float32")
    importance = ops.sum(gates, axis=1)  # (G, E)
    return _cv_squared(importance)


def load_loss(clean_logits, noisy_logits, noise_std, num_selected_experts):
    """Load loss: CV^2 of each expert's smoothed probability of selection.

    For token `i` let `t_i` be its K-th largest noisy logit. Re-sampling the
    noise, expert `e` would beat that threshold with probability
    `p[i, e] = 1 - Phi((t_i - clean_logits[i, e]) / sigma)`, where
    `sigma = noise_std / E` is the noise actually added to the logits.

    Args:
        clean_logits: float tensor `(G, S, E)`. Gating logits before noise.
        noisy_logits: float tensor `(G, S, E)`. The same logits with noise.
        noise_std: float. The router's `noise_std` (before division by E).
        num_selected_experts: int. `K`.

    Returns:
        float32 tensor `(G,)`.
    """
    clean_logits = ops.cast(clean_logits, "float32")
    noisy_logits = ops.cast(noisy_logits, "float32")
    num_experts = ops.shape(clean_logits)[-1]
    if not noise_std > 0:
        raise ValueError(f"`noise_std` must be > 0 for the load loss, got {noise_std}.")
    sigma = noise_std / num_experts
    threshold = backend.top_k(noisy_logits, num_selected_experts)[0][..., -1]  # (G, S)
    z = (threshold[..., None] - clean_logits) / sigma  # (G, S, E)
    p = 1.0 - 0.5 * (1.0 + ops.erf(z / math.sqrt(2.0)))  # 1 - Phi(z)
    return _cv_squared(ops.mean(p, axis=1))  # mean over tokens: (G, E)


def gshard_loss(gates):
    """GShard load-balancing loss: `E^2 * mean_e(top1_fraction_e * mean_gate_e)`.

    Only the mean gates carry gradient; the top-1 fractions are counts.

    Args:
        gates: float tensor `(G, S, E)`.

    Returns:
        float32 tensor `(G,)`.
    """
    gates = ops.cast(gates, "float32")
    num_experts = ops.shape(gates)[-1]
    top1 = backend.top_k(gates, 1)[1][..., 0]  # (G, S)
    top1_fraction = ops.mean(ops.one_hot(top1, num_experts, dtype="float32"), axis=1)
    mean_gate = ops.mean(gates, axis=1)  # (G, E)
    return ops.mean(top1_fraction * mean_gate, axis=-1) * float(num_experts**2)


def router_z_loss(logits):
    """Router z-loss: mean over tokens of `logsumexp(logits)^2`.

    Args:
        logits: float tensor `(G, S, E)`.

    Returns:
        float32 tensor `(G,)`.
    """
    logits = ops.cast(logits, "float32")
    return ops.mean(ops.square(ops.logsumexp(logits, axis=-1)), axis=1)
