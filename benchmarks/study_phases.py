"""CPU and wall seconds of each phase of one router-study run, per model.

Run: `KERAS_BACKEND=jax python -m benchmarks.study_phases [MODELS]`
(comma-separated, default: the default study's models). Each model of the
default study trains for 3 epochs on the 8,000 Animal-MNIST images with
augmentation (JAX's compilation cache in /tmp/study_phases_cache), then
its evaluation phases are timed. Prints one JSON line per model: per-epoch
`[wall, cpu]` seconds and `[wall, cpu]` of the test predict, the few-shot
features and draws, and the eager routing passes. CPU seconds are the
process's user + system time, which the machine's load inflates less than
the wall time; the recorded figures are in `benchmarks/router_study.md`.
"""

import json
import os
import resource
import sys
import time

import keras


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Phases:
    """`with phases("name"): ...` records `[wall, cpu]` seconds per name."""

    def __init__(self):
        self.rows = {}

    def __call__(self, name):
        phases = self

        class _Timer:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), cpu_seconds()

            def __exit__(self, *exc):
                phases.rows[name] = [
                    round(time.perf_counter() - self.wall, 2),
                    round(cpu_seconds() - self.cpu, 2),
                ]

        return _Timer()


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(
            [
                round(time.perf_counter() - self.wall, 2),
                round(cpu_seconds() - self.cpu, 2),
            ]
        )


def main(models):
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir", "/tmp/study_phases_cache")
    from keras_vmoe.evaluation import model_group_size, pad_to_groups
    from keras_vmoe.study import config as study_config
    from keras_vmoe.study import runner
    from keras_vmoe.study.data import load_study_data
    from keras_vmoe.study.routing_maps import last_routing

    config = study_config.DEFAULT.replace(epochs=3)
    data = load_study_data(config)
    for name in models:
        phases = Phases()
        keras.utils.set_random_seed(0)
        model = runner.build_model(config, name, data.num_classes)
        steps = len(data.x_train) // config.batch_size
        runner._compile(model, config, steps * config.epochs)
        augment = runner.augmentation(config.image_size, config.max_shift, 0)
        train = runner._train_dataset(
            data.x_train, data.y_train, config.batch_size, 0, augment
        )
        epochs = EpochTimer()
        model.fit(train, epochs=config.epochs, verbose=0, callbacks=[epochs])
        evaluator = keras.Model(
            model.input, [model.output, model.get_layer(runner.PRE_LOGITS).output]
        )
        group = model_group_size(model)
        batch = config.eval_batch_size
        with phases("predict_test"):
            runner._predict(evaluator, data.x_test, batch, group)
        fs = data.fewshot
        with phases("fewshot_features"):
            _, f_train = runner._predict(evaluator, fs["x_train"], batch, group)
            _, f_test = runner._predict(evaluator, fs["x_test"], batch, group)
        with phases("fewshot_draws"):
            runner.fewshot_over_draws(
                f_train, fs["y_train"], f_test, fs["y_test"], config, 0
            )
        with phases("eager_routing_pass_64_images"):
            runner.capture_routings(model, pad_to_groups(data.x_test[:64], group))
        with phases("eager_last_routing_8_images"):
            last_routing(model, pad_to_groups(data.x_test[:8], group))
        row = {"model": name, "epochs": epochs.epochs, **phases.rows}
        row["load_average"] = round(os.getloadavg()[0], 1)
        print(json.dumps(row), flush=True)
        keras.utils.clear_session()


if __name__ == "__main__":
    from keras_vmoe.study.config import DEFAULT_MODELS

    main(sys.argv[1].split(",") if len(sys.argv) > 1 else DEFAULT_MODELS)
