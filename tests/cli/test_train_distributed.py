"""`keras-vmoe train` on a device mesh, in one process and in two.

The test session has 8 simulated CPU devices (tests/conftest.py), so the
one-process runs happen here; the two-process runs start `keras-vmoe
train` twice with 4 devices each on JAX's distributed runtime (gloo CPU
collectives, coordinator on 127.0.0.1). Those are marked `multiprocess`
and run on the JAX backend only; one two-process run (killed, then
resumed) serves every test of it, and every subprocess has a timeout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
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
# 4 steps of 16 images in 2 epochs; validation on 20 test images; 1-shot
# few-shot on the digits after epoch 2. `TRAIN` has 2 data shards (each of
# 2 processes reads one; a single process reads both), the default of a
# two-process run.
TRAIN_BASE = [
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
    *("--fewshot", "digits", "--shots", "1", "--fewshot-every", "2"),
    *("--learning-rate", "1e-2", "--seed", "3", "--verbose", "0"),
]
TRAIN = [*TRAIN_BASE, "--data-shards", "2"]
FEWSHOT = "fewshot/digits/1shot"
TIMEOUT = 20  # --distributed-timeout of the multi-process runs


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


def _stream(shard, data_shards=2, steps=3, monkeypatch=None):
    """`steps` batches of 16 from step 1 on; with `monkeypatch`, also the
    splits that the stream asked `keras_vmoe.data.load` for."""
    from keras_vmoe import data

    asked = []
    if monkeypatch is not None:
        real = data.load

        def load(name, split, *args, **kwargs):
            asked.append(split)
            return real(name, split, *args, **kwargs)

        monkeypatch.setattr(data, "load", load)
    ds = train_setup.training_stream(
        "digits",
        "train[:64]",
        (8, 8, 1),
        16,
        4,
        start_step=1,
        seed=5,
        shuffle_buffer=64,
        data_shards=data_shards,
        shard=shard,
    )
    return [(x, y) for x, y in ds.take(steps).as_numpy_iterator()], asked


def _rows(images):
    """The rows of `images (n, ...)` as a sorted list of bytes."""
    return sorted(row.tobytes() for row in np.asarray(images))


def test_each_process_reads_only_its_data_shard(monkeypatch):
    from keras_vmoe import data

    whole, _ = _stream(None)
    halves = [_stream((p, 2), monkeypatch=monkeypatch)[0] for p in range(2)]
    for step in range(3):
        # Each process holds 8 of the 16 images of each step...
        assert [h[step][0].shape[0] for h in halves] == [8, 8]
        # ...and together, in process order, they are the whole batch of a
        # single process with the same 2 data shards.
        for i in (0, 1):
            joined = np.concatenate([h[step][i] for h in halves])
            np.testing.assert_array_equal(joined, whole[step][i])
    # Process p asked TFDS for block p of the 64 records only (32 each).
    for p in range(2):
        rows, asked = _stream((p, 2), steps=4, monkeypatch=monkeypatch)
        assert set(asked) == {f"train[{32 * p}:{32 * (p + 1)}]"}, asked
        # Steps 1..3 and 4 (pass 1 starts at step 4): 24 + 8 images, every
        # one from the block (the 8 x 8 digits pass through unchanged but
        # for the scaling), each of steps 1..3 a different record.
        block = data.train_pipeline(
            data.load("digits", f"train[{32 * p}:{32 * (p + 1)}]"),
            8,
            32,
            random_crop=False,
            flip=False,
            shuffle_buffer=0,
        )
        block_rows = set(_rows(next(iter(block))[0].numpy()))
        seen = _rows(np.concatenate([x for x, _ in rows]))
        assert set(seen) <= block_rows
        assert len(set(_rows(np.concatenate([x for x, _ in rows[:3]])))) == 24


def test_one_data_shard_streams_one_pipeline_over_the_split():
    # With one data shard the stream is train_pipeline over the whole split
    # with the pass's seed (what runs streamed before data shards existed).
    from keras_vmoe import data

    stream, _ = _stream(None, data_shards=1, steps=2)
    direct = data.train_pipeline(
        data.load("digits", "train[:64]"),
        (8, 8),
        16,
        random_crop=False,
        flip=False,
        channels=1,
        shuffle_buffer=64,
        seed=train_setup.pass_seed(5, 0),
    )
    direct = list(direct.skip(1).take(2).as_numpy_iterator())
    for (x, y), (dx, dy) in zip(stream, direct, strict=True):
        np.testing.assert_array_equal(x, dx)
        np.testing.assert_array_equal(y, dy)


def _validation(shard, data_shards, mesh_batch, batch=12, group=3):
    cfg = {"batch_size": batch, "dataset": "digits", "eval_split": "test[:20]"}
    cfg.update(data_dir=None, data_shards=data_shards)
    ds = train_setup.validation_data(
        cfg, (8, 8, 1), group, 20, shard=shard, mesh_batch=mesh_batch
    )
    return int(ds.cardinality().numpy()), list(ds.as_numpy_iterator())


def test_validation_pads_each_data_shard_to_whole_groups():
    from keras_vmoe import data
    from keras_vmoe.evaluation import group_padded

    truth = np.array([int(e["label"]) for e in data.load("digits", "test[:20]")])
    # 2 data shards of 10 images (test[0:10], test[10:20]), groups of 3:
    # each is padded to 12 rows, the short last group [9] cycling through
    # itself (rows 10, 11 are image 9). Batches of 12 hold 6 rows of each
    # shard; on 2 processes each gets its own shard's 6 rows. 12 is also a
    # whole number of mesh units here (lcm(3, 2 * 3 / gcd(2, 6)) = 3).
    parts = [_validation((p, 2), 2, 2) for p in range(2)]
    assert [n for n, _ in parts] == [2, 2]  # fit() knows the number of batches
    for p, (_, batches) in enumerate(parts):
        assert [len(b[0]) for b in batches] == [6, 6]
        labels = np.concatenate([b[1] for b in batches])
        weights = np.concatenate([b[2] for b in batches])
        shard = truth[10 * p : 10 * (p + 1)]
        np.testing.assert_array_equal(labels, [*shard, shard[9], shard[9]])
        np.testing.assert_array_equal(weights, [1.0] * 10 + [0.0] * 2)
    # One process with the same 2 data shards feeds both halves, in order.
    _, whole = _validation(None, 2, 2)
    for step in range(2):
        for k in range(3):
            np.testing.assert_array_equal(
                whole[step][k],
                np.concatenate([parts[0][1][step][k], parts[1][1][step][k]]),
            )
    # One data shard on a mesh batch axis of 2: 20 images in groups of 3 make
    # 21 rows (row 20 is image 18, the short group cycling), then whole
    # groups of padding (images 0, 1, 2) up to a multiple of 2 x 3 = 24.
    _, batches = _validation(None, 1, 2)
    labels = np.concatenate([b[1] for b in batches])
    weights = np.concatenate([b[2] for b in batches])
    np.testing.assert_array_equal(labels, [*truth, truth[18], *truth[:3]])
    np.testing.assert_array_equal(weights, [1.0] * 20 + [0.0] * 4)
    # One data shard, one device: keras_vmoe.evaluation.group_padded.
    _, batches = _validation(None, 1, 1)
    plain = group_padded(
        data.eval_pipeline(data.load("digits", "test[:20]"), 8, 12, crop_fraction=None),
        3,
    )
    for ours, theirs in zip(batches, plain.as_numpy_iterator(), strict=True):
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


def test_roll_call_refuses_a_second_process_with_the_same_id():
    # Process 0's roll call (on the coordinator's port + 1) for 3 processes.
    port = free_ports()
    roll_call = dist.RollCall(port + 1, num_processes=3)
    coordinator = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    dist.claim_process_id(coordinator, 3, 1, deadline)
    with pytest.raises(
        UsageError, match="another process already runs as --process-id 1"
    ):
        dist.claim_process_id(coordinator, 3, 1, deadline)
    with pytest.raises(
        UsageError, match="not in the cluster of process 0, which has 3"
    ):
        dist.claim_process_id(coordinator, 4, 3, deadline)
    with pytest.raises(UsageError, match="cannot listen on port"):
        dist.RollCall(port + 1, num_processes=3)  # a second process 0
    # A claim is held while its process runs: once it ends, the id is free.
    held = dist._held_claim.pop()
    assert set(roll_call.held) == {0, 1}
    held.close()
    for _ in range(100):
        if 1 not in roll_call.held:
            break
        time.sleep(0.05)
    dist.claim_process_id(coordinator, 3, 1, deadline)
    dist._held_claim.pop().close()
    roll_call.close()


def test_a_second_process_zero_is_refused():
    # Process 0 listens on the coordinator's port (JAX) and the next one
    # (the roll call): a second process 0 finds either taken.
    port = free_ports()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen(1)
        with pytest.raises(UsageError, match="is another process running with"):
            dist._check_port_free(f"127.0.0.1:{port}")
    dist._check_port_free(f"127.0.0.1:{port}")  # free again


def test_resume_reuses_the_saved_layout():
    cfg = {"resume": True, "output": "runs/x"}
    mesh = {"batch": 2, "expert": 4}
    one = {"mesh": None, "num_devices": 1, "num_processes": 1}
    eight = {"mesh": mesh, "num_devices": 8, "num_processes": 1}
    # A one-device run resumes on one device, a mesh run on its mesh.
    assert dist.resumed_layout({**cfg, "layout": one}, None, False, False) == (
        None,
        True,
        None,
    )
    assert dist.resumed_layout({**cfg, "layout": eight}, None, False, False) == (
        mesh,
        False,
        eight,
    )
    # Given flags win; a new run or a run.json without a layout changes nothing.
    given = {"batch": 1, "expert": 8}
    assert dist.resumed_layout({**cfg, "layout": eight}, given, False, False) == (
        given,
        False,
        None,
    )
    assert dist.resumed_layout({**cfg, "layout": None}, None, False, False) == (
        None,
        False,
        None,
    )
    assert (
        dist.resumed_layout({"resume": False, "layout": one}, None, False, False)[1]
        is False
    )
    with pytest.raises(UsageError, match="trained on one device"):
        dist.resumed_layout({**cfg, "layout": one}, None, False, True)


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
    # Few-shot after epoch 2 only (--fewshot-every 2), over all 360 digits
    # of the test split: the same features give the same accuracy.
    assert a[FEWSHOT][0] is None and b[FEWSHOT][0] is None
    assert 0.1 < b[FEWSHOT][1] <= 1
    np.testing.assert_allclose(a[FEWSHOT][1], b[FEWSHOT][1], atol=1e-6)
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


def _run_json(out):
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


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


@JAX_ONLY
def test_run_json_keeps_the_device_layout_for_resume(runs, capsys):
    single, mesh = _run_json(runs["single"]), _run_json(runs["mesh"])
    assert single["layout"] == {"mesh": None, "num_devices": 1, "num_processes": 1}
    assert mesh["layout"] == {
        "mesh": {"batch": 2, "expert": 4},
        "num_devices": 8,
        "num_processes": 1,
    }
    assert single["arguments"]["data_shards"] == mesh["arguments"]["data_shards"] == 2
    # A mesh run resumed on other devices is refused before anything is
    # built, naming --mesh (the same run on 4 devices, unfinished).
    moved = runs["root"] / "moved"
    moved.mkdir()
    record = {**mesh, "layout": {**mesh["layout"], "num_devices": 4}}
    (moved / "run.json").write_text(json.dumps(record))
    assert cli.main(["train", "--output", str(moved), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained on a mesh batch=2 x expert=4 of 4 devices; this run has 8" in err
    assert "give --mesh" in err


# ---------------------------------------------------------------------------
# JAX, two processes of 4 devices each.
# ---------------------------------------------------------------------------

# Runs `keras-vmoe train` with argv from sys.argv[1] (JSON). With
# $RECORD_WRITES, records every file or folder the process creates or
# renames under the run folder; with $RECORD_LOADS, how many records each
# `keras_vmoe.data.load(name, split)` it asked for yielded; with
# $PAUSE_FILE, writes that file and sleeps when epoch 1 begins (after the
# backup of epoch 0), to be killed there.
LAUNCHER = r"""
import builtins, io, json, os, sys, time, atexit
argv = json.loads(sys.argv[1])
# JAX writes its persistent compilation cache from process 0 only (against
# write contention on shared file systems); on this local disk process 1
# may write its own programs too, which a later run (the resume, the next
# session) then reads instead of compiling them again.
try:
    import jax._src.compiler as _compiler, jax._src.distributed as _distributed
    _write = _compiler._cache_write
    def _cache_write(*args, **kwargs):
        state = _distributed.global_state
        pid, state.process_id = state.process_id, 0
        try:
            return _write(*args, **kwargs)
        finally:
            state.process_id = pid
    _compiler._cache_write = _cache_write
except (ImportError, AttributeError):
    pass
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
    def dump():
        with io.open(record, "w") as f:
            json.dump(written, f)
    atexit.register(dump)
import keras
from keras_vmoe import cli
from keras_vmoe.cli import train as command
loads = os.environ.get("RECORD_LOADS")
if loads:
    import tensorflow as tf
    from keras_vmoe import data
    counts = {}
    real_load = data.load
    def counted_load(name, split, *args, **kwargs):
        key = f"{name}:{split}"
        counts.setdefault(key, 0)
        def count(label):
            counts[key] += 1
            return label
        def tap(element):
            label = element["label"]
            seen = tf.numpy_function(count, [label], label.dtype, stateful=True)
            return {**element, "label": tf.ensure_shape(seen, label.shape)}
        return real_load(name, split, *args, **kwargs).map(tap)
    data.load = counted_load
    def dump_loads():
        with io.open(loads, "w") as f:
            json.dump(counts, f)
    atexit.register(dump_loads)
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


def free_ports():
    """A free port whose next port is free too (the coordinator's and the
    roll call's)."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def launch(argv, tmp, name, env=None):
    """Starts the launcher; stdout and stderr go to tmp/name.log.

    4 simulated devices; the compiler's cheapest code generation (these
    programs run a few steps), and JAX's persistent compilation cache in
    the one of tests/conftest.py, every program cached.
    """
    environ = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4 "
        "--xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
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


def read_json(tmp, name):
    with open(os.path.join(tmp, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bad_settings(tmp_path_factory):
    """Processes started with bad settings (they end by themselves, most
    after `TIMEOUT` s of waiting for a cluster that cannot form); started
    before the two-process run, so that their wait overlaps its training."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX's distributed runtime: JAX backend only")
    tmp = tmp_path_factory.mktemp("bad")
    argv = [*TRAIN, "--distributed-timeout", str(TIMEOUT)]
    ids, count, nobody = (f"127.0.0.1:{free_ports()}" for _ in range(3))
    runs = {
        # Process 0 and two processes 1 of a cluster of 3 (whose process 2
        # never comes). A second process 0 is refused before it starts
        # anything (`test_a_second_process_zero_is_refused`).
        "zero": ("ids", processes(ids, 3, 0)),
        "one_a": ("ids", processes(ids, 3, 1)),
        "one_b": ("ids", processes(ids, 3, 1)),
        # Process 1 thinks there are 3 processes.
        "count_0": ("count", processes(count, 2, 0)),
        "count_1": ("count", processes(count, 3, 1)),
        # Nothing listens at the coordinator's address.
        "unreachable": ("nobody", processes(nobody, 2, 1)),
    }
    procs = {
        name: launch([*argv, "--output", str(tmp / folder), *flags], str(tmp), name)
        for name, (folder, flags) in runs.items()
    }
    ended = {}  # name -> time.time() when the process was seen to end

    def watch():
        deadline = time.monotonic() + 300
        while len(ended) < len(procs) and time.monotonic() < deadline:
            for name, p in procs.items():
                if name not in ended and p.poll() is not None:
                    ended[name] = time.time()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield {
        "procs": procs,
        "ended": ended,
        "watcher": watcher,
        "tmp": str(tmp),
        "ids": ids,
    }
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def two_processes(bad_settings, tmp_path_factory):
    """`TRAIN_BASE` on two processes of 4 devices (data shards: one per
    process, the default): process 1 is killed when epoch 1 begins (after
    the backup of epoch 0), then both restart with `--resume` and finish,
    recording the files they write and the records they read."""
    tmp = str(tmp_path_factory.mktemp("two"))
    out = os.path.join(tmp, "run")
    pause = os.path.join(tmp, "paused")
    argv = [*TRAIN_BASE, "--output", out, "--distributed-timeout", str(TIMEOUT)]
    coordinator = f"127.0.0.1:{free_ports()}"
    procs = [
        launch(
            [*argv, *processes(coordinator, 2, pid)],
            tmp,
            f"first{pid}",
            env={"PAUSE_FILE": pause} if pid == 1 else None,
        )
        for pid in (0, 1)
    ]
    deadline = time.monotonic() + 600
    while not os.path.exists(pause):
        assert time.monotonic() < deadline, "process 1 never reached epoch 1"
        assert procs[0].poll() is None, read_log(tmp, "first0")
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    killed = time.monotonic()
    # Process 0 has lost its peer in the middle of a step; while it ends
    # (it must, by itself), both restart on another port. It writes nothing
    # more: its step fails, and the last backup is that of epoch 0.
    coordinator = f"127.0.0.1:{free_ports()}"
    resume = ["train", "--output", out, "--resume", "--verbose", "0"]
    resumed = [
        launch(
            [*resume, *processes(coordinator, 2, pid)],
            tmp,
            f"resume{pid}",
            env={
                "RECORD_WRITES": os.path.join(tmp, f"writes{pid}.json"),
                "RECORD_LOADS": os.path.join(tmp, f"loads{pid}.json"),
            },
        )
        for pid in (0, 1)
    ]
    try:
        procs[0].wait(3 * TIMEOUT)
    except subprocess.TimeoutExpired:
        for p in (procs[0], *resumed):
            p.kill()
        pytest.fail(f"process 0 still ran {3 * TIMEOUT} s after losing process 1")
    lost_peer_s = time.monotonic() - killed
    codes = finish(resumed, 600)
    assert codes == [0, 0], read_log(tmp, "resume0") + read_log(tmp, "resume1")
    return {"out": out, "tmp": tmp, "lost_peer_s": lost_peer_s}


@JAX_ONLY
@pytest.mark.multiprocess
def test_two_processes_equal_one_process_across_a_kill_and_resume(runs, two_processes):
    tmp, out = two_processes["tmp"], two_processes["out"]
    assert "resuming at epoch 2" in read_log(tmp, "resume0")
    # Epoch 1 trained before the kill, epoch 2 after the resume, both on two
    # processes: the same run as on the 8 devices of one process with the
    # same 2 data shards (loss, metrics, few-shot, final weights).
    _assert_same_run(out, runs["mesh"])
    saved = _run_json(out)
    assert saved["arguments"]["data_shards"] == 2  # one per process
    assert saved["layout"] == {
        "mesh": {"batch": 2, "expert": 4},
        "num_devices": 8,
        "num_processes": 2,
    }


@JAX_ONLY
@pytest.mark.multiprocess
def test_each_process_read_only_its_half(two_processes):
    tmp = two_processes["tmp"]
    for pid in (0, 1):
        counts = read_json(tmp, f"loads{pid}.json")
        # Records read, by the split asked for: the whole splits were only
        # sized (check_dataset), process p read its block of the 64
        # training and of the 20 validation images: all of it (the resumed
        # pass rebuilds the block's shuffle), nothing of the other half.
        read = {split: n for split, n in counts.items() if n}
        assert set(read) == {
            f"digits:train[{32 * pid}:{32 * pid + 32}]",
            f"digits:test[{10 * pid}:{10 * pid + 10}]",
        }, counts
        assert read[f"digits:train[{32 * pid}:{32 * pid + 32}]"] >= 32
        assert read[f"digits:test[{10 * pid}:{10 * pid + 10}]"] >= 10
        assert counts.get("digits:train[:64]", 0) == 0
        assert counts.get("digits:test[:20]", 0) == 0


@JAX_ONLY
@pytest.mark.multiprocess
def test_process_zero_alone_writes_logs_and_preset(two_processes):
    tmp = two_processes["tmp"]
    # Process 0 alone wrote the logs, run.json and the preset; process 1
    # wrote only its shards of the Orbax checkpoints.
    writes = []
    for pid in (0, 1):
        writes.append(
            {
                w
                for w in read_json(tmp, f"writes{pid}.json")
                if not w.startswith(("backup", "checkpoints"))
            }
        )
    assert {"history.json", "log.csv", "run.json"} <= writes[0]
    assert any(w.startswith("preset") for w in writes[0])
    assert writes[1] == set(), writes[1]
    assert "saved the trained preset" in read_log(tmp, "resume0")
    assert "saved the trained preset" not in read_log(tmp, "resume1")
    # The process that lost its peer ended by itself.
    assert two_processes["lost_peer_s"] < 3 * TIMEOUT


@JAX_ONLY
@pytest.mark.multiprocess
def test_bad_process_settings_end_with_a_clear_error(bad_settings, tmp_path):
    # A --process-id outside [0, N) is refused before joining anything.
    argv = [*TRAIN, "--output", str(tmp_path / "r"), *processes("127.0.0.1:1", 2, 2)]
    assert cli.main(argv) == 2
    procs, tmp, ids = bad_settings["procs"], bad_settings["tmp"], bad_settings["ids"]
    bad_settings["watcher"].join(300)
    ended = bad_settings["ended"]
    assert set(ended) == set(procs), f"still running: {set(procs) - set(ended)}"
    codes = {name: p.returncode for name, p in procs.items()}
    logs = {name: read_log(tmp, name) for name in procs}
    # Each ended within 60 s of being ready to run the command (starting
    # Python and importing Keras on a loaded machine is not counted).
    for name in procs:
        ready = float(logs[name].split("launcher ready at ")[1].split()[0])
        assert ended[name] - ready < 60, (name, ended[name] - ready)

    def join_error(pid, count):
        return f"error: process {pid} could not join a cluster of {count} processes"

    # Process 0 waits for the cluster of 3, which never forms. Of the two
    # processes 1, the roll call of process 0 refuses the second (which
    # never reaches JAX, so the others are not aborted); the first waits too.
    assert codes["zero"] == 1 and join_error(0, 3) in logs["zero"], logs["zero"]
    refused = [n for n in ("one_a", "one_b") if codes[n] == 2]
    assert len(refused) == 1, (logs["one_a"], logs["one_b"])
    waited = ({"one_a", "one_b"} - set(refused)).pop()
    assert codes[waited] == 1 and join_error(1, 3) in logs[waited], logs[waited]
    assert (
        f"cannot join the run at {ids}: another process already runs as --process-id 1"
    ) in logs[refused[0]]
    assert codes["unreachable"] == 1, logs["unreachable"]
    assert join_error(1, 2) in logs["unreachable"]
    for name in ("count_0", "count_1"):
        assert codes[name] == 2, logs[name]
        assert "disagree" in logs[name], logs[name]
