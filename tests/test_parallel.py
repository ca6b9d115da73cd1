"""Tests of fnbp.parallel: data-parallel training on 8 simulated CPU devices vs one device.

The device count of the CPU backend is fixed when JAX starts, so the 8-device
runs happen in fresh subprocesses (``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before JAX is imported), one per dtype, started together and reporting JSON
on stdout.  Each subprocess, on scikit-learn digits (1280 training examples,
global batch 64, so one epoch = 20 steps), a 64-32-10 network:

* plain network, fnbp.optim.adam: one ``make_epoch`` compiled for 1 device and for
  the 8-device mesh (``fnbp.parallel.place``), both run from the same parameters
  and key; reports the parameters' relative difference and the compiled HLO's
  all-reduce count (the proof the 8-device executable is partitioned);
* batch norm, fnbp.optim.sgd, through ``fnbp.train.train(..., mesh=...)``: the
  parameters and running statistics after 20 steps.  (SGD, not Adam: with batch
  norm right after it, a hidden layer's bias b has a zero gradient -- the batch
  mean cancels it -- so its computed gradient is rounding noise, which Adam's
  g / sqrt(r) rescales to full-size steps of random sign: a genuine but
  meaningless difference between any two summation orders.)

Relative difference of two parameter pytrees: max |a - b| / max |b|, the maxima
over all entries of all leaves (infinity norm of the whole parameter vector).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from fnbp import parallel

ROOT = Path(__file__).resolve().parents[1]
N_DEVICES = 8
TOL = {"float32": 1e-5, "float64": 1e-12}

_SCRIPT = r"""
import json, sys, traceback
dtype = sys.argv[1]
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", dtype == "float64")
from fnbp import data as fdata, mlp, optim, parallel
from fnbp.train import Config, make_epoch, train

N, B = 1280, 64                                       # 20 steps of a global batch of 64
dt = jnp.dtype(dtype)
ds = fdata.load_digits(seed=0, dtype=np.dtype(dtype))
x, y = ds.x_train[:N], ds.y_train[:N]
ds = ds._replace(x_train=x, y_train=y, x_test=x, y_test=y)   # same shapes: evaluation compiles once
mesh = parallel.make_mesh(8)
out = {"devices": len(jax.devices()), "platform": jax.devices()[0].platform, "mesh_size": mesh.size,
       "mesh_axes": list(mesh.axis_names)}

def leaves(t):
    return [np.asarray(v, dtype=np.float64) for v in jax.tree_util.tree_leaves(t)]

def rel(a, b):                                        # whole-vector infinity-norm relative difference
    la, lb = leaves(a), leaves(b)
    return max(float(np.max(np.abs(u - v))) for u, v in zip(la, lb)) / max(float(np.max(np.abs(v))) for v in lb)

def rel_per_leaf(a, b):                               # for the report only
    return [float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-300)) for u, v in zip(leaves(a), leaves(b))]

def dtypes(t):
    return sorted({str(v.dtype) for v in jax.tree_util.tree_leaves(t) if jnp.issubdtype(v.dtype, jnp.floating)})

# --- plain network, adam, make_epoch compiled for one device and for the mesh
opt = optim.adam(1e-2)
key = jax.random.PRNGKey(0)
res = {}
for name, m in (("one", None), ("mesh", mesh)):
    p = mlp.init(jax.random.PRNGKey(1), (64, 32, 10), dtype=dt)
    args = (p, opt.init(p), mlp.init_state(p), jnp.asarray(x), jnp.asarray(y))
    bs = None
    if m is not None:
        *args, bs = parallel.place(m, B, *args)
        out["batch_spec"] = str(bs.spec)
        out["placed_replicated"] = all(len(v.sharding.device_set) == 8 and v.sharding.is_fully_replicated
                                       for v in jax.tree_util.tree_leaves(args))
    fn = make_epoch(Config(), opt, batch_size=B, n_examples=N, batch_sharding=bs)
    compiled = jax.jit(fn).lower(*args, key).compile()
    out[f"all_reduce_{name}"] = compiled.as_text().count("all-reduce")
    res[name] = compiled(*args, key)
(p8, _, _, l8), (p1, _, _, l1) = res["mesh"], res["one"]
out["plain"] = {"steps": int(l1.shape[0]), "rel": rel(p8, p1), "rel_per_leaf": rel_per_leaf(p8, p1),
                "loss_rel": rel(l8, l1), "dtypes": dtypes(p8),
                "devices": sorted({len(v.sharding.device_set) for v in jax.tree_util.tree_leaves(p8)}),
                "replicated": all(v.sharding.is_fully_replicated for v in jax.tree_util.tree_leaves(p8))}

# --- batch norm, sgd, through train(..., mesh=...)
opt = optim.sgd(0.1)
runs = {}
for name, m in (("one", None), ("mesh", mesh)):
    p = mlp.init(jax.random.PRNGKey(1), (64, 32, 10), dtype=dt, batch_norm=True)
    runs[name] = train(p, opt, ds, key=key, epochs=1, batch_size=B, progress=False, mesh=m)
r8, r1 = runs["mesh"], runs["one"]
out["bn"] = {"steps": r8.step, "rel": rel(r8.params, r1.params), "rel_per_leaf": rel_per_leaf(r8.params, r1.params),
             "state_rel": rel(r8.state, r1.state), "state_rel_per_leaf": rel_per_leaf(r8.state, r1.state),
             "state_moved": rel(r8.state, mlp.init_state(r8.params)), "dtypes": dtypes((r8.params, r8.state)),
             "devices": sorted({len(v.sharding.device_set) for v in jax.tree_util.tree_leaves((r8.params, r8.state))}),
             "loss": [r8.history[0]["loss"], r1.history[0]["loss"]]}

# --- errors, before anything is compiled
if dtype == "float32":
    called = []
    try:
        train(mlp.init(jax.random.PRNGKey(1), (64, 32, 10)), opt, ds, key=key, epochs=1, batch_size=100,
              progress=False, mesh=mesh, on_epoch=called.append)
        out["batch_error"] = None
    except ValueError as e:
        out["batch_error"] = str(e)
        out["batch_error_in_place"] = any(f.name == "place" for f in traceback.extract_tb(e.__traceback__))
    out["on_epoch_called"] = bool(called)
    try:
        parallel.make_mesh(9)
        out["mesh_error"] = None
    except ValueError as e:
        out["mesh_error"] = str(e)
    out["make_mesh_1"] = parallel.make_mesh(1) is None
print("RESULT " + json.dumps(out))
"""


def _start(dtype):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, dtype], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs():
    """{dtype: the subprocess's JSON report}; both subprocesses run at once."""
    procs = {dtype: _start(dtype) for dtype in TOL}
    out = {}
    for dtype, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{dtype} subprocess failed (rc {proc.returncode}):\n{stderr[-4000:]}"
        out[dtype] = json.loads(lines[-1][len("RESULT "):])
    return out


@pytest.mark.slow          # 8-device subprocesses (float64 LeNets)
@pytest.mark.parametrize("dtype", list(TOL))
def test_eight_devices_match_one_device(runs, dtype):
    """Adam, 20 steps: the 8-device parameters equal the 1-device ones (float32 1e-5, float64 1e-12
    relative), and the 8-device executable really is partitioned: every leaf lives on 8 devices and
    the compiled HLO all-reduces (the 1-device one has no all-reduce)."""
    r = runs[dtype]
    assert (r["platform"], r["devices"], r["mesh_size"], r["mesh_axes"]) == ("cpu", 8, 8, ["data"])
    assert r["batch_spec"] == str(jax.sharding.PartitionSpec("data")) and r["placed_replicated"]
    plain = r["plain"]
    assert plain["steps"] == 20 and plain["dtypes"] == [dtype]
    assert plain["devices"] == [8] and plain["replicated"]
    assert r["all_reduce_mesh"] > 0 and r["all_reduce_one"] == 0
    assert plain["rel"] <= TOL[dtype], plain
    assert plain["loss_rel"] <= TOL[dtype], plain


@pytest.mark.slow          # 8-device subprocesses (float64 LeNets)
@pytest.mark.parametrize("dtype", list(TOL))
def test_batch_norm_statistics_are_global(runs, dtype):
    """With batch norm, train(..., mesh=8 devices) gives the 1-device running statistics and
    parameters: the batch means are reduced across devices, not taken per device."""
    bn = runs[dtype]["bn"]
    assert bn["steps"] == 20 and bn["dtypes"] == [dtype] and bn["devices"] == [8]
    assert bn["state_moved"] > 1e-2                       # the running statistics did change
    assert bn["state_rel"] <= TOL[dtype], bn
    assert bn["rel"] <= TOL[dtype], bn


@pytest.mark.slow          # 8-device subprocesses (float64 LeNets)
def test_indivisible_batch_fails_before_training(runs):
    """Global batch 100 on 8 devices: ValueError from place(), before any epoch, naming both numbers
    and the nearest valid batch sizes; more devices than exist is a ValueError too."""
    r = runs["float32"]
    msg = r["batch_error"]
    assert msg is not None and "global batch 100" in msg and "8 devices" in msg and "96 or 104" in msg, msg
    assert r["batch_error_in_place"] and not r["on_epoch_called"]
    assert "9 devices requested" in r["mesh_error"] and "only 8" in r["mesh_error"], r["mesh_error"]
    assert r["make_mesh_1"]


# ---------------------------------------------------------------- every rule on a user's mesh (4 devices)
RULES_MODES = ("explicit", "auto", "tensor", "shard_map")


@pytest.fixture(scope="module")
def rules_on_meshes():
    """tests/parallel_rules_check.py's report: {dtype: {mode: {model: relative difference}}}."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_rules_check.py"), *TOL], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


EXPECTED_MODELS = {f"dense+{a}" for a in ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step",
                                          "sign", "softmax")} | {
    f"loss:{l}" for l in ("half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy")} | {
    "l2_penalty", "batch_norm"}
CONV_MODELS = {"lenet+batch_norm", "conv_stride2+avg_pool"}      # float64 only (the costly compiles)


@pytest.mark.slow          # 8-device subprocesses (float64 LeNets)
@pytest.mark.parametrize("mode", RULES_MODES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_every_rule_on_user_meshes(rules_on_meshes, dtype, mode):
    """jax.grad through dense + every activation, every loss, the L2 penalty, batch norm, a small
    LeNet (conv2d, per-channel batch norm, max-pool, flatten) and a strided
    conv2d + avg_pool + global_avg_pool, on an Explicit data-parallel mesh, an Auto one, a
    data x model mesh with W (and the first conv's W) sharded along n_out / C_out, and inside
    shard_map(check_vma=True) (the conv models in float64 only): equal to one device (float32 1e-5,
    float64 1e-12), each gradient of its parameter's dtype and sharding."""
    assert rules_on_meshes["devices"] == 4
    r = rules_on_meshes[dtype][mode]
    assert "error" not in r, r.get("error")
    expected = EXPECTED_MODELS | (CONV_MODELS if dtype == "float64" else set())
    assert set(k for k in r if not k.startswith("_")) == expected
    assert r["_dtypes_ok"] and r["_sharding_ok"], r
    worst = max((v, k) for k, v in r.items() if not k.startswith("_"))
    assert worst[0] <= TOL[dtype], (worst, r)


# ---------------------------------------------------------------- in-process (whatever devices this process has)
@pytest.mark.parametrize("batch, n, n_examples, nearest", [
    (100, 8, None, "nearest valid batch sizes: 96 or 104 "), (5, 8, None, "nearest valid batch sizes: 8 "),
    (65, 2, 1000, "nearest valid batch sizes: 64 or 66 "),
    (1438, 8, 1438, "nearest valid batch sizes: 1432 "),        # full batch of digits: 1440 > 1438 examples
    (5, 8, 5, "no valid batch size: fewer training examples (5) than devices")])
def test_check_batch_size_message(batch, n, n_examples, nearest):
    with pytest.raises(ValueError, match=f"global batch {batch} is not divisible by {n} devices") as e:
        parallel.check_batch_size(batch, n, n_examples)
    assert nearest in str(e.value)
    parallel.check_batch_size(64, 8)
    parallel.check_batch_size(3, 1)


def test_make_mesh_validation():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"{n + 1} devices requested but only {n} "):
        parallel.make_mesh(n + 1)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.make_mesh(0)
    with pytest.raises(TypeError):
        parallel.make_mesh(2.0)
    assert parallel.make_mesh(1) is None
    mesh = parallel.make_mesh()
    assert (mesh is None) == (n == 1)


def test_make_mesh_axis_types_and_batch_axis():
    from jax.sharding import AxisType, Mesh
    import numpy as np
    with pytest.raises(ValueError, match="axis_type must be 'explicit' or 'auto', got 'manual'"):
        parallel.make_mesh(axis_type="manual")
    d = np.array(jax.devices()[:1])
    assert parallel.batch_axis(Mesh(d, ("data",))) == "data"
    assert parallel.batch_axis(Mesh(d, ("batch",))) == "batch"                 # a one-axis mesh of any name
    assert parallel.batch_axis(Mesh(d.reshape(1, 1), ("model", "data"))) == "data"
    with pytest.raises(ValueError, match=r"needs one named 'data'.*\('x', 'y'\)"):
        parallel.batch_axis(Mesh(d.reshape(1, 1), ("x", "y")))
    with pytest.raises(TypeError, match="place: mesh must be a jax.sharding.Mesh"):
        parallel.place("mesh", 8, {}, {}, {}, np.zeros((8, 2)), np.zeros(8))
    assert parallel.make_mesh(1, axis_type="auto") is None
    sharding = parallel.batch_sharding(Mesh(d, ("data",), axis_types=(AxisType.Explicit,)))
    assert sharding.spec == jax.sharding.PartitionSpec("data")


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "missing --num-processes, --process-id"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "0 <= --process-id < --num-processes"),
    (["--num-processes", "0", "--process-id", "0", "--coordinator", "h:1"], "--num-processes >= 1")])
def test_multi_process_flags_are_checked_before_joining(flags, message):
    import argparse
    parser = argparse.ArgumentParser()
    parallel.add_cli_arguments(parser)
    with pytest.raises(ValueError, match=message):
        parallel.initialize_from_args(parser.parse_args(flags))
    assert parallel.initialize_from_args(parser.parse_args([])) == (0, 1)          # alone: nothing to join


def test_cli_reports_bad_multi_process_flags_without_traceback(capsys):
    from fnbp import cli
    assert cli.main(["train", "--coordinator", "127.0.0.1:1234", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fnbp train: --coordinator, --num-processes and --process-id go together")
    assert "Traceback" not in err


def test_coordinator_probes_name_the_address_and_respect_the_timeout():
    """What fnbp train runs before jax.distributed.initialize (which aborts the process instead of raising)."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                       # closed once the block ends: nobody listens there
    t0 = time.monotonic()
    with pytest.raises(parallel.CoordinatorError, match=rf"no coordinator at 127.0.0.1:{port} after 0.5 s \(process 1 "
                                                        rf"of 2\).*--coordinator-timeout"):
        parallel.wait_for_coordinator(f"127.0.0.1:{port}", 0.5, 1, 2, poll=0.1)
    assert time.monotonic() - t0 < 5
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert parallel.wait_for_coordinator(address, 5) < 5                     # reachable: returns at once
        with pytest.raises(parallel.CoordinatorError, match=rf"process 0 cannot start the coordinator at {address}: "
                                                            rf"port \d+ cannot be opened \(it is already in use\)"):
            parallel.check_coordinator_port(address)
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError, match="fnbp.parallel.initialize: timeout must be a number of seconds > 0"):
            parallel.initialize("127.0.0.1:1", 2, 1, timeout=bad)


@pytest.mark.parametrize("text", ["0", "-3", "inf", "ten"])
def test_coordinator_timeout_flag_is_checked(capsys, text):
    from fnbp import cli
    with pytest.raises(SystemExit) as ei:
        cli.main(["train", "--coordinator-timeout", text])
    assert ei.value.code == 2 and "argument --coordinator-timeout: --coordinator-timeout must be a number of seconds" \
        in capsys.readouterr().err
