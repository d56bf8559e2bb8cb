"""Devices and processes of `keras-vmoe train`: the mesh and JAX's runtime.

On the JAX backend a run uses every device it can see. `plan_mesh` picks a
`(batch, expert)` device mesh: the expert axis is as large as the number
of experts and the devices of one process allow (expert parallelism within
a host: its all-to-alls stay on the host's interconnect), the batch axis
takes the rest (data parallelism: gradients are all-reduced over it).
`--mesh batch=2,expert=4` sets the axes, `--no-distribution` turns it off.
The layout of the weights is `keras_vmoe.distribution.get_layout_map`.

With `--coordinator HOST:PORT --num-processes N --process-id I` (or the
`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES` and
`KERAS_DISTRIBUTION_PROCESS_ID` variables of `keras.distribution.initialize`)
one process runs per host on JAX's distributed runtime
(`jax.distributed.initialize`). Each process then feeds its own rows of
every global batch (`shard`), and the processes check that they agree on
the run's settings before anything is trained (`check_agreement`).

Every way of failing to form the cluster (an unreachable coordinator,
processes that disagree on `--num-processes` or share a `--process-id`)
ends with a one-line error after `--distributed-timeout` seconds: JAX
itself would abort the process without a word about the cause, or wait.
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
        "Devices and processes; not saved in run.json (a run may resume on "
        "other hardware).",
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


def initialize_processes(coordinator, num_processes, process_id, timeout):
    """Joins JAX's distributed runtime, or ends the process within `timeout` s.

    JAX aborts the process (SIGABRT, with a C++ stack trace about
    `RegisterTask`) when the cluster does not form, after its own
    `initialization_timeout`. A watchdog fires first, names the likely
    causes and exits with status 1.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    if process_id == 0 and coordinator != "auto":
        _check_port_free(coordinator)
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


def setup(args, cfg):
    """Joins the processes and picks the mesh; returns the run's placement.

    Returns:
        dict with `num_processes`, `process_id`, `mesh` (sizes or None),
        `distribution` and `layout_map` (None without a mesh).
    """
    import keras

    coordinator, num, pid = process_settings(args)
    mesh_spec = parse_mesh(args.mesh) if getattr(args, "mesh", None) else None
    off = bool(getattr(args, "no_distribution", False))
    timeout = getattr(args, "distributed_timeout", DEFAULT_TIMEOUT)
    if timeout is None or timeout < 1:
        raise usage_error(f"--distributed-timeout must be >= 1, got {timeout}.")
    placement = {
        "num_processes": num,
        "process_id": pid,
        "mesh": None,
        "distribution": None,
        "layout_map": None,
    }
    multi = coordinator is not None
    if off and (mesh_spec is not None or multi):
        raise usage_error("--no-distribution cannot go with --mesh or processes.")
    if keras.backend.backend() != "jax":
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
    placement.update(mesh=sizes, distribution=distribution, layout_map=layout_map)
    return placement
