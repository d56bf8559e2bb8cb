"""Index dispatch vs the einsum reference as the group grows.

Run: `KERAS_BACKEND=jax python -m benchmarks.dispatch_scaling`.

One group of S tokens (S = 256 ... 16384), d=384, h=1536, E=8, Softmax
Token Choice with K=1 at capacity factor 1 (C = S / 8). For each S: the MoE
layer's forward+backward time relative to a dense MLP on the same tokens,
and XLA's temporary memory, for the index (gather / segment-sum) path and
the einsum path that materialises the `(G, S, E, C)` tensors, and the
expert matmuls alone on `(E, 1, C, d)` ("experts only": the MoE's cost if
routing, dispatch and combine were free).
"""

import numpy as np

from benchmarks.common import interleaved_median_times, jax_train_step, markdown_table
from benchmarks.moe_layer import D, E, H, dense_mlp
from keras_vmoe import routers
from keras_vmoe.layers import MlpExperts, MoE

GROUP_SIZES = (256, 1024, 4096, 16384)


def make(group_size, einsum):
    router = routers.get(
        "softmax_token_choice",
        num_experts=E,
        num_selected_experts=1,
        capacity_factor=1.0,
        capacity_multiple_of=1,
    )
    return MoE(
        router, MlpExperts(E, H), group_size=group_size, use_einsum_dispatch=einsum
    )


def run(group_sizes=GROUP_SIZES, repeats=3):
    rows = []
    for s in group_sizes:
        x = np.random.default_rng(0).normal(size=(1, s, D)).astype("float32")
        steps, memory = {}, {}
        for label, layer in [
            ("dense", dense_mlp()),
            ("index", make(s, False)),
            ("einsum", make(s, True)),
        ]:
            steps[label], _, memory[label] = jax_train_step(layer, x)
        # The expert matmuls alone on (E, 1, C, d): what the MoE costs with
        # free routing, dispatch and combine.
        slots = np.random.default_rng(1).normal(size=(E, 1, s // E, D))
        steps["experts only"], _, memory["experts only"] = jax_train_step(
            MlpExperts(E, H), slots.astype("float32")
        )
        times = interleaved_median_times(steps, repeats, warmup=1)
        for label in ("index", "einsum", "experts only"):
            rows.append(
                {
                    "S": s,
                    "dispatch": label,
                    "ms": times[label] * 1e3,
                    "ratio to dense": times[label] / times["dense"],
                    "temp MB": (memory[label] or 0) / 2**20,
                    "dense temp MB": (memory["dense"] or 0) / 2**20,
                }
            )
    return rows


COLUMNS = ["S", "dispatch", "ms", "ratio to dense", "temp MB", "dense temp MB"]

if __name__ == "__main__":
    print(markdown_table(run(), COLUMNS))
