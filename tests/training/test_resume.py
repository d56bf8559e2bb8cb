"""Interrupted and resumed training ends with the same weights as one run.

Keras' `BackupAndRestore` saves weights and optimizer but not the layers'
`SeedGenerator` states (router noise, dropout); `BackupAndRestoreWithRNG`
adds them. Checked in the library (fit on fixed-order arrays) and through
`keras-vmoe train` (whose input stream restarts at the resumed step).
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.cli import train as train_command
from keras_vmoe.cli import train_outputs as run_outputs
from keras_vmoe.models import from_preset
from keras_vmoe.training import (
    BackupAndRestoreWithRNG,
    compile_with_recipe,
    seed_state_variables,
)

EPOCHS = 3
# A tiny V-MoE with router noise (noise_std 1) and dropout: both draw from
# SeedGenerators every step.
TINY = dict(
    num_classes=4,
    image_size=8,
    patch_size=4,
    num_layers=2,
    hidden_dim=8,
    mlp_dim=16,
    num_heads=2,
    num_experts=4,
    group_size=2,
    representation_size=8,
    dropout_rate=0.2,
)


class Interrupt(keras.callbacks.Callback):
    """Raises at the start of epoch `epoch` (0-based), like a preemption."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"interrupted before epoch {epoch}")


def _data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(16, 8, 8, 3)).astype("float32")
    return x, np.arange(16) % 4


def _model():
    keras.utils.set_random_seed(7)
    # The images are in [-1, 1] already: no preprocessor.
    model = from_preset("vmoe_softmax_tc_s32_e32_224", preprocessor=None, **TINY)
    compile_with_recipe(
        model,
        total_steps=EPOCHS * 2,
        peak_learning_rate=1e-2,
        warmup_steps=2,
        # Six steps: tracing a tf.function costs more than running eagerly
        # (the command test below covers the traced path).
        run_eagerly=keras.backend.backend() == "tensorflow",
    )
    return model


def _fit(model, callbacks):
    x, y = _data()
    model.fit(
        x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks
    )


def _state(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights], [
        keras.ops.convert_to_numpy(v) for v in seed_state_variables(model)
    ]


def _assert_same(state_a, state_b):
    (weights_a, seeds_a), (weights_b, seeds_b) = state_a, state_b
    assert len(weights_a) == len(weights_b) and len(seeds_a) == len(seeds_b)
    for a, b in zip(seeds_a, seeds_b):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Weights and seed states after an uninterrupted 3-epoch fit.

    With the callback too: on torch it puts dropout on the seeded path.
    """
    keras.utils.clear_session(free_memory=False)
    model = _model()
    _fit(model, [BackupAndRestoreWithRNG(str(tmp_path_factory.mktemp("ref")))])
    return _state(model)


def test_seed_states_are_not_weights():
    model = _model()
    seeds = seed_state_variables(model)
    # Router noise of the MoE layer and the dropout layers.
    assert len(seeds) >= 2
    assert all(tuple(v.shape) == (2,) for v in seeds)
    assert not {id(v) for v in seeds} & {id(v) for v in model.weights}


def test_resumed_fit_matches_uninterrupted_fit(reference, tmp_path):
    # Every seed state moved on during the reference run.
    assert all(s[1] > 0 for s in reference[1])
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "keras")
    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(
            interrupted,
            [
                BackupAndRestoreWithRNG(ours),
                keras.callbacks.BackupAndRestore(theirs),
                Interrupt(2),
            ],
        )
    assert BackupAndRestoreWithRNG.resume_epoch(ours) == 2
    assert os.path.isfile(os.path.join(ours, BackupAndRestoreWithRNG.SEEDS_FILE))
    at_epoch_2 = _state(interrupted)

    # Keras' callback alone restores the weights but not the seed states:
    # they come back at their initial values, and the resumed run would
    # replay the noise and dropout masks of epoch 0.
    plain = _model()
    initial_seeds = _state(plain)[1]
    restore = keras.callbacks.BackupAndRestore(theirs)
    restore.set_model(plain)
    restore.on_train_begin()
    weights, seeds = _state(plain)
    for a, b in zip(weights, at_epoch_2[0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(seeds, initial_seeds):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(seeds, at_epoch_2[1]))

    resumed = _model()  # a fresh process would rebuild the model like this
    _fit(resumed, [BackupAndRestoreWithRNG(ours)])
    _assert_same(_state(resumed), reference)
    assert not os.path.exists(ours)  # deleted when fit() completes
    assert int(resumed.optimizer.iterations) == EPOCHS * 2


TRAIN = [
    "train",
    "--no-distribution",
    "--preset",
    "vmoe_softmax_tc_s32_e32_224",
    "--dataset",
    "digits",
    "--train-split",
    "train[:64]",
    "--image-size",
    "8",
    "--num-experts",
    "4",
    "--override",
    "patch_size=4",
    "--override",
    "num_layers=2",
    "--override",
    "hidden_dim=8",
    "--override",
    "mlp_dim=16",
    "--override",
    "num_heads=2",
    "--override",
    "group_size=2",
    "--override",
    "representation_size=8",
    "--override",
    "dropout_rate=0.2",
    "--batch-size",
    "16",
    "--steps",
    "5",
    "--steps-per-epoch",
    "2",
    "--eval-split",
    "none",
    "--learning-rate",
    "1e-2",
    "--seed",
    "3",
    "--verbose",
    "0",
]


def _preset_weights(output):
    model = from_preset(os.path.join(output, "preset"))
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def test_train_command_resume_is_exact(tmp_path, capsys):
    """5 steps as epochs of 2, 2, 1 (the last stops at step 5)."""
    full = str(tmp_path / "full")
    assert cli.main([*TRAIN, "--output", full]) == 0

    part = str(tmp_path / "part")
    args = cli.build_parser().parse_args([*TRAIN, "--output", part])
    with pytest.raises(KeyboardInterrupt):
        train_command.run(args, callbacks=[Interrupt(1)])
    # One device (`--no-distribution`): Keras' backup files. The sharded
    # Orbax backup of a mesh run is tests/cli/test_train_distributed.py's.
    assert run_outputs.resume_epoch(os.path.join(part, "backup"), False) == 1
    # A changed argument is refused on resume; the saved ones are reused.
    assert cli.main(["train", "--output", part, "--resume", "--seed", "4"]) == 2
    assert "--seed differ" in capsys.readouterr().err
    # run.json keeps the device layout: a one-device run resumes on one
    # device without --no-distribution (on JAX, with 8 simulated devices).
    resume = ["train", "--output", part, "--resume"]
    assert cli.main([*resume, "--verbose", "0"]) == 0
    assert not os.path.exists(os.path.join(part, "backup"))

    for a, b in zip(_preset_weights(full), _preset_weights(part), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with open(os.path.join(full, "history.json")) as f:
        h_full = json.load(f)
    with open(os.path.join(part, "history.json")) as f:
        h_part = json.load(f)
    assert h_full["epoch"] == h_part["epoch"] == [1, 2, 3]
    for key in ("loss", "accuracy", "learning_rate"):
        np.testing.assert_allclose(h_part[key], h_full[key], rtol=1e-5, err_msg=key)
    with open(os.path.join(part, "log.csv")) as f:
        rows = f.read().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    # Finished: nothing left to resume.
    assert cli.main(["train", "--output", part, "--resume"]) == 2
    assert "has finished" in capsys.readouterr().err
