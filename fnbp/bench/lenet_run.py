"""Bench case ``lenet_run``: whole-run throughput of ``fnbp train --data mnist --model lenet`` against a plain
PyTorch training loop on the same tensors and the same recipe (issue #27).

fnbp: ``fnbp.train.train`` with the CLI's LeNet recipe (``fnbp.nn.lenet`` with dropout 0.25, Adam 1e-3,
mini-batches of 64, random shifts of +-2 pixels, the test loss/accuracy and the training accuracy after every
epoch).  PyTorch: ``fnbp/bench/_torch_lenet_run.py``, run by a Python that has torch (``FNBP_TORCH_PYTHON``, else
this Python when it can import torch; skipped otherwise), from the same initial weights and images.

The two alternate epoch by epoch (fnbp's epoch e, then PyTorch's epoch e, ...), so that a shared machine's drift
hits both alike.  An epoch's time is everything the run does for it: gathering the shuffled batches, the
augmentation, the steps and the evaluation; fnbp's first epoch also compiles the evaluation, PyTorch's warms up,
so the medians and the paired ratio are over epochs 2.. (all epochs are recorded).  Images/s = training
images / epoch seconds.  Memory: as in ``text_run``, this process keeps freed memory (``fnbp._malloc``, as
``fnbp train`` does) and the PyTorch child has glibc's defaults unless ``--torch-malloc same``.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import _malloc
from .registry import register

CHILD = Path(__file__).with_name("_torch_lenet_run.py")
RECIPE = {"batch_size": 64, "lr": 1e-3, "dropout": 0.25, "augment": 2}
"""``fnbp train --data mnist --model lenet``'s defaults (``fnbp._cli_model.MODEL_DEFAULTS['lenet']``)."""


def torch_python(no_torch=False):
    """(path of a Python that has torch, None) or (None, why not): ``FNBP_TORCH_PYTHON`` if set, else this
    Python when it can import torch."""
    if no_torch:
        return None, "--no-torch"
    env = os.environ.get("FNBP_TORCH_PYTHON")
    if env:
        return (env, None) if Path(env).exists() else (None, f"FNBP_TORCH_PYTHON={env} does not exist")
    import importlib.util
    if importlib.util.find_spec("torch") is not None:
        return sys.executable, None
    return None, "torch not installed (set FNBP_TORCH_PYTHON to a Python that has it)"


def synthetic_images(n_train, n_test, seed=0, side=28):
    """A small stand-in for MNIST (``--quick``): random images in [0, 1) and labels 0..9."""
    from .. import data
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n_train + n_test, side, side, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=n_train + n_test).astype(np.int32)
    return data.Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10, "synthetic")


def mnist_images():
    """``fnbp train --data mnist``'s images (N, 28, 28, 1), as the CLI loads them."""
    from .. import data
    ds = data.load("mnist")
    side = int(round(ds.x_train.shape[1] ** 0.5))
    return ds._replace(x_train=ds.x_train.reshape(-1, side, side, 1), x_test=ds.x_test.reshape(-1, side, side, 1))


class TorchChild:
    """A PyTorch loop as a child process (``child``, run by ``python``), one JSON line per command on its stdin:
    ``epoch`` (one epoch), ``eval`` (the current weights, no training), ``quit``.  ``arrays`` (the data, the
    initial weights, the recipe) reach it as one .npz file in a temporary directory; ``name`` is the bench case
    the errors name.  ``malloc="same"``: the child's glibc malloc keeps freed memory as this process's does
    (``fnbp._malloc.child_env``); "default": the environment as it is."""

    def __init__(self, name, python, child, arrays, threads=None, malloc="default"):
        self.name = name
        self.dir = tempfile.TemporaryDirectory(prefix=f"fnbp-{name.replace('_', '-')}-")
        path = Path(self.dir.name) / "data.npz"
        np.savez(path, **arrays)
        cmd = [python, str(child), str(path)] + (["--threads", str(threads)] if threads else [])
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        if malloc == "same":                             # else the environment's (glibc's defaults)
            env.update(_malloc.child_env())
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"fnbp.bench.{name}: the PyTorch loop ({' '.join(cmd)}) did not start "
                               f"(said {line!r}, exit code {self.proc.poll()})")

    def _ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fnbp.bench.{self.name}: the PyTorch loop ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def epoch(self):
        """One epoch of training and its evaluation: the child's JSON record."""
        return self._ask("epoch")

    def evaluate(self):
        """The evaluation of the current weights, no training (the model check of the tests)."""
        return self._ask("eval")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait(timeout=60)
        self.dir.cleanup()


class TorchRun(TorchChild):
    """The LeNet's PyTorch loop (``_torch_lenet_run.py``).  ``epoch()``: {"seconds", "train_seconds", "loss",
    "test_loss", "test_accuracy", "train_accuracy"}; ``evaluate()``: {"test_loss", "test_accuracy"}."""

    def __init__(self, python, ds, params, seed, threads, malloc="default"):
        weights = {f"{k}{i}": np.asarray(layer[k]) for i, layer in enumerate(params) for k in ("W", "b")}
        super().__init__("lenet_run", python, CHILD, dict(
            x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test, seed=seed,
            **{k: np.asarray(v) for k, v in RECIPE.items()}, **weights), threads, malloc)


def bench_lenet_run(ds, epochs, *, seed=0, python=None, threads=None, skip_reason=None, torch_malloc="default",
                    log=lambda msg: None):
    """Train fnbp's LeNet for ``epochs`` epochs on ``ds`` (images (N, H, W, 1)) as ``fnbp train`` does, each
    epoch followed by one of the PyTorch loop (``python``: a Python with torch; None: fnbp alone); returns
    the report section."""
    import jax
    from .. import nn, optim, train
    from .harness import paired_ratio, summarize
    if epochs < 2:
        raise ValueError(f"fnbp.bench.lenet_run: epochs must be >= 2 (the first is a warm-up), got {epochs}")
    shape = tuple(ds.x_train.shape[1:])
    model = nn.lenet(shape, ds.n_classes, dropout=RECIPE["dropout"])
    key = jax.random.key(seed)
    params, _ = model.init(jax.random.fold_in(key, 0), shape)
    cfg = train.Config(augment=RECIPE["augment"])
    B, n = RECIPE["batch_size"], ds.x_train.shape[0]
    images = (n // B) * B                                        # the remainder is dropped by both
    peer = TorchRun(python, ds, params, seed, threads, torch_malloc) if python else None
    fnbp_epochs, torch_epochs, mark = [], [], {}
    try:
        def on_epoch(result):
            now = time.perf_counter()
            fnbp_epochs.append(dict(result.history[-1], wall_s=now - mark["t"]))
            log(f"  fnbp epoch {len(fnbp_epochs)}: {now - mark['t']:.2f} s")
            if peer is not None:
                torch_epochs.append(peer.epoch())
                log(f"  torch epoch {len(torch_epochs)}: {torch_epochs[-1]['seconds']:.2f} s")
            mark["t"] = time.perf_counter()

        mark["t"] = time.perf_counter()
        res = train.train(params, optim.adam(RECIPE["lr"]), ds, key=jax.random.fold_in(key, 1), epochs=epochs,
                          batch_size=B, cfg=cfg, model=model, progress=False, on_epoch=on_epoch)
    finally:
        if peer is not None:
            peer.close()
    fnbp_epochs[0]["wall_s"] -= res.compile_seconds            # the epoch program's compile, before epoch 1
    warm = slice(1, None)

    def rows(walls, train_walls, accs):
        st = summarize({"wall": walls[warm]})
        return {"epoch_s": walls, "train_s": train_walls, "test_accuracy": accs,
                "epoch_s_median": st["ms_median"] / 1e3,
                "images_per_s": images / (st["ms_median"] / 1e3),
                "train_images_per_s": images / float(np.median(train_walls[warm]))}

    sec = {"recipe": dict(RECIPE), "data": ds.name, "n_train": int(n), "n_test": int(ds.x_test.shape[0]),
           "images_per_epoch": images, "epochs": epochs, "compile_s": res.compile_seconds,
           "fnbp": rows([e["wall_s"] for e in fnbp_epochs], [e["seconds"] for e in fnbp_epochs],
                        [e["test_accuracy"] for e in fnbp_epochs])}
    if peer is None:
        sec["torch"] = {"skipped": skip_reason or "no torch python"}
        return sec
    sec["torch"] = rows([e["seconds"] for e in torch_epochs], [e["train_seconds"] for e in torch_epochs],
                        [e["test_accuracy"] for e in torch_epochs])
    sec["torch_malloc"] = torch_malloc
    f = {"wall": sec["fnbp"]["epoch_s"][warm], "round": list(range(epochs - 1))}
    t = {"wall": sec["torch"]["epoch_s"][warm], "round": list(range(epochs - 1))}
    r = paired_ratio(t, f)                                       # torch time / fnbp time = fnbp images/s / torch's
    sec["speed_ratio_paired"] = r
    return sec


def malloc_line(sec, result):
    """The sentence on each side's glibc malloc (``fnbp._malloc``), or None for a record without it."""
    if "torch_malloc" not in sec:
        return None
    kept = bool((result or {}).get("malloc"))
    return ("Memory: fnbp's process " + ("keeps freed memory for reuse (glibc mallopt, as `fnbp train` does)"
                                         if kept else "uses glibc's default malloc")
            + "; the PyTorch loop's process " + ("uses the same settings (`--torch-malloc same`)"
                                                 if sec["torch_malloc"] == "same" else
                                                 "uses glibc's defaults, as a plain PyTorch loop does "
                                                 "(`--torch-malloc same` gives it fnbp's)") + ".")


def render(sec, result=None):
    """Markdown lines of the section."""
    rc = sec["recipe"]
    L = ["## Whole run: `fnbp train --data mnist --model lenet` vs a PyTorch loop (issue #27)", "",
         f"{sec['data']}: {sec['n_train']} training / {sec['n_test']} test images, {sec['epochs']} epochs, batch "
         f"{rc['batch_size']}, Adam {rc['lr']:g}, dropout {rc['dropout']:g}, shifts ±{rc['augment']} px; every epoch "
         "followed by its test loss/accuracy and training accuracy. Epochs alternate fnbp, PyTorch; medians over "
         "epochs 2.. (the first warms up). Images/s = training images / epoch wall time (gather, augmentation, "
         "steps, evaluation); \"steps only\" leaves the evaluation out.", "",
         "| run | epoch s (median) | images/s | steps only, images/s | final test accuracy |", "|---|---|---|---|---|"]
    for name, label in (("fnbp", "fnbp.train.train (the CLI's recipe)"), ("torch", "PyTorch loop (eager)")):
        row = sec[name]
        if "skipped" in row:
            L.append(f"| {label} | skipped: {row['skipped']} | | | |")
            continue
        L.append(f"| {label} | {row['epoch_s_median']:.3g} | {row['images_per_s']:,.0f} | "
                 f"{row['train_images_per_s']:,.0f} | {row['test_accuracy'][-1]:.4f} |")
    if "speed_ratio_paired" in sec:
        r = sec["speed_ratio_paired"]
        L += ["", f"fnbp images/s / PyTorch images/s, paired by epoch: {r['median']:.3g} "
                  f"[{r['q1']:.3g}–{r['q3']:.3g}] over {r['rounds']} epochs (target ≥ 1.0)."]
    if malloc_line(sec, result):
        L += ["", malloc_line(sec, result)]
    return L + [""]


def summary(sec):
    out = [f"lenet_run: fnbp {sec['fnbp']['images_per_s']:,.0f} images/s"]
    if "speed_ratio_paired" in sec:
        out[0] += (f", PyTorch {sec['torch']['images_per_s']:,.0f} images/s, fnbp / PyTorch "
                   f"{sec['speed_ratio_paired']['median']:.3g}")
    return out


def _run(ctx):
    python, why = torch_python(ctx.no_torch)
    if ctx.quick:
        ds, epochs = synthetic_images(256, 64, ctx.seed), 2
    else:
        ds, epochs = mnist_images(), ctx.run_epochs
    ctx.log(f"whole-run LeNet throughput: {epochs} epochs, fnbp then {'PyTorch' if python else 'no PyTorch'} ...")
    return bench_lenet_run(ds, epochs, seed=ctx.seed, python=python, threads=ctx.cores, skip_reason=why,
                           torch_malloc=ctx.torch_malloc, log=ctx.log)


register("lenet_run", run=_run, render=render, summary=summary,
         help="whole-run images/s of fnbp train --model lenet vs a PyTorch loop (same tensors and recipe)")
