"""Converting a vmoe checkpoint: time and peak memory at B/16 size.

Run: `KERAS_BACKEND=jax python -m benchmarks.convert`.

A synthetic checkpoint with the shapes of the released V-MoE B/16
(`vmoe_b16_imagenet21k_randaug_strong`: 12 blocks, d=768, 8 experts in the
6 odd blocks, 21,843 classes, 224 px), random float32 values, written by the
tests' own writer (`tests/convert/vmoe_writer.py`) in 8 shards, in two
layouts: "whole arrays" (each array in one shard, the arrays spread over
the shards) and "experts split" (each expert tensor cut along the expert
axis into 8 chunks on 8 different shards, as an expert-partitioned vmoe
save spreads them). Each step runs in a fresh process on the JAX backend
and reports its wall time and peak resident memory (`VmHWM`): importing
keras_vmoe alone; `read_vmoe_checkpoint` (the whole tree as NumPy arrays: one
copy of the parameters); building the Keras model alone (no checkpoint);
`from_vmoe_checkpoint` (build, then stream the shards into the weights); and
`keras-vmoe convert` (the same, then the preset saved). "peak / params" is
the peak over the parameters' bytes; "above model / params" is the peak
above the model-only process, over the parameters' bytes: streaming shard
by shard keeps it to the arrays being assembled, while holding a second copy
of the model would make it 1 or more.
"""

import importlib.util
import math
import os
import shutil
import tempfile

from benchmarks.common import ROOT, markdown_table, run_json_script

CHECKPOINT = "vmoe_b16_imagenet21k_randaug_strong"
NUM_SHARDS = 8
LAYOUTS = ("whole arrays", "experts split")


def load_writer():
    """The tests' vmoe checkpoint writer (tests/convert/vmoe_writer.py)."""
    path = os.path.join(ROOT, "tests", "convert", "vmoe_writer.py")
    spec = importlib.util.spec_from_file_location("vmoe_writer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config():
    from keras_vmoe.convert.released import RELEASED_CHECKPOINTS

    record = RELEASED_CHECKPOINTS[CHECKPOINT]
    return record.vmoe_config(), record.image_size


def write_checkpoint(prefix, layout):
    """Writes the synthetic checkpoint; returns `(parameter bytes, files)`."""
    writer = load_writer()
    config, image_size = model_config()
    shapes = writer.vmoe_param_shapes(config, image_size)
    params = writer.random_params(shapes, seed=0)
    chunk = None
    if layout == "experts split":
        experts = config["encoder"]["moe"]["num_experts"]
        d, h = config["hidden_size"], config["encoder"]["mlp_dim"]
        chunk = d * h * 4 * 8 // experts  # one expert's kernel per chunk
    files = writer.write_vmoe_checkpoint(
        prefix, params, num_shards=NUM_SHARDS, max_chunk_bytes=chunk
    )
    return sum(math.prod(s) for s in shapes.values()) * 4, files


# Each step as a script run in its own process; `{prefix}`, `{config}`,
# `{output}` and `{size}` are filled in. It sets `seconds`, the time of its
# work (for the import, the import itself).
_STEPS = {
    "import keras_vmoe": (
        "start = time.perf_counter()\n"
        "import keras_vmoe\n"
        "seconds = time.perf_counter() - start\n"
    ),
    "build the model only": (
        "from keras_vmoe.convert import load_vmoe_config, vmoe_config_to_keras\n"
        "from keras_vmoe.models import VisionMoEBackbone, VisionMoEImageClassifier\n"
        "start = time.perf_counter()\n"
        "config, _ = load_vmoe_config({config!r})\n"
        "b, c, _ = vmoe_config_to_keras(config, ({size}, {size}, 3))\n"
        "model = VisionMoEImageClassifier(VisionMoEBackbone(**b), **c)\n"
        "seconds = time.perf_counter() - start\n"
    ),
    "read_vmoe_checkpoint (whole tree)": (
        "from keras_vmoe.convert import read_vmoe_checkpoint\n"
        "start = time.perf_counter()\n"
        "tree = read_vmoe_checkpoint({prefix!r})\n"
        "seconds = time.perf_counter() - start\n"
    ),
    "from_vmoe_checkpoint": (
        "from keras_vmoe.convert import from_vmoe_checkpoint\n"
        "start = time.perf_counter()\n"
        "model = from_vmoe_checkpoint({prefix!r}, {config!r})\n"
        "seconds = time.perf_counter() - start\n"
    ),
    "keras-vmoe convert (and save the preset)": (
        "from keras_vmoe import cli\n"
        "start = time.perf_counter()\n"
        "assert cli.main(['convert', '--checkpoint', {prefix!r}, '--config', "
        "{config!r}, '--output', {output!r}]) == 0\n"
        "seconds = time.perf_counter() - start\n"
    ),
}
# Steps that read the checkpoint (run for each layout), and those compared
# with the model-only process.
_READS = (
    "read_vmoe_checkpoint (whole tree)",
    "from_vmoe_checkpoint",
    "keras-vmoe convert (and save the preset)",
)
_CONVERTS = _READS[1:]
# The peak resident memory of this process's own address space (`VmHWM`;
# `ru_maxrss` would carry over the parent's peak across fork and exec).
_FOOTER = (
    "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
    "peak = int(status.split()[0]) * 1024\n"
    "print('JSON' + json.dumps({{'seconds': seconds, 'peak': peak}}))\n"
)


def run_step(step, prefix, output, size):
    """`{"seconds", "peak"}` of one step, run in a fresh process."""
    script = "import json, time\n" + _STEPS[step] + _FOOTER
    script = script.format(prefix=prefix, config=CHECKPOINT, output=output, size=size)
    return run_json_script(script, step, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")


def run(workdir=None):
    """The table's rows (every step in its own process)."""
    rows = []
    _, size = model_config()
    model_only = None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        output = os.path.join(tmp, "preset")
        for layout in LAYOUTS:
            prefix = os.path.join(tmp, layout.replace(" ", "_"), "ckpt")
            nbytes, files = write_checkpoint(prefix, layout)
            largest = max(os.path.getsize(f) for f in files)
            steps = list(_STEPS) if layout == LAYOUTS[0] else list(_READS)
            for step in steps:
                result = run_step(step, prefix, output, size)
                shutil.rmtree(output, ignore_errors=True)
                if step == "build the model only":
                    model_only = result["peak"]
                above = ""
                if step in _CONVERTS:
                    above = (result["peak"] - model_only) / nbytes
                rows.append(
                    {
                        "step": step,
                        "layout": layout if step in _READS else "",
                        "seconds": result["seconds"],
                        "peak RSS MB": result["peak"] / 2**20,
                        "peak / params": result["peak"] / nbytes,
                        "above model / params": above,
                        "params MB": nbytes / 2**20,
                        "largest shard MB": largest / 2**20 if step in _READS else "",
                    }
                )
            shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
    return rows


def summary(rows):
    """One paragraph on the table: does the conversion stream?"""
    lines = []
    for layout in LAYOUTS:
        row = next(
            r
            for r in rows
            if r["layout"] == layout and r["step"] == "from_vmoe_checkpoint"
        )
        above = row["above model / params"]
        verdict = (
            "streams: well under a second copy of the parameters"
            if above < 0.5
            else "holds nearly a second copy of the parameters"
        )
        lines.append(
            f"With {layout}, from_vmoe_checkpoint peaks {above:.2f}x the parameters' "
            f"bytes above the model alone ({row['seconds']:.1f} s): it {verdict}."
        )
    return " ".join(lines)


COLUMNS = [
    "step",
    "layout",
    "seconds",
    "peak RSS MB",
    "peak / params",
    "above model / params",
    "params MB",
    "largest shard MB",
]

if __name__ == "__main__":
    rows = run()
    print(markdown_table(rows, COLUMNS))
    print()
    print(summary(rows))
