"""`run_study`: every model, every seed, then the report and the pictures."""

import dataclasses
import math
import os
import sys
import time

import keras

from keras_vmoe.study import config as study_config
from keras_vmoe.study.data import load_study_data
from keras_vmoe.study.plots import write_plots
from keras_vmoe.study.progress import StudyProgress, format_duration
from keras_vmoe.study.report import (
    format_differences,
    format_table,
    summarize,
    write_results,
)
from keras_vmoe.study.runner import train_and_evaluate
from keras_vmoe.study.verdict import (
    METRICS,
    paired_comparisons,
    resolution,
    study_verdict,
)


def study_settings(config, model_names, seeds, data):
    """The JSON-ready description of a study (saved in `results.json`)."""
    plan = study_config.equal_compute(config)
    return {
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "models": list(model_names),
        "seeds": int(seeds),
        "config": dataclasses.asdict(config),
        "upstream": {
            "dataset": config.dataset or "animal_mnist",
            "classes": list(data.class_names),
            "train_images": int(len(data.x_train)),
            "test_images": int(len(data.x_test)),
        },
        "fewshot": {
            "dataset": "digits (8x8, resized to the model input)",
            "features": "pre_logits",
            "pool_images": int(len(data.fewshot["x_train"])),
            "test_images": int(len(data.fewshot["x_test"])),
            "shots": list(config.shots),
            "draws": config.fewshot_draws,
            "l2": config.fewshot_l2,
        },
        "equal_compute": {
            **plan,
            "statement": study_config.describe_equal_compute(config),
        },
    }


def mesh_sizes(distribution):
    """`{axis name: size}` of a distribution's device mesh.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "expert"))
    mesh_sizes(keras.distribution.DataParallel(device_mesh=mesh))
    # {"batch": 2, "expert": 4}
    ```
    """
    mesh = distribution.device_mesh
    return {name: int(size) for name, size in zip(mesh.axis_names, mesh.shape)}


def format_meshes(meshes):
    """One line naming each model's device mesh, for the study's log.

    Args:
        meshes: dict `{model name: {axis name: size}}` (`mesh_sizes`).

    Returns:
        str. Models on the same mesh share one entry.

    Example:
    >>> format_meshes({"dense": {"batch": 8, "expert": 1},
    ...                "soft": {"batch": 2, "expert": 4},
    ...                "sinkhorn": {"batch": 2, "expert": 4}})
    'Device mesh (8 devices): dense batch=8 x expert=1; soft, sinkhorn batch=2 x expert=4.'
    """
    by_mesh = {}
    devices = 0
    for name, sizes in meshes.items():
        devices = max(devices, math.prod(sizes.values()))
        text = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        by_mesh.setdefault(text, []).append(name)
    parts = [f"{', '.join(names)} {text}" for text, names in by_mesh.items()]
    plural = "s" if devices != 1 else ""
    return f"Device mesh ({devices} device{plural}): {'; '.join(parts)}."


def run_study(
    config,
    model_names=None,
    seeds=None,
    output_dir=".",
    stream=None,
    distributions=None,
):
    """Trains and evaluates every model with every seed and writes the report.

    Args:
        config: `StudyConfig`.
        model_names: sequence of str or None. `"dense"` and/or router names.
            Defaults to `config.models`.
        seeds: int or None. Seeds `0..seeds-1` per model. Defaults to
            `config.seeds`.
        output_dir: str. Existing, writable directory for the outputs.
        stream: file. Progress and table output. Defaults to `sys.stdout`.
        distributions: dict or None. `{model name: keras.distribution.
            Distribution}` (JAX): each model named is built, trained and
            evaluated in its distribution's scope (e.g. a `ModelParallel`
            on a `(batch, expert)` device mesh; `keras-vmoe study` plans
            them), the others as they are. The meshes are printed and saved
            in `results.json` (`settings["meshes"]`). Defaults to `None`
            (no distribution: one device).

    Returns:
        dict with `settings`, `summary`, `comparisons` (paired differences
        against the dense ViT and Softmax Token Choice), `resolution`
        (half-widths per metric), `verdict`, `runs`, `paths` (written
        files) and `seconds` (wall time).

    Example:

    ```python
    from keras_vmoe.study import QUICK, run_study
    result = run_study(QUICK, ["dense", "soft"], seeds=1, output_dir="/tmp/s")
    print(result["summary"]["soft"]["test_accuracy"])
    ```
    """
    stream = stream or sys.stdout
    start = time.perf_counter()
    model_names = tuple(config.models if model_names is None else model_names)
    seeds = config.seeds if seeds is None else int(seeds)
    config = config.replace(models=model_names, seeds=seeds)
    config.validate()
    data = load_study_data(config)
    settings = study_settings(config, model_names, seeds, data)
    distributions = {
        name: d for name, d in (distributions or {}).items() if name in model_names
    }
    if distributions:
        settings["meshes"] = {name: mesh_sizes(d) for name, d in distributions.items()}

    def say(text=""):
        print(text, file=stream, flush=True)

    say(
        f"Router study on {keras.backend.backend()}: {len(model_names)} model(s) x "
        f"{seeds} seed(s), {config.epochs} epoch(s) on {len(data.x_train)} "
        f"{settings['upstream']['dataset']} images, {config.hidden_dim}-wide ViT with "
        f"{config.num_layers} blocks, {config.tokens_per_image} tokens per image."
    )
    if distributions:
        say(format_meshes(settings["meshes"]))
    say(settings["equal_compute"]["statement"])
    progress = StudyProgress(len(model_names) * seeds, config.epochs, stream)
    runs, expert_maps = [], {}
    for model_name in model_names:
        for seed in range(seeds):
            progress.start_run(model_name, seed)
            run = train_and_evaluate(
                config,
                model_name,
                seed,
                data,
                progress,
                routing_maps=seed == 0,
                distribution=distributions.get(model_name),
            )
            progress.end_run()
            runs.append(run)
            if seed == 0 and model_name != study_config.DENSE:
                expert_maps[model_name] = run["expert_maps"]
            ips = run["images_per_second"]
            say(
                f"    -> {model_name} seed {seed}: test acc "
                f"{run['test_accuracy']:.3f}, 10-shot "
                f"{run['fewshot'].get(10, float('nan')):.3f}, "
                f"{'-' if ips is None else f'{ips:.0f}'} images/s, "
                f"{format_duration(run['seconds'])}"
            )
            keras.utils.clear_session()
    summary = summarize(runs)
    comparisons = paired_comparisons(runs, config.confidence)
    resolved = {metric: resolution(comparisons, metric) for metric in METRICS}
    verdict = study_verdict(runs, config.confidence)
    verdict["resolution"] = resolved
    seconds = time.perf_counter() - start
    settings["wall_seconds"] = round(seconds, 1)
    paths = write_results(output_dir, settings, runs, summary, comparisons, verdict)
    n_maps = len(next(iter(expert_maps.values()))) if expert_maps else 0
    paths.update(
        write_plots(
            output_dir,
            summary,
            expert_maps,
            data.x_test[:n_maps],
            config.num_experts,
            comparisons,
        )
    )
    say()
    say(
        f"Results (mean ± std over {seeds} seed(s); dropped and imbalance on "
        "the test set, mean over MoE layers):"
    )
    say(format_table(summary))
    say()
    say(
        f"Paired differences over the {seeds} seed(s), mean "
        f"[{config.confidence:.0%} t interval]; * where the interval excludes 0:"
    )
    say(format_differences(comparisons, model_names))
    say()
    for metric, name in METRICS.items():
        r = resolved[metric]
        if r["median"] is not None:
            say(
                f"Smallest difference this run resolves in {name}: "
                f"{r['median']:.3f} (interval half-width, median over the "
                f"comparisons; {r['min']:.3f} to {r['max']:.3f})."
            )
    say(f"Verdict: {verdict['text']}")
    say()
    say(settings["equal_compute"]["statement"])
    say()
    say(
        "Wrote "
        + ", ".join(os.path.basename(p) for p in paths.values())
        + f" to {output_dir} in {format_duration(seconds)}."
    )
    return {
        "settings": settings,
        "summary": summary,
        "comparisons": comparisons,
        "resolution": resolved,
        "verdict": verdict,
        "runs": runs,
        "paths": paths,
        "seconds": seconds,
    }
