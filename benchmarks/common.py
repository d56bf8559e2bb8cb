"""Timing helpers shared by the benchmarks.

Everything is measured side by side in one process: compile once (reported
separately), warm up, then take the median of repeated runs. Report ratios;
the machines are shared and noisy.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import keras
import numpy as np


def median_time(fn, repeats=10, warmup=2):
    """Median wall time of `fn()` in seconds; `fn` must block until done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(steps, repeats=10, warmup=2, statistic=None):
    """Median time of each of `steps` (name -> fn), measured in turns.

    Round-robin timing: every repeat runs each step once, so a burst of load
    from elsewhere on a shared machine hits all variants alike and the
    ratios stay meaningful.

    Args:
        steps: dict of name to a function that runs one step and blocks.
        repeats: int. Timed turns. Defaults to 10.
        warmup: int. Untimed turns first. Defaults to 2.
        statistic: function of a list of seconds. Defaults to the median.
    """
    statistic = statistic or statistics.median
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistic(t) for name, t in times.items()}


def jax_train_step(layer, x):
    """A jitted forward+backward of `sum(layer(x)**2)` and its compile time.

    Returns `(step, compile_seconds, memory)` where `step()` runs one step
    and blocks, and `memory` is XLA's temporary buffer size in bytes.
    """
    import jax
    import jax.numpy as jnp

    layer(x)  # build
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, non_trainable, x):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(jnp.square(y.astype("float32")))

    grad = jax.jit(jax.value_and_grad(loss))
    x = jnp.asarray(x)
    start = time.perf_counter()
    compiled = grad.lower(trainable, non_trainable, x).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory else None

    def step():
        value, grads = compiled(trainable, non_trainable, x)
        jax.block_until_ready(grads)

    return step, compile_seconds, temp_bytes


def machine_description():
    import os

    versions = {"keras": keras.__version__, "numpy": np.__version__}
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        versions["jax"] = jax.__version__
        device = str(jax.devices()[0].device_kind)
    elif backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        device = "cpu"
    else:
        import torch

        versions["torch"] = torch.__version__
        device = "cpu"
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "backend": backend,
        "device": device,
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        # Other work on a shared machine inflates times; ratios much less.
        "load average at start (1, 5, 15 min)": ", ".join(
            f"{v:.1f}" for v in os.getloadavg()
        ),
    }


def markdown_table(rows, columns):
    """`rows` of dicts to a markdown table with the given `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            if isinstance(value, float):
                value = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json_script(script, what, **env):
    """Runs `script` in a fresh Python process; returns its last `JSON...` line.

    The script prints its result as one line `JSON<json text>`. A fresh
    process gives each measurement its own backend, compilation cache and
    peak memory.

    Args:
        script: str. Python source.
        what: str. What runs, for the error message.
        **env: environment variables set for the process.

    Raises:
        RuntimeError: the process failed or printed no `JSON` line (with the
            end of its standard error).
    """
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("JSON")]
    if out.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][4:])
