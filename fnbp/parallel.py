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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "make_mesh", "place", "check_batch_size", "replicate", "batch_sharding"]

AXIS = "data"


def make_mesh(n_devices=None):
    """A one-axis ``Mesh`` named ``"data"`` over the first ``n_devices`` devices, or None for one device.

    ``n_devices=None``: all visible devices (``jax.devices()``; with
    ``jax.distributed.initialize``, those of every host) when there are more
    than one, else None.  ``n_devices=1`` returns None (``train(..., mesh=None)``
    is the single-device loop).  More devices than visible raises ValueError
    naming both numbers.
    """
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
    return Mesh(np.array(devices[:n]), (AXIS,))


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
    """``NamedSharding(mesh, P("data"))``: the leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, P(AXIS))


def replicate(mesh, tree):
    """Every array leaf of ``tree`` as a global array replicated on every device of ``mesh``.

    One process: ``jax.device_put``.  Several processes (multi-host): built from
    each process's own host copy, which must be identical on every process.
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

    Checks that the global ``batch_size`` is divisible by the number of devices
    (ValueError with the nearest valid sizes, before anything is compiled),
    replicates the parameters, optimizer state, batch-norm statistics and the
    training data on every device, and returns ``NamedSharding(mesh, P("data"))``
    for the mini-batches (``fnbp.train.make_epoch(..., batch_sharding=...)``).
    """
    if tuple(mesh.axis_names) != (AXIS,):
        raise ValueError(f"fnbp.parallel.place: the mesh must have the single axis {AXIS!r} "
                         f"(fnbp.parallel.make_mesh), got axes {tuple(mesh.axis_names)}")
    check_batch_size(batch_size, mesh.size, n_examples=x_train.shape[0])
    params, opt_state, state, x_train, y_train = replicate(mesh, (params, opt_state, state, x_train, y_train))
    return params, opt_state, state, x_train, y_train, batch_sharding(mesh)
