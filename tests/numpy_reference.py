"""Independent NumPy implementations that the tests compare against.

Written as plain loops, straight from the definitions in docs/routers.md, with
no code shared with the package.
"""

import math

import numpy as np


def stable_top_k(row, k):
    """Indices of the k largest values; ties go to the lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]


def token_choice(gates, k, capacity, batch_priority=False, combine=None):
    """Dense combine tensor (G, S, E, C) of Token Choice, by loops."""
    combine = gates if combine is None else combine
    g_count, s, e = gates.shape
    out = np.zeros((g_count, s, e, capacity), np.float64)
    for g in range(g_count):
        choices = [stable_top_k(gates[g, i], k) for i in range(s)]
        order = list(range(s))
        if batch_priority:
            order = sorted(order, key=lambda i: (-gates[g, i, choices[i][0]], i))
        filled = [0] * e
        for rank in range(k):
            for i in order:
                j = choices[i][rank]
                if filled[j] < capacity:
                    out[g, i, j, filled[j]] = combine[g, i, j]
                    filled[j] += 1
    return out


def expert_choice(gates, capacity, combine=None):
    """Dense combine tensor (G, S, E, C) of Expert Choice, by loops."""
    combine = gates if combine is None else combine
    g_count, s, e = gates.shape
    out = np.zeros((g_count, s, e, capacity), np.float64)
    for g in range(g_count):
        for j in range(e):
            for c, i in enumerate(stable_top_k(gates[g, :, j], min(capacity, s))):
                out[g, i, j, c] = combine[g, i, j]
    return out


def softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=axis, keepdims=True)


def cv_squared(v):
    return v.var() / v.mean() ** 2


def importance_loss(gates):
    return np.array([cv_squared(g.sum(axis=0)) for g in gates])


def load_loss(clean, noisy, noise_std, k):
    e = clean.shape[-1]
    sigma = noise_std / e
    phi = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
    result = []
    for c, n in zip(clean, noisy):
        threshold = np.sort(n, axis=-1)[:, -k]  # k-th largest noisy logit
        p = 1 - phi((threshold[:, None] - c) / sigma)
        result.append(cv_squared(p.mean(axis=0)))
    return np.array(result)


def gshard_loss(gates):
    e = gates.shape[-1]
    result = []
    for g in gates:
        top1 = np.zeros(e)
        for row in g:
            top1[stable_top_k(row, 1)[0]] += 1
        result.append(e**2 * np.mean(top1 / len(g) * g.mean(axis=0)))
    return np.array(result)


def z_loss(logits):
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return (lse**2).mean(axis=1)


def soft_routing(x, phi, scale):
    """Dispatch and combine (G, S, E, P) of Soft MoE."""
    xn = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
    pn = phi / np.sqrt((phi**2).sum(0, keepdims=True) + 1e-6)
    logits = scale * np.einsum("gsd,dep->gsep", xn, pn)
    g, s, e, p = logits.shape
    dispatch = softmax(logits, axis=1)
    combine = softmax(logits.reshape(g, s, e * p), axis=-1).reshape(g, s, e, p)
    return dispatch, combine
