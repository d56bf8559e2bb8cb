"""Runs every CPU benchmark and writes BENCHMARKS.md (`make bench`).

Each benchmark compares variants side by side in one process (warm-up,
then medians of runs taken in turns). The end-to-end benchmark runs once
per backend, each in its own process; the conversion benchmark runs each
step in its own process (peak memory per process).
"""

import os

from benchmarks import (
    convert,
    dispatch_scaling,
    distributed_train,
    moe_layer,
    quantization,
    routing_step,
    targets,
    upcycling,
)
from benchmarks.common import ROOT, machine_description, markdown_table, run_json_script

_E2E = (
    "import json; from benchmarks import end_to_end; "
    "print('JSON' + json.dumps(end_to_end.run()))"
)


def end_to_end_all_backends():
    rows = []
    for backend in ("jax", "tensorflow", "torch"):
        rows.extend(
            run_json_script(_E2E, f"end_to_end on {backend}", KERAS_BACKEND=backend)
        )
    return rows


OUTPUT = os.path.join(ROOT, "BENCHMARKS.md")
# Measurements of the router study (`make demo`), kept by hand.
STUDY_NOTE = os.path.join(ROOT, "benchmarks", "router_study.md")
GPU_NOTE = (
    "`benchmarks/gpu.sh` measures a B/16 V-MoE per router in bfloat16 on a "
    "GPU (images/s and model FLOP utilisation, under 5 minutes). It has not "
    "been run on a GPU yet: no GPU was available to this project so far. "
    "Run it on one and paste its table here. It then measures `keras-vmoe "
    "train` images/s on 1, 2, 4 and 8 GPUs (as many as are visible; "
    "`benchmarks/distributed_train.py --gpu`), not run either."
)


def main(path=OUTPUT):
    machine = machine_description()
    layer_rows = moe_layer.run()
    routing_rows = routing_step.run()
    scaling_rows = dispatch_scaling.run()
    sections = [
        ("MoE layer vs dense MLP (forward+backward, JAX)", moe_layer, layer_rows),
        ("Routing step per router (JAX)", routing_step, routing_rows),
        (
            "Index vs einsum dispatch as the group grows (JAX)",
            dispatch_scaling,
            scaling_rows,
        ),
    ]
    e2e = end_to_end_all_backends()
    convert_rows = convert.run()
    quantization_rows = quantization.run()
    distributed_rows = distributed_train.run()
    target_rows = targets.evaluate(layer_rows, routing_rows, scaling_rows, e2e)
    with open(path, "w") as f:
        f.write("# keras_vmoe benchmarks\n\n")
        f.write(
            "Written by `make bench` (`python -m benchmarks.run`). Each "
            "benchmark times its variants side by side in one process, in "
            "turns, after a warm-up; figures are medians and ratios. The JAX "
            "benchmarks run in this process; the end-to-end one once per "
            "backend in its own process, and each step of the conversion one "
            "in its own process.\n\n"
        )
        for key, value in machine.items():
            f.write(f"- {key}: {value}\n")
        for title, module, rows in sections:
            f.write(f"\n## {title}\n\n{(module.__doc__ or '').strip()}\n\n")
            f.write(markdown_table(rows, module.COLUMNS) + "\n")
        from benchmarks import end_to_end

        f.write(
            f"\n## End-to-end training throughput\n\n{end_to_end.__doc__.strip()}\n\n"
        )
        f.write(markdown_table(e2e, end_to_end.COLUMNS) + "\n")
        f.write(f"\n## Checkpoint conversion (JAX)\n\n{convert.__doc__.strip()}\n\n")
        f.write(markdown_table(convert_rows, convert.COLUMNS) + "\n")
        f.write(f"\n{convert.summary(convert_rows)}\n")
        f.write(f"\n## int8 quantization\n\n{quantization.__doc__.strip()}\n\n")
        f.write(markdown_table(quantization_rows, quantization.COLUMNS) + "\n")
        f.write(
            "\n## `keras-vmoe train` on 1, 2, 4 and 8 devices (JAX)\n\n"
            f"{distributed_train.__doc__.strip()}\n\n"
        )
        f.write(markdown_table(distributed_rows, distributed_train.COLUMNS) + "\n")
        f.write(f"\n## Against the targets\n\n{targets.__doc__.strip()}\n\n")
        f.write(markdown_table(target_rows, targets.COLUMNS) + "\n")
        if os.path.isfile(upcycling.RESULTS_PATH):  # saved by its own, longer run
            with open(upcycling.RESULTS_PATH) as saved:
                f.write(f"\n## Sparse upcycling on Animal-MNIST\n\n{saved.read()}")
        f.write(f"\n## GPU\n\n{GPU_NOTE}\n")
        if os.path.exists(STUDY_NOTE):
            f.write("\n" + open(STUDY_NOTE).read())
    print(open(path).read())


if __name__ == "__main__":
    main()
