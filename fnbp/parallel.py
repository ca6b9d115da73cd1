"""Data-parallel training on JAX's own engine: meshes (Explicit or Auto), and several processes.

Use::

    mesh = fnbp.parallel.make_mesh()          # all visible devices (Explicit axis "data"); None if only one
    mesh = jax.make_mesh((8,), ("data",))     # or a user's own mesh, Explicit or Auto axes
    result = fnbp.train.train(params, opt, data, key=key, epochs=10, batch_size=256, mesh=mesh)

What happens (``fnbp.train.train`` calls :func:`place`, then jit-compiles one
epoch as before): parameters, optimizer state, batch-norm statistics and the
training set are replicated (``NamedSharding(mesh, P())``); inside the jitted
``lax.scan`` epoch each gathered mini-batch is split along its batch axis
(:func:`shard_batch`: ``reshard`` on an Explicit axis, ``with_sharding_constraint``
on an Auto one), B / N examples per device.  The step is the single-device
step, unchanged: XLA inserts the all-reduce of the weight gradient delta^T H
(a contraction over the sharded batch axis), of the bias gradients and loss,
and of batch norm's batch means (so the statistics are those of the global
batch, as on one device).  The rules return cotangents of their primal's type
on any mesh and inside ``shard_map`` (``fnbp.rules.as_cotangent``).  N devices
reproduce one device up to floating-point summation order; dropout masks are
the same (``jax_threefry_partitionable``).

``batch_size`` is the *global* batch B, divisible by the devices along the
batch axis (checked by :func:`place` before anything compiles).

Several processes (``jax.distributed``): call :func:`initialize` first in every
process (``fnbp train --coordinator HOST:PORT --num-processes N --process-id I``,
or ``--distributed`` for cluster auto-detection), with the same program,
arguments, data and key everywhere; :func:`make_mesh` then spans every device
of every process, each process fills its own devices from its identical host
copy (:func:`replicate`), each device gathers its slice of every global batch,
and only process 0 (:func:`is_main_process`) writes.  On CPU the collectives
run over gloo.  See ``docs/multihost.md`` (tested by ``tests/test_multiprocess.py``).
"""

import errno
import socket
import sys
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "make_mesh", "place", "check_batch_size", "replicate", "batch_sharding", "batch_axis",
           "shard_batch", "initialize", "CoordinatorError", "check_coordinator_port", "wait_for_coordinator",
           "is_main_process", "add_cli_arguments", "initialize_from_args",
           "mesh_for_cli"]

AXIS = "data"
COORDINATOR_TIMEOUT = 120          # seconds a process waits for the coordinator (fnbp train --coordinator-timeout)
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def make_mesh(n_devices=None, *, axis_type="explicit"):
    """A one-axis mesh named ``"data"`` over the first ``n_devices`` devices, or None for one device.

    ``n_devices=None``: all visible devices (``jax.devices()``; after
    :func:`initialize`, those of every process) when there are more than one,
    else None.  ``n_devices=1`` returns None (``train(..., mesh=None)`` is the
    single-device loop).  More devices than visible raises ValueError naming both
    numbers.  ``axis_type``: ``"explicit"`` (JAX's default for ``jax.make_mesh``:
    shardings are part of the arrays' types) or ``"auto"`` (GSPMD decides).  Any
    mesh a user builds with ``jax.make_mesh`` works as well (see :func:`batch_axis`).
    """
    if axis_type not in AXIS_TYPES:
        raise ValueError(f"fnbp.parallel.make_mesh: axis_type must be 'explicit' or 'auto', got {axis_type!r}")
    devices = jax.devices()
    available = len(devices)
    if n_devices is None:
        n = available
    else:
        if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)):
            raise TypeError(f"fnbp.parallel.make_mesh: n_devices must be a positive integer or None, "
                            f"got {n_devices!r}")
        n = int(n_devices)
        if n < 1:
            raise ValueError(f"fnbp.parallel.make_mesh: n_devices must be >= 1, got {n}")
        if n > available:
            hint = (" (on CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                    "set before JAX is imported)" if devices[0].platform == "cpu" else "")
            raise ValueError(f"fnbp.parallel.make_mesh: {n} devices requested but only {available} "
                             f"{devices[0].platform} device(s) available{hint}")
    if n <= 1:
        return None
    return Mesh(np.array(devices[:n]), (AXIS,), axis_types=(AXIS_TYPES[axis_type],))


def batch_axis(mesh):
    """The mesh axis the batch is split over: ``"data"`` if the mesh has it, else its only axis.

    Raises ValueError (naming the mesh's axes) for a several-axis mesh without a
    ``"data"`` axis.  Parameters are replicated over every axis (data parallelism).
    """
    names = tuple(mesh.axis_names)
    if AXIS in names:
        return AXIS
    if len(names) == 1:
        return names[0]
    raise ValueError(f"fnbp.parallel: a mesh with several axes needs one named {AXIS!r} to split the batch over, "
                     f"got axes {names} (e.g. jax.make_mesh((n,), ('data',)))")


def _is_explicit(mesh, axis):
    return mesh.axis_types[tuple(mesh.axis_names).index(axis)] == AxisType.Explicit


def check_batch_size(batch_size, n_devices, n_examples=None):
    """Raise ValueError unless the global batch splits evenly over the devices.

    The message names the nearest valid batch sizes (multiples of ``n_devices``;
    not above ``n_examples`` when given)."""
    B, n = int(batch_size), int(n_devices)
    if B % n:
        lower, upper = (B // n) * n, (B // n + 1) * n
        valid = [v for v in (lower, upper) if v > 0 and (n_examples is None or v <= n_examples)]
        nearest = (f"nearest valid batch sizes: {' or '.join(map(str, valid))}" if valid else
                   f"no valid batch size: fewer training examples ({n_examples}) than devices")
        raise ValueError(f"fnbp.parallel: global batch {B} is not divisible by {n} devices; {nearest} "
                         f"(each device takes batch / devices examples)")


def batch_sharding(mesh):
    """``NamedSharding(mesh, P(batch_axis(mesh)))``: the leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, P(batch_axis(mesh)))


def shard_batch(x, sharding):
    """Inside the jitted step: lay the mini-batch ``x`` out as ``sharding`` (its batch axis split).

    ``jax.sharding.reshard`` on an Explicit axis (the layout is part of the type),
    ``jax.lax.with_sharding_constraint`` on an Auto one (a hint to GSPMD)."""
    axis = sharding.spec[0]
    if _is_explicit(sharding.mesh, axis):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def replicate(mesh, tree):
    """Every array leaf of ``tree`` as a global array replicated on every device of ``mesh``.

    One process: ``jax.device_put``.  Several processes (multi-host): built from
    each process's own host copy, which must be identical on every process (each
    process fills its own devices; nothing crosses the network).
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def leaf(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(leaf, tree)


def place(mesh, batch_size, params, opt_state, state, x_train, y_train):
    """Lay out a training run on ``mesh``; returns
    ``(params, opt_state, state, x_train, y_train, batch_sharding)``.

    ``mesh``: :func:`make_mesh`'s, or a user's ``jax.make_mesh(...)`` (Explicit or
    Auto axes) with a ``"data"`` axis or a single axis (:func:`batch_axis`).
    Checks that the global ``batch_size`` is divisible by the devices along the
    batch axis (ValueError with the nearest valid sizes, before anything is
    compiled), replicates the parameters, optimizer state, batch-norm statistics
    and the training data on every device, and returns the mini-batches'
    ``NamedSharding(mesh, P(axis))`` (``fnbp.train.make_epoch(..., batch_sharding=...)``).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"fnbp.parallel.place: mesh must be a jax.sharding.Mesh (fnbp.parallel.make_mesh or "
                        f"jax.make_mesh), got {type(mesh).__name__}")
    axis = batch_axis(mesh)
    check_batch_size(batch_size, mesh.shape[axis], n_examples=x_train.shape[0])
    params, opt_state, state, x_train, y_train = replicate(mesh, (params, opt_state, state, x_train, y_train))
    return params, opt_state, state, x_train, y_train, batch_sharding(mesh)


class CoordinatorError(RuntimeError):
    """The coordinator of a multi-process run cannot be reached in time, or its port cannot be opened."""


def _split_address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_coordinator_port(address):
    """Process 0: raise CoordinatorError naming ``HOST:PORT`` when its port is already in use (another program
    listens there), instead of JAX's ``Failed to start RPC server``."""
    _, port = _split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as e:
            why = "it is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise CoordinatorError(f"fnbp.parallel: process 0 cannot start the coordinator at {address}: port {port} "
                                   f"cannot be opened ({why}); choose another port with --coordinator HOST:PORT "
                                   f"in every process") from e


def wait_for_coordinator(address, timeout, process_id=None, num_processes=None, *, poll=0.25):
    """Processes other than 0: wait up to ``timeout`` seconds until the coordinator at ``HOST:PORT`` accepts a
    TCP connection; CoordinatorError naming it otherwise (``jax.distributed.initialize`` would abort the
    process with a C++ fatal error instead).  Returns the seconds waited."""
    host, port = _split_address(address)
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(poll, 1.0)):
                return time.monotonic() - start
        except OSError as e:
            waited = time.monotonic() - start
            if waited >= timeout:
                who = f" (process {process_id} of {num_processes})" if process_id is not None else ""
                raise CoordinatorError(f"fnbp.parallel: no coordinator at {address} after {timeout:g} s{who}: "
                                       f"{e.strerror or e}; start process 0 with the same --coordinator, or raise "
                                       f"--coordinator-timeout") from None
            time.sleep(min(poll, timeout - waited))


def initialize(coordinator_address=None, num_processes=None, process_id=None, *, timeout=COORDINATOR_TIMEOUT,
               log=None):
    """Join a multi-process run (``jax.distributed.initialize``) before anything else uses JAX.

    With no arguments JAX detects the cluster (Cloud TPU, SLURM, Open MPI, or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
    environment variables).  On CPU the cross-process collectives use gloo
    (``jax_cpu_collectives_implementation``; GPUs use NCCL, TPUs their own
    interconnect, whatever this says).  Returns ``(process_index, process_count)``.

    With an explicit ``coordinator_address``: process 0 first checks that the port
    can be opened, the others wait up to ``timeout`` seconds for the coordinator to
    accept connections (printing "waiting for the coordinator at HOST:PORT (process
    i of N)" to ``log``, default stderr); both failures raise :class:`CoordinatorError`
    naming the address.  ``timeout`` is also JAX's ``initialization_timeout`` (all
    processes must join within it; a process that never joins still ends in JAX's
    own fatal error after it).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)) or not timeout > 0:
        raise ValueError(f"fnbp.parallel.initialize: timeout must be a number of seconds > 0, got {timeout!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log = sys.stderr if log is None else log
    if coordinator_address is not None and process_id is not None:
        if process_id == 0:
            check_coordinator_port(coordinator_address)
        else:
            print(f"waiting for the coordinator at {coordinator_address} (process {process_id} of {num_processes}; "
                  f"up to {timeout:g} s)", file=log, flush=True)
            wait_for_coordinator(coordinator_address, timeout, process_id, num_processes)
    kwargs = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                ("process_id", process_id)) if v is not None}
    jax.distributed.initialize(**kwargs, initialization_timeout=max(1, int(np.ceil(timeout))))
    return jax.process_index(), jax.process_count()


def is_main_process():
    """True in process 0 (the one that writes checkpoints, histories and plots), and when running alone."""
    return jax.process_index() == 0


# --- the command line: fnbp train --coordinator HOST:PORT --num-processes N --process-id I -------------------
def add_cli_arguments(parser):
    """Add the multi-process flags to an ``argparse`` (sub)parser (``fnbp train``)."""
    g = parser.add_argument_group("multi-process (jax.distributed; run the same command in every process)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="process 0's address and a free port, the same in every process")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    g.add_argument("--coordinator-timeout", type=_seconds, default=COORDINATOR_TIMEOUT, metavar="SECONDS",
                   help="how long a process waits for the coordinator (and for all processes to join) before "
                        "it gives up with exit code 3")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run detected from the cluster (Cloud TPU, SLURM, Open MPI, or "
                        "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)")


def _seconds(text):
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--coordinator-timeout must be a number of seconds, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"--coordinator-timeout must be a number of seconds > 0, got {text}")
    return v


def mesh_for_cli(devices, error=ValueError):
    """``fnbp train --devices N``'s mesh: N devices (0: all, of every process), None for one device.
    With several processes the mesh must span every device (``error`` otherwise)."""
    n = jax.device_count() if devices == 0 else devices
    if devices < 0 or (jax.process_count() > 1 and n != jax.device_count()):
        raise error(f"fnbp train: --devices must be 0 (all devices) or a count >= 1"
                    + (f"; with {jax.process_count()} processes the mesh spans every device of every process, "
                       f"so 0 or {jax.device_count()}" if jax.process_count() > 1 else "") + f", got {devices}")
    return make_mesh(n) if n > 1 else None


def initialize_from_args(args, error=ValueError):
    """Call :func:`initialize` when the flags of :func:`add_cli_arguments` ask for it; returns
    ``(process_index, process_count)`` (``(0, 1)`` alone).  Bad flags raise ``error`` naming them."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if not args.distributed and all(v is None for v in given.values()):
        return 0, 1
    if not args.distributed:
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise error(f"fnbp train: --coordinator, --num-processes and --process-id go together; missing "
                        f"{', '.join(missing)} (or use --distributed to detect the cluster)")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise error(f"fnbp train: --coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {args.coordinator!r}")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise error(f"fnbp train: need --num-processes >= 1 and 0 <= --process-id < --num-processes, got "
                        f"--num-processes {args.num_processes} --process-id {args.process_id}")
    timeout = getattr(args, "coordinator_timeout", COORDINATOR_TIMEOUT)
    if not args.distributed and args.process_id == 0:
        print(f"starting the coordinator at {args.coordinator} (process 0 of {args.num_processes}); waiting up "
              f"to {timeout:g} s for the others", file=sys.stderr, flush=True)
    return initialize(args.coordinator, args.num_processes, args.process_id, timeout=timeout)
