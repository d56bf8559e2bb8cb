"""Devices and processes of `keras-vmoe train`: the mesh and JAX's runtime.

On the JAX backend a run uses every device it can see. `plan_mesh` picks a
`(batch, expert)` device mesh: the expert axis is as large as the number
of experts and the devices of one process allow (expert parallelism within
a host: its all-to-alls stay on the host's interconnect), the batch axis
takes the rest (data parallelism: gradients are all-reduced over it).
`--mesh batch=2,expert=4` sets the axes, `--no-distribution` turns it off.
The layout of the weights is `keras_vmoe.distribution.get_layout_map`.
run.json keeps the layout a run trained on (`layout_record`), and
`--resume` reuses it (`resumed_layout`): a one-device run resumes on one
device, a mesh run on the same mesh, or on another given by `--mesh`.

With `--coordinator HOST:PORT --num-processes N --process-id I` (or the
`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES` and
`KERAS_DISTRIBUTION_PROCESS_ID` variables of `keras.distribution.initialize`)
one process runs per host on JAX's distributed runtime
(`jax.distributed.initialize`). Each process then reads only its own data
shards and feeds its rows of every global batch
(`keras_vmoe.cli.train_setup.training_stream`), the processes check that
they agree on the run's settings before anything is trained
(`check_agreement`), and few-shot features are computed by all of them
together (`sharded_features`).

Every way of failing to form the cluster (an unreachable coordinator,
processes that disagree on `--num-processes` or share a `--process-id`)
ends with a one-line error: at once when process 0's `RollCall` (on the
coordinator's port + 1) refuses a second process with the same id, else
after `--distributed-timeout` seconds. JAX itself would abort the process
without a word about the cause, or wait.
"""

import hashlib
import json
import math
import os
import sys
import threading

from keras_vmoe.cli.train_arguments import usage_error

ENV_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
DEFAULT_TIMEOUT = 120
MESH_AXES = ("batch", "expert")


def add_distribution_arguments(parser):
    """Adds the device and process flags of `keras-vmoe train` (own group)."""
    group = parser.add_argument_group(
        "distribution (JAX)",
        "Devices and processes. run.json keeps the device layout, which "
        "--resume reuses (--mesh moves a run to other devices).",
    )
    a = group.add_argument
    a(
        "--mesh",
        metavar="batch=B,expert=E",
        help="Device mesh (default: every device; expert axis as large as the "
        "experts and one host's devices allow, batch axis the rest).",
    )
    a(
        "--no-distribution",
        action="store_true",
        help="Train on one device (no device mesh).",
    )
    a(
        "--coordinator",
        metavar="HOST:PORT",
        help="Process 0's address (multi-host); `auto` lets JAX discover the "
        "cluster (Cloud TPU, SLURM, Open MPI).",
    )
    a("--num-processes", type=int, help="Processes in the run (one per host).")
    a("--process-id", type=int, help="This process's index, 0 .. N-1.")
    a(
        "--distributed-timeout",
        type=int,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="Give up forming the cluster (or waiting on a lost process) "
        f"after this long (default {DEFAULT_TIMEOUT}).",
    )


# ---------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------


def _from_env(name, cast=str):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return cast(value)
    except ValueError:
        raise usage_error(f"${name} must be an integer, got {value!r}.") from None


def process_settings(args):
    """`(coordinator, num_processes, process_id)` from the flags or environment.

    `(None, 1, 0)` for a single process. Raises `UsageError` for an
    incomplete or inconsistent set.

    Example:
    >>> import argparse
    >>> process_settings(argparse.Namespace(
    ...     coordinator="10.0.0.1:1234", num_processes=2, process_id=1))
    ('10.0.0.1:1234', 2, 1)
    """
    coordinator = getattr(args, "coordinator", None)
    if coordinator is None:
        addresses = _from_env(ENV_ADDRESSES)
        coordinator = addresses.split(",")[0] if addresses else None
    num = getattr(args, "num_processes", None)
    if num is None:
        num = _from_env(ENV_NUM_PROCESSES, int)
    pid = getattr(args, "process_id", None)
    if pid is None:
        pid = _from_env(ENV_PROCESS_ID, int)
    if coordinator is None and num in (None, 1) and pid in (None, 0):
        return None, 1, 0
    if coordinator == "auto":
        return "auto", num, pid  # JAX fills in what is not given
    if coordinator is None or num is None or pid is None:
        raise usage_error(
            "a multi-process run needs --coordinator HOST:PORT, --num-processes "
            f"and --process-id (or ${ENV_ADDRESSES}, ${ENV_NUM_PROCESSES}, "
            f"${ENV_PROCESS_ID}); got coordinator={coordinator}, "
            f"num_processes={num}, process_id={pid}."
        )
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise usage_error(f"--coordinator must be HOST:PORT, got {coordinator!r}.")
    if num < 1:
        raise usage_error(f"--num-processes must be >= 1, got {num}.")
    if not 0 <= pid < num:
        raise usage_error(
            f"--process-id must be in [0, {num - 1}] for --num-processes {num}, "
            f"got {pid}."
        )
    return coordinator, num, pid


def _abort_after(seconds, message):
    """A started timer that prints `message` and ends the process."""

    def abort():
        print(f"keras-vmoe train: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, abort)
    timer.daemon = True
    timer.start()
    return timer


def _check_port_free(coordinator):
    """Raises `UsageError` when process 0 cannot listen on the coordinator's
    port: most likely another process was also given `--process-id 0` (JAX
    would abort both, saying only that a "newer incarnation" connected)."""
    import socket

    port = int(coordinator.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as e:
            raise usage_error(
                f"process 0 cannot listen on port {port} of --coordinator "
                f"{coordinator} ({e.strerror}): is another process running with "
                "--process-id 0?"
            ) from None


def _read_line(conn, limit=4096):
    """One `\n`-ended line from a socket (at most `limit` bytes)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk or len(data) > limit:
            raise ValueError("the roll call's peer closed or sent too much")
        data += chunk
    return data.decode()


class RollCall:
    """Process 0's register of the process ids, on the coordinator's port + 1.

    JAX's coordination service takes a second process with the same
    `--process-id` for a restart of the first and aborts every process of
    the cluster (a SIGABRT and a C++ stack trace); nothing that has joined
    can be asked first. So before joining, each other process claims its id
    here (`claim_process_id`) and holds the claim as long as it runs: a
    second claim of a held id, or of an id outside the cluster, is refused
    with a clear error and that process never reaches JAX. Started by
    process 0 before it joins; it serves until the process ends.

    Args:
        port: int. The port to listen on (the coordinator's + 1).
        num_processes: int. Processes of the cluster.

    Example:

    ```python
    roll_call = RollCall(1235, num_processes=2)  # process 0, --coordinator :1234
    # process 1, elsewhere, before jax.distributed.initialize:
    claim_process_id("host0:1234", 2, 1, deadline=time.monotonic() + 120)
    ```
    """

    def __init__(self, port, num_processes):
        import socket

        self.num_processes = num_processes
        self.held = {0: {"host": socket.gethostname(), "pid": os.getpid()}}
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._server.bind(("0.0.0.0", port))
        except OSError as e:
            self._server.close()
            raise usage_error(
                f"process 0 cannot listen on port {port} (the roll call of the "
                f"processes, --coordinator's port + 1) ({e.strerror}): is another "
                "process running with --process-id 0?"
            ) from None
        self._server.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self):
        """Stops listening (claims already held stay until they end)."""
        self._server.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        claimed = None
        try:
            conn.settimeout(30)
            claim = json.loads(_read_line(conn))
            pid = int(claim["process_id"])
            with self._lock:
                if not 0 <= pid < self.num_processes:
                    reply = {
                        "error": f"--process-id {pid} is not in the cluster of "
                        f"process 0, which has {self.num_processes} processes"
                    }
                elif pid in self.held:
                    holder = self.held[pid]
                    reply = {
                        "error": f"another process already runs as --process-id "
                        f"{pid} (host {holder.get('host')}, pid {holder.get('pid')})"
                    }
                else:
                    self.held[pid] = claim
                    claimed = pid
                    reply = {"ok": True}
            conn.sendall((json.dumps(reply) + "\n").encode())
            if claimed is not None:
                conn.settimeout(None)
                while conn.recv(256):  # held until the process ends
                    pass
        except (OSError, ValueError, KeyError, TypeError):
            pass
        finally:
            if claimed is not None:
                with self._lock:
                    self.held.pop(claimed, None)
            conn.close()


_held_claim = []  # the socket that holds this process's claim, while it runs


def claim_process_id(coordinator, num_processes, process_id, deadline):
    """Claims `process_id` at process 0's `RollCall` before joining JAX.

    Retries until process 0 listens or `deadline` passes (then returns: the
    watchdog of `initialize_processes` reports it). The claim is held until
    this process ends. Raises `UsageError` when process 0 refuses it: the
    id is held by another process, or outside process 0's cluster.

    Args:
        coordinator: str. `HOST:PORT` of process 0 (the roll call is on
            `PORT + 1`).
        num_processes: int. This process's `--num-processes`.
        process_id: int. This process's `--process-id`.
        deadline: float. `time.monotonic()` after which to stop trying.
    """
    import socket
    import time

    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    while True:
        try:
            conn = socket.create_connection((host, int(port) + 1), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.25)
    claim = {
        "process_id": process_id,
        "num_processes": num_processes,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    try:
        conn.sendall((json.dumps(claim) + "\n").encode())
        reply = json.loads(_read_line(conn))
    except (OSError, ValueError):
        conn.close()
        return  # not a roll call; the watchdog reports what follows
    if not reply.get("ok"):
        conn.close()
        raise usage_error(
            f"process {process_id} cannot join the run at {coordinator}: "
            f"{reply.get('error')}. Give every process the same --num-processes "
            "and its own --process-id."
        )
    conn.settimeout(None)
    _held_claim.append(conn)


def initialize_processes(coordinator, num_processes, process_id, timeout):
    """Joins JAX's distributed runtime, or ends the process within `timeout` s.

    JAX aborts the process (SIGABRT, with a C++ stack trace about
    `RegisterTask`) when the cluster does not form, after its own
    `initialization_timeout`. A watchdog fires first, names the likely
    causes and exits with status 1. Before joining, process 0 checks that
    its port is free and starts the `RollCall` on the next port; every
    other process claims its id there (`claim_process_id`), so that a
    second process with the same `--process-id` stops with a clear error
    instead of making JAX abort the whole cluster.
    """
    import time

    import jax

    if jax.distributed.is_initialized():
        return
    roll_call = coordinator != "auto" and num_processes is not None
    if process_id == 0 and coordinator != "auto":
        _check_port_free(coordinator)
        if roll_call:
            RollCall(int(coordinator.rpartition(":")[2]) + 1, num_processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who = "this process" if process_id is None else f"process {process_id}"
    size = "" if num_processes is None else f" of {num_processes} processes"
    watchdog = _abort_after(
        timeout,
        f"{who} could not join a cluster{size} at {coordinator} within "
        f"{timeout} s: check that process 0 "
        "runs and is reachable there, and that every process got the same "
        "--num-processes and its own --process-id.",
    )
    try:
        if roll_call and process_id != 0:
            claim_process_id(
                coordinator, num_processes, process_id, time.monotonic() + timeout
            )
        jax.distributed.initialize(
            coordinator_address=None if coordinator == "auto" else coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout + 30,
            heartbeat_timeout_seconds=max(10, timeout),
            shutdown_timeout_seconds=max(10, timeout),
        )
        # The first computation meets the other processes (topology exchange).
        jax.devices()
    finally:
        watchdog.cancel()


def jax_process_count():
    import jax

    return jax.process_count()


def jax_process_index():
    import jax

    return jax.process_index()


def process_index():
    """This process's index (0 without JAX's distributed runtime)."""
    import keras

    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def process_count():
    import keras

    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def is_chief():
    """Whether this process writes the logs and the preset (process 0)."""
    return process_index() == 0


def barrier(name):
    """Waits for every process (no-op with one)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def settings_digest(settings):
    """A 128-bit digest of JSON-able settings, as 4 uint32.

    Example:
    >>> settings_digest({"a": 1}).tolist() == settings_digest({"a": 1}).tolist()
    True
    """
    import numpy as np

    text = json.dumps(settings, sort_keys=True, default=str)
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32)


def check_agreement(settings, num_processes):
    """Raises `UsageError` unless every process has the same `settings`.

    Every process calls it right after joining: the digests of all
    processes are gathered (a collective), so all of them see the same
    disagreement and stop, naming the processes that differ from process 0.
    """
    import jax
    from jax.experimental import multihost_utils

    # Gathered first, over the cluster process 0 formed: a process that was
    # given another --num-processes still takes part, so every process
    # sees the disagreement (and none waits for the others in vain).
    if jax.process_count() > 1:
        digests = multihost_utils.process_allgather(settings_digest(settings))
        differ = [i for i in range(len(digests)) if (digests[i] != digests[0]).any()]
        if differ:
            raise usage_error(
                "the processes disagree on the run's settings (arguments or "
                f"--num-processes): process(es) {', '.join(map(str, differ))} "
                "differ from process 0; give every process the same arguments."
            )
    if jax.process_count() != num_processes:
        raise usage_error(
            f"--num-processes {num_processes} disagrees with the cluster of "
            f"process 0, which has {jax.process_count()} processes."
        )


def sharded_features(placement, group_size, layer_name="pre_logits"):
    """A `FewShotEvaluator(feature_fn=...)` that runs on the mesh of every process.

    With several processes no process can run the model alone (its weights
    are sharded across them), so each feature batch is one collective
    forward pass: every process calls the function with the same batch
    (each reads the few-shot sets whole; they are small), puts its own
    slice of the rows on its devices (process `i` of `n`: the `i`-th of
    `n` equal slices, the rows its devices hold on the mesh's batch axis),
    and gets the features of the whole batch back (gathered from every
    process: a `(batch, d)` array, small). The batch, whole routing groups
    from `keras_vmoe.evaluation.predict_in_groups`, is padded with copies
    of its last group to whole groups on every batch shard of the mesh;
    whole groups of padding leave the routing of the others unchanged, and
    their features are dropped. The features are those of the model's
    layer `layer_name`, in inference mode.

    Args:
        placement: dict. The run's placement (`setup`), with a mesh.
        group_size: int. Images per routing group.
        layer_name: str. The feature layer. Defaults to `"pre_logits"`.

    Returns:
        callable `fn(model, images) -> (batch, d)` NumPy features.

    Example:

    ```python
    evaluator = FewShotEvaluator.from_dataset_names(
        ["digits"], (8, 8, 1), feature_fn=sharded_features(placement, 2))
    ```
    """
    import jax
    import keras
    import numpy as np
    from jax.experimental import multihost_utils

    count, index = placement["num_processes"], placement["process_id"]
    unit = placement["mesh"]["batch"] * group_size
    distribution = placement["distribution"]
    cache = {}

    def features(model, images):
        if cache.get("model") is not model:
            layer = model.get_layer(layer_name)
            inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
            feature_model = keras.Model(inputs, layer.output)

            def forward(trainable, non_trainable, x):
                y, _ = feature_model.stateless_call(
                    trainable, non_trainable, x, training=False
                )
                return y

            cache.update(model=model, net=feature_model, forward=jax.jit(forward))
        images = np.asarray(images)
        n = len(images)
        size = -(-n // unit) * unit
        if size > n:  # whole groups of padding: copies of the last group
            last = images[n - group_size :]
            images = np.concatenate([images, *[last] * ((size - n) // group_size)])
        rows = size // count
        layout = distribution.get_data_layout(images.shape).backend_layout
        x = jax.make_array_from_process_local_data(
            layout, images[index * rows : (index + 1) * rows], images.shape
        )
        net = cache["net"]
        y = cache["forward"](
            [v.value for v in net.trainable_variables],
            [v.value for v in net.non_trainable_variables],
            x,
        )  # (size, d), sharded over the processes
        return np.asarray(multihost_utils.process_allgather(y, tiled=True))[:n]

    return features


# ---------------------------------------------------------------------------
# The device mesh.
# ---------------------------------------------------------------------------


def parse_mesh(text):
    """`{"batch": B, "expert": E}` from `--mesh batch=B,expert=E`.

    A missing axis has size 1.

    Example:
    >>> parse_mesh("batch=2,expert=4")
    {'batch': 2, 'expert': 4}
    >>> parse_mesh("expert=8")
    {'batch': 1, 'expert': 8}
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for item in str(text).split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES or name in seen:
            raise usage_error(
                f"--mesh must be batch=B,expert=E (each axis once), got {text!r}."
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise usage_error(
                f"--mesh: {name} must be an integer, got {value!r}."
            ) from None
        if sizes[name] < 1:
            raise usage_error(f"--mesh: {name} must be >= 1, got {sizes[name]}.")
        seen.add(name)
    return sizes


def plan_mesh(
    num_devices,
    local_devices,
    num_experts,
    batch_size,
    group,
    num_processes=1,
    spec=None,
):
    """The `{"batch": B, "expert": E}` mesh of a run, checked.

    Without `spec`, the expert axis is the largest size that divides both
    the number of experts and the devices of one process, and the batch
    axis takes the other devices. Raises `UsageError` when the experts
    would be replicated on several devices (an MoE model on an expert axis
    of 1), when the expert axis does not divide the experts or spans
    processes, when the batch axis cannot be split over the processes, or
    when a batch shard would not hold whole routing groups.

    Args:
        num_devices: int. Devices of all processes.
        local_devices: int. Devices of this process.
        num_experts: int or None. Experts per MoE layer (None: a dense ViT).
        batch_size: int. The global batch.
        group: int. Images per routing group.
        num_processes: int. Defaults to `1`.
        spec: dict or None. `parse_mesh(--mesh)`. Defaults to `None` (auto).

    Example:
    >>> plan_mesh(8, 8, num_experts=4, batch_size=32, group=4)
    {'batch': 2, 'expert': 4}
    >>> plan_mesh(8, 4, num_experts=32, batch_size=32, group=4, num_processes=2)
    {'batch': 2, 'expert': 4}
    >>> plan_mesh(4, 4, num_experts=None, batch_size=32, group=1)
    {'batch': 4, 'expert': 1}
    """
    if spec is None:
        expert = math.gcd(local_devices, num_experts) if num_experts else 1
        sizes = {"batch": num_devices // expert, "expert": expert}
        where = f"chosen for {num_devices} devices"
    else:
        sizes = dict(spec)
        where = "--mesh"
        if sizes["batch"] * sizes["expert"] != num_devices:
            raise usage_error(
                f"--mesh batch={sizes['batch']},expert={sizes['expert']} has "
                f"{sizes['batch'] * sizes['expert']} devices; this run has "
                f"{num_devices}."
            )
    batch, expert = sizes["batch"], sizes["expert"]
    if num_experts:
        if expert == 1 and num_devices > 1:
            raise usage_error(
                f"the mesh {where} (batch={batch}, expert=1) would replicate "
                f"the {num_experts} experts of every MoE layer on all "
                f"{num_devices} devices: no expert axis size > 1 divides both "
                f"the experts and the {local_devices} devices of a process. "
                "Change --num-experts, give --mesh, or --no-distribution."
            )
        if num_experts % expert:
            raise usage_error(
                f"{num_experts} experts cannot be sharded on an expert axis of "
                f"{expert} ({where}): the axis must divide the number of experts."
            )
    elif expert > 1:
        raise usage_error(
            f"the model has no experts; an expert axis of {expert} would "
            "replicate it. Use --mesh batch=N."
        )
    if num_processes > 1:
        if local_devices % expert:
            raise usage_error(
                f"the expert axis ({expert}) must divide the {local_devices} "
                "devices of each process (experts are sharded within a host)."
            )
        if batch % num_processes:
            raise usage_error(
                f"the batch axis ({batch}) must be a multiple of the "
                f"{num_processes} processes."
            )
    if batch_size % (batch * group):
        raise usage_error(
            f"--batch-size {batch_size} must split into {batch} batch shards "
            f"of whole routing groups of {group} images (a multiple of "
            f"{batch * group})."
        )
    return sizes


def model_experts(cfg):
    """`(experts per MoE layer or None, routing group in images)` of the run's
    model, read from the preset's config and the overrides (the mesh must
    exist before the model's weights are created)."""
    from keras_vmoe.models import preset_loader

    try:
        folder = preset_loader.resolve_preset(cfg["preset"])
        backbone_cls, config, *_ = preset_loader._load_configs(folder)
        config = preset_loader._apply_backbone_overrides(
            backbone_cls, config, cfg["overrides"]
        )
    except (ValueError, TypeError) as e:
        raise usage_error(str(e).splitlines()[0]) from None
    if config.get("router") is None or config.get("moe_layers") in ([], ()):
        return None, 1
    return config.get("num_experts"), int(config.get("group_size") or 1)


def make_distribution(sizes):
    """The `keras.distribution.ModelParallel` on a `(batch, expert)` mesh.

    Datasets are not auto-sharded: each process already streams its own rows.
    """
    import keras

    from keras_vmoe.distribution import get_layout_map

    mesh = keras.distribution.DeviceMesh(
        (sizes["batch"], sizes["expert"]),
        MESH_AXES,
        keras.distribution.list_devices(),
    )
    layout_map = get_layout_map(mesh, data_axis="batch", expert_axis="expert")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
    )
    return distribution, layout_map


def check_model_layout(model, placement):
    """Raises unless every weight of `model` has the layout the map intends.

    Catches a weight that no key of the layout map matches (Keras would
    replicate it silently) and experts that are not on the expert axis.
    """
    from keras_vmoe.distribution import EXPERT_WEIGHTS, layout_problems

    problems = layout_problems(model, placement["layout_map"])
    if problems:
        listed = "; ".join(f"{p.path}: {p.reason}" for p in problems[:3])
        raise usage_error(
            f"{len(problems)} weight(s) would not be laid out as intended on the "
            f"mesh: {listed}"
        )
    experts = [w for w in model.weights if w.path.endswith(tuple(EXPERT_WEIGHTS))]
    if placement["mesh"]["expert"] > 1 and not experts:
        raise usage_error("the model has no experts to shard on the expert axis.")


def layout_record(placement):
    """The device layout of a run as saved in run.json (`layout`).

    Example:
    >>> layout_record({"mesh": {"batch": 2, "expert": 4}, "num_devices": 8,
    ...                "num_processes": 2})
    {'mesh': {'batch': 2, 'expert': 4}, 'num_devices': 8, 'num_processes': 2}
    """
    return {
        "mesh": placement["mesh"],
        "num_devices": placement.get("num_devices", 1),
        "num_processes": placement["num_processes"],
    }


def resumed_layout(cfg, mesh_spec, off, multi):
    """`(mesh spec, no distribution, reused layout)`, the saved layout applied.

    On `--resume` without `--mesh` or `--no-distribution`, the run goes
    on with the layout run.json saved: one device when it trained on one
    (its backup holds whole weights), else the same mesh (its Orbax backup
    is read into it). Given flags win. The third value is the saved layout
    when its mesh was reused (its device count is checked once JAX runs).

    Args:
        cfg: dict. The run's settings (`resume`, `output`, and `layout`
            from run.json).
        mesh_spec: dict or None. `parse_mesh(--mesh)`.
        off: bool. `--no-distribution`.
        multi: bool. Several processes were asked for.

    Example:
    >>> saved = {"mesh": None, "num_devices": 1, "num_processes": 1}
    >>> resumed_layout({"resume": True, "output": "run", "layout": saved},
    ...                None, False, False)
    (None, True, None)
    """
    saved = cfg.get("layout") if cfg.get("resume") else None
    if not isinstance(saved, dict) or mesh_spec is not None or off:
        return mesh_spec, off, None
    if saved.get("mesh") is None:
        if multi:
            raise usage_error(
                f"the run in {cfg['output']!r} trained on one device (its backup "
                "holds whole weights): resume it in one process."
            )
        return None, True, None
    return {k: int(saved["mesh"][k]) for k in MESH_AXES}, False, saved


def setup(args, cfg):
    """Joins the processes and picks the mesh; returns the run's placement.

    On `--resume`, the layout saved in run.json is reused
    (`resumed_layout`); a saved mesh whose device count differs from this
    run's is refused, naming `--mesh`.

    Returns:
        dict with `num_processes`, `process_id`, `mesh` (sizes or None),
        `num_devices` (those the run trains on), `distribution` and
        `layout_map` (None without a mesh).
    """
    import keras

    coordinator, num, pid = process_settings(args)
    mesh_spec = parse_mesh(args.mesh) if getattr(args, "mesh", None) else None
    off = bool(getattr(args, "no_distribution", False))
    mesh_spec, off, reused = resumed_layout(
        cfg, mesh_spec, off, coordinator is not None
    )
    timeout = getattr(args, "distributed_timeout", DEFAULT_TIMEOUT)
    if timeout is None or timeout < 1:
        raise usage_error(f"--distributed-timeout must be >= 1, got {timeout}.")
    placement = {
        "num_processes": num,
        "process_id": pid,
        "mesh": None,
        "num_devices": 1,
        "distribution": None,
        "layout_map": None,
    }
    multi = coordinator is not None
    if off and (mesh_spec is not None or multi):
        raise usage_error("--no-distribution cannot go with --mesh or processes.")
    if keras.backend.backend() != "jax":
        if reused is not None:
            mesh_spec = None  # the backup says where it can resume
        if mesh_spec is not None or multi:
            raise usage_error(
                "--mesh and multi-process runs need the JAX backend "
                "(keras.distribution shards on JAX only)."
            )
        return placement
    if coordinator == "auto":
        initialize_processes(coordinator, num, pid, timeout)
        num = jax_process_count()
        pid = jax_process_index()
        placement.update(num_processes=num, process_id=pid)
    elif num > 1:
        initialize_processes(coordinator, num, pid, timeout)
    if num > 1:
        check_agreement(
            {
                "run": {k: v for k, v in cfg.items() if k != "verbose"},
                "mesh": mesh_spec,
                "num_processes": num,
            },
            num,
        )
    if off:
        return placement
    import jax

    num_devices = jax.device_count()
    if reused is not None and reused.get("num_devices") != num_devices:
        mesh = reused["mesh"]
        raise usage_error(
            f"the run in {cfg['output']!r} trained on a mesh batch={mesh['batch']} "
            f"x expert={mesh['expert']} of {reused.get('num_devices')} devices; "
            f"this run has {num_devices}: give --mesh batch=B,expert=E for "
            f"{num_devices} devices (the backup is read into it)."
        )
    if num_devices == 1 and mesh_spec is None:
        return placement
    num_experts, group = model_experts(cfg)
    sizes = plan_mesh(
        num_devices,
        jax.local_device_count(),
        num_experts,
        cfg["batch_size"],
        group,
        num_processes=num,
        spec=mesh_spec,
    )
    distribution, layout_map = make_distribution(sizes)
    placement.update(
        mesh=sizes,
        num_devices=num_devices,
        distribution=distribution,
        layout_map=layout_map,
    )
    return placement
