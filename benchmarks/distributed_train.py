"""Images/s of `keras-vmoe train` on 1, 2, 4 and 8 devices (JAX).

Each device count runs the command in a fresh process: on the CPU with
`--xla_force_host_platform_device_count=N` simulated devices (which share
the machine's cores, so this measures the overhead of the mesh, not a
speed-up), on GPUs with `CUDA_VISIBLE_DEVICES` set to the first N. The
command picks its mesh itself (`batch x expert`). Throughput is the
training images of the steps after the first epoch (compilation and
warm-up excluded) over their wall time.

    python -m benchmarks.distributed_train            # CPU, 1/2/4/8 devices
    python -m benchmarks.distributed_train --gpu      # GPUs, up to those visible
"""

import argparse
import json
import os

from benchmarks.common import markdown_table, run_json_script

# A small V-MoE: 32x32 inputs, 16 patches + class token, 4 blocks of width
# 64 with MoE (8 experts, top-2) in blocks 1 and 3, groups of 4 images.
CPU_FLAGS = [
    *("--preset", "vmoe_softmax_tc_s32_e32_224", "--image-size", "32"),
    *("--num-experts", "8", "--override", "patch_size=8"),
    *("--override", "num_layers=4", "--override", "hidden_dim=64"),
    *("--override", "mlp_dim=128", "--override", "num_heads=2"),
    *("--override", "group_size=4", "--override", "representation_size=64"),
    *("--batch-size", "64", "--steps", "20", "--steps-per-epoch", "5"),
    *("--train-split", "train[:2048]"),
]
# On GPUs: B/16 with 32 experts at 224x224 (the V-MoE-B/16 of the paper).
GPU_FLAGS = [
    *("--preset", "vmoe_softmax_tc_b16_e32_224", "--image-size", "224"),
    *("--batch-size", "256", "--steps", "60", "--steps-per-epoch", "10"),
]

_SCRIPT = r"""
import json, sys, time, tempfile
import keras
from keras_vmoe import cli
from keras_vmoe.cli import train as command

class Clock(keras.callbacks.Callback):
    def __init__(self, skip):
        super().__init__()
        self.skip, self.steps, self.start, self.end = skip, 0, None, None
    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

flags = json.loads(sys.argv[1])
skip = int(flags[flags.index("--steps-per-epoch") + 1])
total = int(flags[flags.index("--steps") + 1])
batch = int(flags[flags.index("--batch-size") + 1])
clock = Clock(skip)
with tempfile.TemporaryDirectory() as out:
    args = cli.build_parser().parse_args(
        ["train", "--dataset", "animal_mnist", "--eval-split", "none",
         "--verbose", "0", "--output", out, *flags])
    start = time.perf_counter()
    command.run(args, callbacks=[clock])
    seconds = time.perf_counter() - start
import jax
print("JSON" + json.dumps({
    "devices": jax.device_count(),
    "platform": jax.devices()[0].platform,
    "images_per_s": batch * (total - skip) / (clock.end - clock.start),
    "run_s": seconds,
}))
"""


def measure(num_devices, gpu=False):
    flags = GPU_FLAGS if gpu else CPU_FLAGS
    env = {"KERAS_BACKEND": "jax"}
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(num_devices)))
    else:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    script = _SCRIPT.replace("sys.argv[1]", repr(json.dumps(flags)))
    return run_json_script(script, f"keras-vmoe train on {num_devices} devices", **env)


COLUMNS = ["devices", "platform", "images/s", "vs 1 device", "whole run (s)"]


def run(device_counts=(1, 2, 4, 8), gpu=False):
    """One row per device count (the columns of `COLUMNS`)."""
    measured = [measure(n, gpu=gpu) for n in device_counts]
    base = measured[0]["images_per_s"]
    return [
        {
            "devices": m["devices"],
            "platform": m["platform"],
            "images/s": f"{m['images_per_s']:.0f}",
            "vs 1 device": f"{m['images_per_s'] / base:.2f}",
            "whole run (s)": f"{m['run_s']:.0f}",
        }
        for m in measured
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Real GPUs.")
    parser.add_argument(
        "--devices", default="1,2,4,8", help="Device counts (default 1,2,4,8)."
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.devices.split(",")]
    if args.gpu:
        import jax

        visible = len(jax.devices("gpu"))
        counts = [n for n in counts if n <= visible]
    print(markdown_table(run(counts, gpu=args.gpu), COLUMNS))


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    main()
