"""
Title: A tour of the six routers
Author: keras_vmoe team
Date created: 2026/11/29
Last modified: 2026/11/29
Description: One formulation, six allocations: how each V-MoE router sends tokens to experts.
Accelerator: None
"""

import os

# Pick the backend ("jax", "tensorflow" or "torch") before Keras is imported.
os.environ["KERAS_BACKEND"] = "jax"

import keras
import matplotlib.pyplot as plt
import numpy as np
from keras import ops

from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE

# Quick mode (used by the tests) shrinks the token groups; the guide runs in
# under a minute on a CPU either way.
QUICK = os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"

keras.utils.set_random_seed(0)
np.set_printoptions(precision=2, suppress=True)


def to_numpy(x):
    """Converts a backend tensor to a NumPy array."""
    return np.asarray(ops.convert_to_numpy(x))


"""
## Introduction

A Mixture-of-Experts (MoE) layer replaces the MLP of a transformer block with
`E` expert MLPs and a *router* that decides which tokens each expert sees.
*Routers in Vision Mixture of Experts: An Empirical Study* (Liu, Blondel,
Riquelme, Puigcerver; TMLR 2024, [arXiv 2401.15969](https://arxiv.org/abs/2401.15969))
compares six routers in a single formulation. Tokens are routed in groups of
`S` tokens; for each group, a router produces two tensors of shape `(S, E, C)`,
where `C` is the number of *slots* (the capacity) of each expert:

- the dispatch tensor `D[i, j, c]` says how much of token `i` goes into slot
  `c` of expert `j`;
- the combine tensor `W[i, j, c]` says how much of the output of slot `(j, c)`
  goes back to token `i`.

```
expert input   x~[j, c] = sum_i D[i, j, c] * x[i]
token output   y[i]     = sum_{j,c} W[i, j, c] * f_j(x~[j, c])
```

Sparse routers fill each slot with at most one whole token, so `D` is 0/1.
Soft MoE fills each slot with a weighted average of all tokens. Everything
else is the *allocation*: the rule that turns token-expert scores into `D`
and `W`. This guide routes one small batch with each router of
`keras_vmoe.routers`, prints and plots the two tensors, and then looks closely
at capacity, token dropping, Token Choice versus Expert Choice, and the slots
of Soft MoE.
"""

"""
## One batch, six routers

We route one group of `S` tokens of dimension `d` to `E = 4` experts. To make
the six routers comparable, we give them all the same compute: two expert
slots per token on average. Token Choice routers pick `K = 2` experts per token
at capacity factor 1, Expert Choice routers use capacity factor 2, and Soft
MoE gets `2 * S / E` slots per expert. We also set `capacity_multiple_of=1`:
by default capacities round up to a multiple of 4 (good for accelerators), which
would hide the effect of the capacity on such a tiny group.
"""

NUM_TOKENS = 8 if QUICK else 16  # S, tokens per group.
DIM = 16 if QUICK else 64  # d, the token dimension.
NUM_EXPERTS = 4  # E.

tokens = keras.random.normal((1, NUM_TOKENS, DIM), seed=1)  # (G, S, d)

ROUTER_ARGS = {
    "softmax_token_choice": {"num_selected_experts": 2, "capacity_factor": 1.0},
    "sinkhorn_token_choice": {"num_selected_experts": 2, "capacity_factor": 1.0},
    "softmax_expert_choice": {"capacity_factor": 2.0},
    "sinkhorn_expert_choice": {"capacity_factor": 2.0},
    "sparsity_constrained_expert_choice": {"capacity_factor": 2.0},
    "soft": {"capacity_factor": 2.0},
}

routings = {}
for name in routers.ROUTER_NAMES:
    args = dict(ROUTER_ARGS[name])
    if name != "soft":
        # Soft MoE has neither capacity rounding nor gating noise: its slots
        # are round(S * factor / E) and its only randomness is the initializer.
        args.update(capacity_multiple_of=1, seed=0)
    router = routers.get(name, num_experts=NUM_EXPERTS, **args)
    # Calling a router returns a `Routing`; `training=False` turns off the noise.
    routings[name] = router(tokens)

print(f"{'router':<36}{'C':>3}{'dropped':>9}{'experts/token':>15}{'imbalance':>11}")
for name, routing in routings.items():
    # `statistics()` averages over groups; `expert_load` is a per-expert vector.
    stats = routing.statistics()
    print(
        f"{name:<36}{routing.capacity:>3}"
        f"{float(to_numpy(stats['fraction_tokens_dropped'])):>9.2f}"
        f"{float(to_numpy(stats['experts_per_token'])):>15.2f}"
        f"{float(to_numpy(stats['load_imbalance'])):>11.2f}"
    )

"""
All six routers have the same number of slots, `E * C = 2 * S`. The
statistics already show their characters. A Token Choice router can lose some
of the `K = 2` choices of a token when the expert it wants is full, so it
reaches fewer than two experts per token on average and its load is
unbalanced (`imbalance` is the busiest expert's share of the slots divided by
the mean share). Expert Choice routers fill every slot, so their load is
perfectly balanced, but a token may be picked by zero or several experts. Soft
MoE never drops a token: every slot mixes all of them, so every token reaches
all `E` experts.

`Routing.dispatch_tensor()` and `Routing.combine_tensor()` return the dense
`(G, S, E, C)` tensors of the formulation. The MoE layer never builds them for
the sparse routers (it gathers and scatters token indices instead), but they
are the definition and the best way to look at a routing.
"""

routing = routings["softmax_token_choice"]
dispatch = to_numpy(routing.dispatch_tensor())[0]  # (S, E, C)
combine = to_numpy(routing.combine_tensor())[0]  # (S, E, C)
print("dispatch, expert 0 (rows: tokens, columns: slots):")
print(dispatch[:, 0, :])
print("combine, expert 0:")
print(combine[:, 0, :])
print("tokens per slot (each column sums to 0 or 1):")
print(dispatch.sum(axis=0))

"""
Each column of the dispatch tensor holds at most one 1: a slot receives one
whole token or stays empty. The combine tensor has the same pattern, scaled by
the token's gate for that expert.

Let's plot both tensors for all six routers. Each panel flattens the
`(E, C)` slots into `E * C` columns, with white lines between experts.
"""


def plot_routing(ax, tensor, title):
    """Plots an `(S, E, C)` tensor as an `S x (E * C)` heat map."""
    s, e, c = tensor.shape
    ax.imshow(tensor.reshape(s, e * c), cmap="viridis", vmin=0.0, aspect="auto")
    for j in range(1, e):
        ax.axvline(j * c - 0.5, color="white", linewidth=1.5)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([j * c + (c - 1) / 2 for j in range(e)], [f"e{j}" for j in range(e)])
    ax.set_ylabel("token", fontsize=8)


fig, axes = plt.subplots(2, 6, figsize=(18, 6))
for col, (name, routing) in enumerate(routings.items()):
    plot_routing(axes[0, col], to_numpy(routing.dispatch_tensor())[0], name)
    plot_routing(axes[1, col], to_numpy(routing.combine_tensor())[0], "combine")
axes[0, 0].set_ylabel("dispatch\ntoken")
fig.tight_layout()
fig.savefig("routers_tour_tensors.png", dpi=80)
plt.show()

"""
The top row shows where tokens go, the bottom row how much each slot's output
counts. The sparse routers give sharp 0/1 dispatch patterns; Soft MoE gives
every slot a soft mixture of all tokens.

## Capacity and dropping

An expert has `C` slots per group. `compute_capacity` implements the rule:
`C = ceil(num_tokens * capacity_factor / E)`, rounded up to a multiple of
`multiple_of` (4 by default). Token Choice counts every token's `K` choices
(`num_tokens = S * K`), while Expert Choice and Soft MoE count the tokens
(`num_tokens = S`). So Expert Choice at factor 2 costs the same as Token
Choice with `K = 2` at factor 1.
"""

S, E = 16, 8
print("Token Choice, K=2, factor 1.05:", routers.compute_capacity(S * 2, E, 1.05))
print("  without rounding:", routers.compute_capacity(S * 2, E, 1.05, multiple_of=1))
print("Expert Choice, factor 2:", routers.compute_capacity(S, E, 2.0))
print("An explicit capacity:", routers.compute_capacity(S, E, capacity=3))

"""
To see how Token Choice fills slots, we write the gates by hand: six tokens,
three experts, each row a softmax over the experts. Five tokens prefer expert
0, which has only two slots.
"""

gates = np.array(
    [
        [
            [0.70, 0.20, 0.10],
            [0.60, 0.30, 0.10],
            [0.50, 0.10, 0.40],
            [0.20, 0.70, 0.10],
            [0.90, 0.06, 0.04],
            [0.40, 0.35, 0.25],
        ]
    ],
    "float32",
)  # (G=1, S=6, E=3)


def describe(routing):
    """Prints the token in each slot (-1 is empty) and the experts per token."""
    slots = np.where(
        to_numpy(routing.slot_mask)[0] > 0, to_numpy(routing.slot_token)[0], -1
    )
    reached = to_numpy(routing.dispatch_tensor())[0].sum(axis=(1, 2))
    for expert, row in enumerate(slots):
        print(f"  expert {expert} slots: {row.tolist()}")
    print(f"  experts per token: {reached.astype(int).tolist()}")


print("Token Choice, K=1, C=2:")
describe(routers.token_choice(gates, num_selected_experts=1, capacity=2))

"""
Tokens claim slots in sequence order, so tokens 0 and 1 take expert 0 and
tokens 2, 4 and 5 find it full: they are *dropped* and the MoE layer passes
them on unchanged (the residual connection carries them). Token 4 is dropped
although its gate (0.9) is the most confident of the batch, and expert 2 sits
idle.

*Batch priority routing* (BPR, from the V-MoE paper) lets the tokens with the
largest top-1 gate claim slots first:
"""

print("Token Choice, K=1, C=2, batch priority:")
describe(
    routers.token_choice(gates, num_selected_experts=1, capacity=2, batch_priority=True)
)

"""
With `K = 2`, every token's first choice is placed before any second choice.
A second choice can land even when the first was dropped: token 2 loses expert
0 but gets expert 2.
"""

print("Token Choice, K=2, C=2:")
describe(routers.token_choice(gates, num_selected_experts=2, capacity=2))

"""
## Token Choice versus Expert Choice

Expert Choice turns the selection around: each expert takes its top-`C` tokens
by gate. Every expert is full by construction, so the experts are perfectly
balanced and no auxiliary loss is needed. The price is that a token may reach
no expert at all, or several.
"""

print("Expert Choice, C=2:")
describe(routers.expert_choice(gates, capacity=2))

"""
Token 5, whose gates are spread over the three experts, goes to two experts,
and token 1 goes to none. Expert Choice spends compute on the tokens the
experts find most relevant rather than the same amount on every token.

The difference shows at scale too. We route random tokens with an
(untrained) Softmax Token Choice router (`K = 1`) and a Softmax Expert Choice
router at several capacity factors and count the tokens that reach no expert.
"""

num_groups, group_size = (2, 64) if QUICK else (16, 256)
many_tokens = keras.random.normal((num_groups, group_size, DIM), seed=2)
factors = [0.5, 1.0, 2.0] if QUICK else [0.5, 1.0, 1.5, 2.0, 3.0]
dropped = {"token choice (K=1)": [], "expert choice": []}
for factor in factors:
    common = dict(num_experts=8, capacity_factor=factor, capacity_multiple_of=1, seed=0)
    tc = routers.SoftmaxTokenChoiceRouter(num_selected_experts=1, **common)
    ec = routers.SoftmaxExpertChoiceRouter(**common)
    for label, router in (("token choice (K=1)", tc), ("expert choice", ec)):
        stats = router(many_tokens).statistics()
        dropped[label].append(float(to_numpy(stats["fraction_tokens_dropped"])))

for label, values in dropped.items():
    print(f"{label:<20}", " ".join(f"{v:5.2f}" for v in values))

fig, ax = plt.subplots(figsize=(5, 3.5))
for label, values in dropped.items():
    ax.plot(factors, values, marker="o", label=label)
ax.set_xlabel("capacity factor")
ax.set_ylabel("fraction of tokens dropped")
ax.legend()
fig.tight_layout()
fig.savefig("routers_tour_dropping.png", dpi=80)
plt.show()

"""
With `K = 1` both routers get `E * C` slots for the same factor, so they
spend the same compute. Below a factor of 1 there are fewer slots than tokens
and both must drop. Above it, they drop for different reasons: a Token Choice
router drops a token when its favourite expert is full (its auxiliary losses
push the gates towards balance during training), while an Expert Choice
router drops a token that no expert ranks among its top `C`, even though
slots elsewhere went to tokens that several experts picked.

## Soft MoE slots

Soft MoE (`SoftRouter`) gives each expert `P` slots, each with a learned
embedding. A slot's input is a softmax over *tokens* of their similarity to
the slot (so each dispatch column sums to 1), and a token's output is a
softmax over *all slots* (so each combine row sums to 1). Nothing is ever
dropped, and the whole layer is differentiable.
"""

soft = routers.SoftRouter(num_experts=NUM_EXPERTS, num_slots=2)
soft_routing = soft(tokens)
soft_dispatch = to_numpy(soft_routing.dispatch_tensor())[0]  # (S, E, P)
soft_combine = to_numpy(soft_routing.combine_tensor())[0]
print("dispatch sums over tokens (one per slot):")
print(soft_dispatch.sum(axis=0))
print("combine sums over slots (one per token):")
print(soft_combine.sum(axis=(1, 2)))

fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
plot_routing(axes[0], soft_dispatch, "Soft MoE dispatch (columns sum to 1)")
plot_routing(axes[1], soft_combine, "Soft MoE combine (rows sum to 1)")
fig.tight_layout()
fig.savefig("routers_tour_soft.png", dpi=80)
plt.show()

"""
## From a routing to an MoE layer

The `MoE` layer groups the tokens of a batch, calls its router, dispatches
the slot inputs `(E, G, C, d)`, runs all experts as one batched computation and
combines the outputs back onto the tokens. It adds the router's auxiliary loss
with `add_loss` and keeps the latest routing statistics (of training calls
by default; `track_statistics="always"` here, so that this inference call
updates them too).
"""

batch = keras.random.normal((4, NUM_TOKENS, DIM), seed=3)  # (images, tokens, d)
moe = MoE(
    router=routers.SoftmaxTokenChoiceRouter(num_experts=NUM_EXPERTS, seed=0),
    experts=MlpExperts(num_experts=NUM_EXPERTS, hidden_dim=32),
    group_size=2 * NUM_TOKENS,  # Two images per routing group.
    track_statistics="always",
)
outputs = moe(batch)
print("outputs:", tuple(outputs.shape), "auxiliary loss:", to_numpy(moe.losses[0]))
print("routing statistics:", moe.routing_statistics())

"""
For sparse routers the layer never builds `D` and `W`: `Routing.dispatch`
gathers the token of each slot and `Routing.combine` scatters the weighted
slot outputs back, so memory grows linearly with the group size.
`Routing.einsum_dispatch` and `Routing.einsum_combine` run the definition with
the dense tensors instead (`MoE(..., use_einsum_dispatch=True)` uses them).
Both paths give the same result:
"""

routing, groups = moe.route(batch)  # `groups` is the batch as (G, S, d).
slot_outputs = moe.experts(routing.dispatch(groups))  # (E, G, C, d)
fast = to_numpy(routing.combine(slot_outputs))
reference = to_numpy(
    routing.einsum_combine(moe.experts(routing.einsum_dispatch(groups)))
)
print("largest difference:", np.abs(fast - reference).max())

"""
## Summary

| router | allocation | drops tokens | auxiliary loss |
| --- | --- | --- | --- |
| Softmax Token Choice | top-K experts per token | yes | importance + load |
| Sinkhorn Token Choice | top-K on a balanced transport plan | yes, rarely | none |
| Softmax Expert Choice | top-C tokens per expert | yes (0..E experts per token) | none |
| Sinkhorn Expert Choice | top-C on a balanced plan | yes | none |
| Sparsity-constrained Expert Choice | top-C on a C-sparse plan | yes | none |
| Soft MoE | softmax mixtures of all tokens | never | none |

The paper's main finding is that the allocation matters more than how the
token-expert affinity is computed: Expert Choice routers beat Token Choice
ones, and Soft MoE is the strongest of all at equal compute. The
`pretraining` guide trains a V-MoE with these routers, and the
`router_study` guide compares them end to end.
"""
