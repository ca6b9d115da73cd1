"""Multi-process data parallelism on jax.distributed, as a user runs it: ``fnbp train`` in 2 processes.

Two processes on 127.0.0.1 (2 simulated CPU devices each, gloo collectives, a free
port), each in its own working directory with the same relative ``--out run`` --
as on two machines without a shared filesystem:

1. both train digits for 2 epochs (``--coordinator --num-processes 2 --process-id I``);
   only process 0 writes: its ``run/`` holds the checkpoint, history and plot,
   process 1's directory has no ``run/`` at all;
2. process 0's ``run/`` is copied to process 1 (what one does without a shared
   filesystem) and both resume to epoch 3; process 1's copy stays untouched.

Meanwhile one process with 4 simulated devices trains 3 epochs uninterrupted.  The
2 x 2 run's parameters equal the 1 x 4 run's (<= 1e-5 relative, whole vector).
Every subprocess runs under a timeout and is killed if the test fails.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow          # multi-process runs (subprocesses)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420
ARGS = ["--epochs", "3", "--batch-size", "64", "--quiet", "--out", "run", "--seed", "0"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cwd, devices, args):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "fnbp", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs):
    """Wait for every process (all within TIMEOUT); kill them all if any fails or times out."""
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outs.append(out)
            assert p.returncode == 0, f"rc {p.returncode}:\n{out[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _two_processes(tmp, extra):
    port = _free_port()
    return [_start(tmp / f"p{i}", 2, ARGS + extra + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                     "--process-id", str(i)]) for i in range(2)]


def _params(path):
    with np.load(path) as z:
        return {k: z[k].astype(np.float64) for k in z.files if k.startswith("params")}


def test_two_processes_match_one_process_and_only_process_0_writes(tmp_path):
    one = _start(tmp_path / "one", 4, ARGS)
    procs = [one]
    try:
        procs += _two_processes(tmp_path, ["--epochs", "2"])
        outs = _wait(procs[1:])
        run0, run1 = tmp_path / "p0" / "run", tmp_path / "p1" / "run"
        assert sorted(f.name for f in run0.iterdir()) == ["checkpoint.npz", "curves.png", "history.json"], outs[0]
        assert not run1.exists(), "process 1 wrote " + str(list(run1.iterdir()))
        assert "process 1 of 2" in outs[1] and "wrote" not in outs[1]

        shutil.copytree(run0, run1)                       # "copy the checkpoint to every host"
        copied = hashlib.sha256((run1 / "checkpoint.npz").read_bytes()).hexdigest()
        procs = [one] + _two_processes(tmp_path, ["--resume"])
        outs = _wait(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert "resuming from run/checkpoint.npz at epoch 2" in outs[1], outs[1]
    assert hashlib.sha256((run1 / "checkpoint.npz").read_bytes()).hexdigest() == copied
    assert [h["epoch"] for h in json.loads((run0 / "history.json").read_text())["history"]] == [1, 2, 3]

    two, single = _params(run0 / "checkpoint.npz"), _params(tmp_path / "one" / "run" / "checkpoint.npz")
    assert sorted(two) == sorted(single) and len(two) == 4           # W, b of 2 layers (64-32-10)
    assert all(two[k].shape == single[k].shape for k in two)
    rel = max(np.max(np.abs(two[k] - single[k])) for k in two) / max(np.max(np.abs(v)) for v in single.values())
    assert rel <= 1e-5, rel
    epoch2 = _params(run1 / "checkpoint.npz")                       # the resumed epoch did train
    assert max(np.max(np.abs(two[k] - epoch2[k])) for k in two) > 1e-3


def _alone(tmp, process_id, port, *extra):
    """One process of a 2-process run whose other process never starts."""
    return _start(tmp / f"alone{process_id}", 1, ["--epochs", "1", "--quiet", "--out", "run", "--coordinator",
                                                  f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                                                  str(process_id), *extra])


def _finish(p, timeout=60):
    """(exit code, output) of process p, killed if still running after ``timeout`` s."""
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, out


def test_no_coordinator_ends_in_a_named_error_within_the_timeout(tmp_path):
    """Process 1 without process 0, --coordinator-timeout 10: exit 3 in <= 30 s naming the coordinator (it used to
    hang 5 minutes, then abort with a C++ fatal error)."""
    port = _free_port()
    t0 = time.monotonic()
    p_returncode, out = _finish(_alone(tmp_path, 1, port, "--coordinator-timeout", "10"))
    seconds = time.monotonic() - t0
    assert p_returncode == 3 and seconds <= 30, (p_returncode, seconds, out)
    assert f"waiting for the coordinator at 127.0.0.1:{port} (process 1 of 2; up to 10 s)" in out, out
    assert f"error: fnbp.parallel: no coordinator at 127.0.0.1:{port} after 10 s (process 1 of 2)" in out, out
    assert "Traceback" not in out and "Check failure" not in out


def test_a_coordinator_port_in_use_is_a_named_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        returncode, out = _finish(_alone(tmp_path, 0, port, "--coordinator-timeout", "10"))
    assert returncode == 3, out
    assert (f"process 0 cannot start the coordinator at 127.0.0.1:{port}: port {port} cannot be opened (it is "
            f"already in use)") in out and "Failed to start RPC server" not in out and "Traceback" not in out, out
