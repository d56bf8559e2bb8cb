"""`keras-vmoe train` on a device mesh, in one process and in two.

The test session has 8 simulated CPU devices (tests/conftest.py), so the
one-process runs happen here; the two-process runs start `keras-vmoe
train` twice with 4 devices each on JAX's distributed runtime (gloo CPU
collectives, coordinator on 127.0.0.1). Those are slow on a shared CPU and
run on the JAX backend only; every subprocess has a timeout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.cli import train as train_command
from keras_vmoe.cli import train_distribution as dist
from keras_vmoe.cli import train_setup
from keras_vmoe.cli.errors import UsageError
from keras_vmoe.distribution import EXPERT_WEIGHTS
from keras_vmoe.models import from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JAX_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution and JAX's distributed runtime: JAX backend only",
)
# A tiny V-MoE (4 experts in block 1, groups of 2 images) on 64 digits,
# 4 steps of 16 images in 2 epochs; validation on 20 test images.
TRAIN = [
    "train",
    "--preset",
    "vmoe_softmax_tc_s32_e32_224",
    "--dataset",
    "digits",
    "--train-split",
    "train[:64]",
    "--eval-split",
    "test[:20]",
    "--image-size",
    "8",
    "--num-experts",
    "4",
    *("--override", "patch_size=4", "--override", "num_layers=2"),
    *("--override", "hidden_dim=8", "--override", "mlp_dim=16"),
    *("--override", "num_heads=2", "--override", "group_size=2"),
    *("--override", "representation_size=8"),
    *("--batch-size", "16", "--steps", "4", "--steps-per-epoch", "2"),
    *("--learning-rate", "1e-2", "--seed", "3", "--verbose", "0"),
]
TIMEOUT = 20  # --distributed-timeout of the failing multi-process runs


# ---------------------------------------------------------------------------
# Every backend: flags, mesh plan and input shards (no devices involved).
# ---------------------------------------------------------------------------


def test_plan_mesh():
    # gcd(8 local devices, 4 experts) = 4 on the expert axis, 8 / 4 on batch.
    assert dist.plan_mesh(8, 8, 4, 16, 2) == {"batch": 2, "expert": 4}
    # 2 processes of 4 devices, 8 experts: experts within a host, gcd(4, 8).
    assert dist.plan_mesh(8, 4, 8, 16, 2, num_processes=2) == {
        "batch": 2,
        "expert": 4,
    }
    assert dist.plan_mesh(8, 8, 8, 16, 2, spec={"batch": 1, "expert": 8}) == {
        "batch": 1,
        "expert": 8,
    }
    with pytest.raises(UsageError, match="cannot be sharded on an expert axis of 8"):
        dist.plan_mesh(8, 8, 4, 16, 2, spec={"batch": 1, "expert": 8})
    # 3 experts on 8 devices: gcd 1 would replicate the experts.
    with pytest.raises(UsageError, match="would replicate the 3 experts"):
        dist.plan_mesh(8, 8, 3, 16, 2)
    with pytest.raises(UsageError, match="has 4 devices; this run has 8"):
        dist.plan_mesh(8, 8, 4, 16, 2, spec={"batch": 1, "expert": 4})
    # 12 images on 2 batch shards of groups of 4: 6 is not whole groups.
    with pytest.raises(UsageError, match="a multiple of 8"):
        dist.plan_mesh(8, 8, 4, 12, 4)
    # The expert axis may not span processes; the batch axis must.
    with pytest.raises(UsageError, match="must divide the 4 devices of each"):
        dist.plan_mesh(8, 4, 8, 16, 2, num_processes=2, spec={"batch": 1, "expert": 8})
    with pytest.raises(UsageError, match="no experts"):
        dist.plan_mesh(8, 8, None, 16, 1, spec={"batch": 2, "expert": 4})
    assert dist.parse_mesh("expert=4, batch=2") == {"batch": 2, "expert": 4}
    for bad in ("batch=2,batch=4", "model=2", "batch=0", "batch=x"):
        with pytest.raises(UsageError, match="--mesh"):
            dist.parse_mesh(bad)


def test_process_settings(monkeypatch):
    import argparse

    def settings(**flags):
        keys = ("coordinator", "num_processes", "process_id")
        return dist.process_settings(
            argparse.Namespace(**{**dict.fromkeys(keys), **flags})
        )

    for name in (dist.ENV_ADDRESSES, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert settings() == (None, 1, 0)
    with pytest.raises(UsageError, match=r"--process-id must be in \[0, 1\]"):
        settings(coordinator="127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(UsageError, match="HOST:PORT"):
        settings(coordinator="127.0.0.1", num_processes=2, process_id=0)
    with pytest.raises(UsageError, match="needs --coordinator"):
        settings(num_processes=2)
    # The variables of keras.distribution.initialize (first address = coordinator).
    monkeypatch.setenv(dist.ENV_ADDRESSES, "10.0.0.1:1234,10.0.0.2:2345")
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(dist.ENV_PROCESS_ID, "1")
    assert settings() == ("10.0.0.1:1234", 2, 1)
    assert settings(process_id=0) == ("10.0.0.1:1234", 2, 0)


def _stream(shard):
    ds = train_setup.training_stream(
        "digits", "train[:64]", (8, 8, 1), 16, 4, start_step=1, seed=5, shard=shard
    )
    return [(x, y) for x, y in ds.take(3).as_numpy_iterator()]


def test_each_process_streams_its_rows_of_every_batch():
    whole = _stream(None)
    halves = [_stream((p, 2)) for p in range(2)]
    for step in range(3):
        # Each process holds 8 of the 16 images of each step...
        assert [h[step][0].shape[0] for h in halves] == [8, 8]
        # ...and together, in process order, they are the whole batch.
        for i in (0, 1):
            joined = np.concatenate([h[step][i] for h in halves])
            np.testing.assert_array_equal(joined, whole[step][i])


def test_sharded_validation_pads_to_whole_groups_of_the_mesh():
    # 20 images, groups of 3, a mesh batch axis of 2 over 2 processes,
    # batches of 12: padded to whole units of 2 x 3 = 6, 24 rows. Rows
    # 0..19 are the images; row 20 completes the short group 18, 19 by
    # cycling through it (image 18); rows 21..23 are a whole group of
    # padding. Batches of 12, 12: each process gets 6 rows of each.
    cfg = {"batch_size": 12, "dataset": "digits", "eval_split": "test[:20]"}
    cfg["data_dir"] = None
    parts = [
        list(
            train_setup.sharded_validation_data(
                cfg, (8, 8, 1), 3, 20, (p, 2), 2
            ).as_numpy_iterator()
        )
        for p in range(2)
    ]
    # fit() is told the number of batches (the filters would hide it).
    assert (
        int(
            train_setup.sharded_validation_data(cfg, (8, 8, 1), 3, 20, (0, 2), 2)
            .cardinality()
            .numpy()
        )
        == 2
    )
    # 24 rows in all (4 groups of 6): batches of 12, 12 -> 6 + 6 per process.
    assert [[len(b[0]) for b in part] for part in parts] == [[6, 6], [6, 6]]
    labels = np.concatenate([b[1] for step in zip(*parts) for b in step])
    weights = np.concatenate([b[2] for step in zip(*parts) for b in step])
    from keras_vmoe import data

    truth = np.array([int(e["label"]) for e in data.load("digits", "test[:20]")])
    np.testing.assert_array_equal(labels[:20], truth)
    np.testing.assert_array_equal(labels[20], truth[18])  # the short group cycles
    np.testing.assert_array_equal(weights, [1.0] * 20 + [0.0] * 4)


# ---------------------------------------------------------------------------
# JAX, one process: 8 simulated devices vs one device.
# ---------------------------------------------------------------------------


class RecordShardings(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        self.specs = {
            w.path: tuple(w.value.sharding.spec)
            for w in self.model.weights
            if w.path.endswith(tuple(EXPERT_WEIGHTS))
        }


def _history(out):
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


def _preset_weights(out):
    model = from_preset(os.path.join(out, "preset"))
    return {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}


def _assert_same_run(out, reference):
    a, b = _history(out), _history(reference)
    assert a["epoch"] == b["epoch"] == [1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    ours, theirs = _preset_weights(out), _preset_weights(reference)
    assert list(ours) == list(theirs)
    for path, x in ours.items():
        if path.endswith("attention/key/bias"):
            # Its gradient is 0 in exact arithmetic (a key bias adds q.b to
            # every logit of a query alike, and softmax ignores that): what
            # the runs compute is rounding noise, which depends on the order
            # of summation and which Adam divides by its own tiny scale.
            # Initialised at 0, it stays at noise level (measured ~1.6e-5,
            # against weights of order 0.5) in both runs.
            assert np.abs(x).max() < 1e-4 and np.abs(theirs[path]).max() < 1e-4
            continue
        np.testing.assert_allclose(x, theirs[path], rtol=1e-5, atol=1e-5, err_msg=path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-device and 8-device runs of `TRAIN` (the latter also records the
    shardings of the expert weights at the end of training)."""
    import jax

    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    root = tmp_path_factory.mktemp("runs")
    single, mesh = str(root / "single"), str(root / "mesh")
    assert cli.main([*TRAIN, "--output", single, "--no-distribution"]) == 0
    record = RecordShardings()
    args = cli.build_parser().parse_args([*TRAIN, "--output", mesh])
    assert train_command.run(args, callbacks=[record]) == 0
    return {"single": single, "mesh": mesh, "specs": record.specs, "root": root}


@JAX_ONLY
def test_eight_devices_equal_one_device(runs, capsys):
    _assert_same_run(runs["mesh"], runs["single"])
    # The live expert weights were sharded on the expert axis (4 experts on
    # a batch=2 x expert=4 mesh), not just mapped so.
    assert len(runs["specs"]) == len(EXPERT_WEIGHTS)
    for path, spec in runs["specs"].items():
        assert spec[0] == "expert", path
    # The backups and best weights are Orbax checkpoints of the mesh run.
    assert os.path.isfile(
        os.path.join(runs["mesh"], "checkpoints", "best", "1", "_CHECKPOINT_METADATA")
    ) or os.path.isdir(os.path.join(runs["mesh"], "checkpoints", "best"))
    # A mesh that does not divide the experts is refused before training.
    out = str(runs["root"] / "bad")
    assert cli.main([*TRAIN, "--output", out, "--mesh", "batch=1,expert=8"]) == 2
    assert "cannot be sharded" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# JAX, two processes of 4 devices each.
# ---------------------------------------------------------------------------

# Runs `keras-vmoe train` with argv from sys.argv[1] (JSON). Records every
# file or folder the process creates or renames under the run folder
# ($RECORD_WRITES), and with $PAUSE_FILE, writes that file and sleeps when
# epoch 1 begins (after the backup of epoch 0), to be killed there.
LAUNCHER = r"""
import builtins, json, os, sys, time
argv = json.loads(sys.argv[1])
record = os.environ.get("RECORD_WRITES")
if record:
    run = os.path.abspath(argv[argv.index("--output") + 1])
    written = []
    def note(path):
        path = os.path.abspath(os.fspath(path))
        if path.startswith(run + os.sep):
            written.append(os.path.relpath(path, run))
    def wrap(fn, is_write=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if args and is_write(*args, **kwargs):
                note(args[-1] if fn.__name__ in ("replace", "rename") else args[0])
            return fn(*args, **kwargs)
        wrapped.__name__ = fn.__name__
        return wrapped
    def opens_for_writing(file, mode="r", *a, **k):
        return isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")
    builtins.open = wrap(builtins.open, opens_for_writing)
    for name in ("replace", "rename", "mkdir", "makedirs"):
        setattr(os, name, wrap(getattr(os, name)))
    import atexit, io
    def dump():
        with io.open(record, "w") as f:
            json.dump(written, f)
    atexit.register(dump)
import keras
from keras_vmoe import cli
from keras_vmoe.cli import train as command
print(f"launcher ready at {time.time()}", flush=True)
pause = os.environ.get("PAUSE_FILE")
class Pause(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            with open(pause, "w") as f:
                f.write("paused")
            time.sleep(600)
if pause:
    sys.exit(command.run(cli.build_parser().parse_args(argv), callbacks=[Pause()]))
sys.exit(cli.main(argv))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, tmp, name, env=None):
    """Starts the launcher; stdout and stderr go to tmp/name.log."""
    environ = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        KERAS_BACKEND="jax",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    log = open(os.path.join(tmp, name + ".log"), "w")
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, json.dumps(argv)],
        cwd=ROOT,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def processes(coordinator, count, pid):
    return [
        *("--coordinator", coordinator),
        *("--num-processes", str(count), "--process-id", str(pid)),
    ]


def finish(procs, timeout):
    """Waits for every process; kills them all and fails past `timeout`."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process did not end within {timeout} s")
    return codes


def read_log(tmp, name):
    with open(os.path.join(tmp, name + ".log")) as f:
        return f.read()


@JAX_ONLY
@pytest.mark.multiprocess
def test_two_processes_equal_one_process_and_resume_after_a_kill(runs, tmp_path):
    tmp = str(tmp_path)
    out = str(tmp_path / "two")
    port = free_port()
    procs = [
        launch(
            [*TRAIN, "--output", out, *processes(f"127.0.0.1:{port}", 2, pid)],
            tmp,
            f"run{pid}",
            env={"RECORD_WRITES": os.path.join(tmp, f"writes{pid}.json")},
        )
        for pid in (0, 1)
    ]
    assert finish(procs, 900) == [0, 0], read_log(tmp, "run0") + read_log(tmp, "run1")
    # The same run as on the 8 devices of one process.
    _assert_same_run(out, runs["mesh"])
    # Process 0 alone wrote the logs and the preset; process 1 wrote only
    # its shards of the Orbax checkpoints.
    writes = []
    for pid in (0, 1):
        with open(os.path.join(tmp, f"writes{pid}.json")) as f:
            writes.append(
                {w for w in json.load(f) if not w.startswith(("backup", "checkpoints"))}
            )
    assert {"history.json", "log.csv", "run.json"} <= writes[0]
    assert any(w.startswith("preset") for w in writes[0])
    assert writes[1] == set(), writes[1]
    assert "saved the trained preset" in read_log(tmp, "run0")
    assert "saved the trained preset" not in read_log(tmp, "run1")

    # Kill process 1 in epoch 1 (after the backup of epoch 0), then restart
    # both with --resume: the same final weights.
    part = str(tmp_path / "part")
    port = free_port()
    pause = os.path.join(tmp, "paused")
    first = [*TRAIN, "--output", part, "--distributed-timeout", str(TIMEOUT)]
    procs = [
        launch(
            [*first, *processes(f"127.0.0.1:{port}", 2, pid)],
            tmp,
            f"part{pid}",
            env={"PAUSE_FILE": pause} if pid == 1 else None,
        )
        for pid in (0, 1)
    ]
    deadline = time.monotonic() + 600
    while not os.path.exists(pause):
        assert time.monotonic() < deadline, "process 1 never reached epoch 1"
        assert procs[0].poll() is None, read_log(tmp, "part0")
        time.sleep(1)
    procs[1].send_signal(signal.SIGKILL)
    # Process 0 loses its peer: JAX ends it within the heartbeat timeout.
    try:
        procs[0].wait(3 * TIMEOUT)
    except subprocess.TimeoutExpired:
        procs[0].kill()
    procs[1].wait()
    assert not os.path.isdir(os.path.join(part, "preset"))
    port = free_port()
    resume = ["train", "--output", part, "--resume", "--verbose", "0"]
    procs = [
        launch([*resume, *processes(f"127.0.0.1:{port}", 2, pid)], tmp, f"resume{pid}")
        for pid in (0, 1)
    ]
    assert finish(procs, 900) == [0, 0], read_log(tmp, "resume0")
    assert "resuming at epoch 2" in read_log(tmp, "resume0")
    _assert_same_run(part, runs["mesh"])


@JAX_ONLY
@pytest.mark.multiprocess
def test_bad_process_settings_end_with_a_clear_error(tmp_path):
    tmp = str(tmp_path)
    argv = [*TRAIN, "--distributed-timeout", str(TIMEOUT)]

    def run_dir(name):
        return ["--output", str(tmp_path / name)]

    # A --process-id outside [0, N) is refused before joining anything.
    assert cli.main([*argv, *run_dir("r"), *processes("127.0.0.1:1", 2, 2)]) == 2
    start = time.monotonic()
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    procs = {
        # Two processes that both say --process-id 0.
        "same_id_0": launch(
            [*argv, *run_dir("a"), *processes(f"127.0.0.1:{port_a}", 2, 0)],
            tmp,
            "same_id_0",
        ),
        # Process 1 thinks there are 3 processes.
        "count_0": launch(
            [*argv, *run_dir("b"), *processes(f"127.0.0.1:{port_b}", 2, 0)],
            tmp,
            "count_0",
        ),
        "count_1": launch(
            [*argv, *run_dir("b"), *processes(f"127.0.0.1:{port_b}", 3, 1)],
            tmp,
            "count_1",
        ),
        # Nothing listens at the coordinator's address.
        "unreachable": launch(
            [*argv, *run_dir("c"), *processes(f"127.0.0.1:{port_c}", 2, 1)],
            tmp,
            "unreachable",
        ),
    }
    # The second process 0 starts once the first listens on the port.
    while "launcher ready" not in read_log(tmp, "same_id_0"):
        assert time.monotonic() - start < 300
        time.sleep(0.5)
    time.sleep(5)
    procs["same_id_1"] = launch(
        [*argv, *run_dir("a"), *processes(f"127.0.0.1:{port_a}", 2, 0)],
        tmp,
        "same_id_1",
    )
    ended = {}
    while len(ended) < len(procs):
        assert time.monotonic() - start < 300, (
            f"still running: {set(procs) - set(ended)}"
        )
        for name, p in procs.items():
            if name not in ended and p.poll() is not None:
                ended[name] = time.time()
        time.sleep(0.2)
    codes = {name: p.returncode for name, p in procs.items()}
    # Each ended within 60 s of being ready to run the command (starting
    # Python and importing Keras on a loaded machine is not counted).
    for name in procs:
        ready = float(read_log(tmp, name).split("launcher ready at ")[1].split()[0])
        assert ended[name] - ready < 60, (name, ended[name] - ready)
    join_error = "error: process 0 could not join a cluster of 2 processes"
    port_error = "error: process 0 cannot listen on port"
    # The first process 0 waits for a process 1 that never comes; the second
    # finds the coordinator's port taken.
    assert codes["same_id_0"] == 1, read_log(tmp, "same_id_0")
    assert join_error in read_log(tmp, "same_id_0")
    assert codes["same_id_1"] == 2, read_log(tmp, "same_id_1")
    assert port_error in read_log(tmp, "same_id_1")
    assert codes["unreachable"] == 1, read_log(tmp, "unreachable")
    assert "error: process 1 could not join a cluster of 2 processes" in read_log(
        tmp, "unreachable"
    )
    for name in ("count_0", "count_1"):
        assert codes[name] == 2, read_log(tmp, name)
        assert "disagree" in read_log(tmp, name), read_log(tmp, name)
