"""Start-up cost: wall time of light imports and CLI commands, fresh processes.

Each case runs in a new Python process (`python -c ...` or the CLI module)
`--repeats` times, in turns, and the minimum wall time is reported: on a
shared machine the minimum is the run least disturbed by other load. Each
case also records whether TensorFlow and keras-hub ended up in
`sys.modules`.

    PYTHONPATH=$PWD python -m benchmarks.import_time --repeats 5

`--before DIR` also runs every case on the package found in `DIR` (e.g.
an earlier commit's `keras_vmoe/` and `presets/`, from `git archive`),
interleaved with the current one, so that both see the same load.

Prints one JSON line per case (and source).
"""

import argparse
import json
import os
import subprocess
import sys
import time

_PROBE = (
    "import sys; {statement}; "
    "print('TF', 'tensorflow' in sys.modules, 'HUB', 'keras_hub' in sys.modules)"
)

CASES = {
    "import keras (jax)": ("jax", ["-c", _PROBE.format(statement="import keras")]),
    "import keras_vmoe (jax)": (
        "jax",
        ["-c", _PROBE.format(statement="import keras_vmoe")],
    ),
    "import keras_vmoe.routers (jax)": (
        "jax",
        ["-c", _PROBE.format(statement="import keras_vmoe.routers")],
    ),
    "import keras_vmoe.routers (torch)": (
        "torch",
        ["-c", _PROBE.format(statement="import keras_vmoe.routers")],
    ),
    "import keras_vmoe.layers, keras_vmoe.ot (jax)": (
        "jax",
        ["-c", _PROBE.format(statement="import keras_vmoe.layers, keras_vmoe.ot")],
    ),
    "keras-vmoe --help": ("jax", ["-m", "keras_vmoe.cli", "--help"]),
    "keras-vmoe presets": ("jax", ["-m", "keras_vmoe.cli", "presets"]),
}


def run_case(backend, args, source):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=source)
    start = time.perf_counter()
    # Run from `source`: `-c` and `-m` put the working folder first on the path.
    result = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, cwd=source
    )
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{args} failed:\n{result.stderr[-2000:]}")
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return seconds, last


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="Cases containing this text.")
    parser.add_argument("--before", default=None, help="Source root to compare.")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or args.only in k}
    sources = {"now": os.getcwd()}
    if args.before:
        sources = {"before": os.path.abspath(args.before), **sources}
    times = {(name, s): [] for name in cases for s in sources}
    probes = {}
    for _ in range(args.repeats):
        for name, (backend, argv) in cases.items():
            for label, source in sources.items():
                seconds, last = run_case(backend, argv, source)
                times[name, label].append(seconds)
                probes[name, label] = last if last.startswith("TF ") else ""
    for (name, label), values in times.items():
        print(
            json.dumps(
                {
                    "case": name,
                    "source": label,
                    "min_s": round(min(values), 2),
                    "max_s": round(max(values), 2),
                    "repeats": len(values),
                    "modules": probes[name, label],
                }
            )
        )


if __name__ == "__main__":
    main()
