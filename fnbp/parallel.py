"""Data-parallel training over several devices with JAX's own sharding (GSPMD).

Use::

    mesh = fnbp.parallel.make_mesh()          # all visible devices; None when there is only one
    result = fnbp.train.train(params, opt, data, key=key, epochs=10, batch_size=256, mesh=mesh)

What happens (``fnbp.train.train`` calls :func:`place`, then jit-compiles one
epoch as before):

* a one-axis ``jax.sharding.Mesh`` named ``"data"`` over N devices;
* parameters, optimizer state and batch-norm running statistics are
  *replicated*: ``NamedSharding(mesh, P())``, every device holds a full copy;
* the training set is replicated as well (the epoch's permutation gathers each
  mini-batch from it inside the compiled epoch; fine for data that fits in
  every device's memory);
* inside the jitted ``lax.scan`` epoch each gathered mini-batch is constrained
  with ``jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))``:
  its B examples are split along the batch axis, B / N per device.

Why jit + sharding constraints and no hand-written collectives: the step is
the single-device step, unchanged.  XLA's SPMD partitioner (GSPMD) sees that
the batch axis is split and inserts the communication itself: the weight
gradient ``grad_W E = sum_n delta_n h_n^T`` (delta^T H, a contraction over the
batch axis) becomes a per-device partial sum followed by an **all-reduce**, as
do the loss and the bias gradients; the optimizer update then runs, replicated,
on identical gradients, so the replicas never drift apart.  Batch norm's means
over axis 0 (``fnbp.norm``: the batch mean and biased variance, and the means
in its backward rule) are reductions over the sharded axis too, so they also
become cross-device all-reduces: in training mode the batch statistics -- and
hence the running statistics -- are those of the *global* batch, exactly as on
one device (``tests/test_parallel.py`` checks this against a one-device run).
The same code runs on 1 or N devices, and N devices reproduce the one-device
run up to floating-point summation order.  Dropout masks are the same too
(``jax_threefry_partitionable``, JAX's default, makes random bits independent
of the sharding).

The alternative -- ``jax.shard_map`` over the per-device shard with an explicit
``jax.lax.psum(grads, "data")`` (and ``psum``/``pmean`` inside batch norm for
global statistics) -- is not needed here: it would duplicate the step, and
forgetting one ``psum`` (e.g. in batch norm) silently gives per-device
statistics.

Batch size.  ``batch_size`` is the *global* batch B: every optimizer step uses
B examples in total, B / N per device, and must be divisible by N (checked by
:func:`place` before anything compiles).  With ``accumulate = m`` the step
splits B into m micro-batches; keep B / m divisible by N as well, or XLA has to
reshuffle micro-batches between devices (still correct, slower).

Multi-host (several machines, each with its own devices) -- UNTESTED here
----------------------------------------------------------------------------
Run the same program, with the same arguments and the same ``key``, on every
host, and call ``jax.distributed.initialize`` on every host before anything
else touches JAX::

    import jax
    jax.distributed.initialize(coordinator_address="10.0.0.1:1234",   # host 0's address, a free port
                               num_processes=4,                       # number of hosts (processes)
                               process_id=i)                          # 0 .. num_processes-1, one per host
    mesh = fnbp.parallel.make_mesh()     # now spans jax.devices(): every device of every host

(On Cloud TPU, SLURM or Open MPI, ``jax.distributed.initialize()`` with no
arguments detects all three; elsewhere the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
supply them.)  The mesh then covers all D = sum over hosts of the local device
counts; the global batch B is split over all D devices, so each host's devices
take B / D examples each (B * local_devices / D per host) per step, and B must
be divisible by D.  Every host loads the full dataset (:func:`place` builds the
replicated arrays from each process's own copy, which must be identical);
because the key is the same on every host, the epoch's permutation and hence
each step's global batch are identical everywhere, and each device reads its
own slice.  Gradients are all-reduced over all devices of all hosts by the same
compiled program.  See ``docs/multihost.md``.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "make_mesh", "place", "check_batch_size", "replicate", "batch_sharding", "batch_axis",
           "shard_batch", "initialize", "is_main_process"]

AXIS = "data"
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


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Join a multi-process run (``jax.distributed.initialize``) before anything else uses JAX.

    With no arguments JAX detects the cluster (Cloud TPU, SLURM, Open MPI, or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
    environment variables).  On CPU the cross-process collectives use gloo
    (``jax_cpu_collectives_implementation``; GPUs use NCCL, TPUs their own
    interconnect, whatever this says).  Returns ``(process_index, process_count)``.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                ("process_id", process_id)) if v is not None}
    jax.distributed.initialize(**kwargs)
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
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run detected from the cluster (Cloud TPU, SLURM, Open MPI, or "
                        "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)")


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
    return initialize(args.coordinator, args.num_processes, args.process_id)
