#!/usr/bin/env bash
# GPU benchmark: B/16 V-MoE training throughput and MFU in bfloat16.
# Needs a CUDA build of JAX in the active Python environment, e.g.
#   pip install -e . "jax[cuda12]==0.10.2"
# Prints markdown tables to paste into BENCHMARKS.md. About 5 minutes on
# one H100/H200 (most of it compilation), then `keras-vmoe train` images/s
# on 1, 2, 4 and 8 GPUs (as many as are visible; about 2 minutes each).
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
python -c "import jax; assert jax.devices()[0].platform == 'gpu', 'no GPU visible to JAX'"
timeout 300 python -m benchmarks.gpu
# keras-vmoe train on 1, 2, 4, 8 GPUs (B/16, 32 experts, batch x expert mesh).
timeout 1200 python -m benchmarks.distributed_train --gpu
