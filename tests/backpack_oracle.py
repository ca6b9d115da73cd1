"""fnbp's side of the comparison with BackPACK (``backpack-for-pytorch``), shared by test_curvature and
test_per_example: the same small models, weights and data in both, BackPACK run in a subprocess.

fnbp's venv has no torch and the torch venv no jax, so ``backpack_results`` writes each case's weights (torch
layout) and data to .npz, runs tests/backpack_torch.py under the Python named by the environment variable
FNBP_TORCH_PYTHON, and reads BackPACK's quantities back, converted to fnbp's layout.  Tests skip where it is
unset, names no file, or names a Python without torch or backpack (CI has neither).

Layouts (torch -> fnbp):
  - Dense W: (out, in) in both.  After Flatten the columns differ: fnbp flattens (H, W, C) in (i, j, c) order,
    torch.nn.Flatten (C, H, W) in (c, i, j): the torch W is fnbp's W[:, perm] (``flatten_perm``).
  - Conv2d W: (C_out, C_in, kh, kw) (OIHW) in both.  Images: fnbp NHWC, torch NCHW.
  - KFLR's input factor A of a conv is over the patch entries: torch's unfold orders them (c, i, j), fnbp's
    im2col (i, j, c) (``flatten_perm(kh, kw, C_in)``); of the Dense after Flatten, as its W's columns.
"""
import functools
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import losses, nn

TORCH_SCRIPT = pathlib.Path(__file__).with_name("backpack_torch.py")
B, C = 5, 3
IMAGE = (6, 6, 2)         # H, W, C_in: two input channels, so the patch order (i, j, c) vs (c, i, j) matters

# name: (kind, activation, loss, reduction); the loss is torch's CrossEntropyLoss or MSELoss with that reduction
CASES = {
    "mlp-tanh-ce-mean": ("mlp", "tanh", "ce", "mean"),
    "mlp-sigmoid-mse-mean": ("mlp", "sigmoid", "mse", "mean"),
    "mlp-relu-ce-sum": ("mlp", "relu", "ce", "sum"),
    "cnn-tanh-ce-mean": ("cnn", "tanh", "ce", "mean"),
    "cnn-sigmoid-mse-sum": ("cnn", "sigmoid", "mse", "sum"),
    "cnn-relu-ce-mean": ("cnn", "relu", "ce", "mean"),
}
_ACT = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.Relu}


def fnbp_loss(loss, reduction):
    """torch's loss as fnbp's: CrossEntropyLoss = softmax_cross_entropy on logits (same reduction);
    MSELoss('mean') = 1/(B C) sum (y - d)^2 = fnbp's mse with reduction='mean' (mean over every element);
    MSELoss('sum') = sum (y - d)^2 = fnbp's sse with reduction='sum'."""
    if loss == "ce":
        return functools.partial(losses.softmax_cross_entropy, reduction=reduction)
    return functools.partial(losses.mse if reduction == "mean" else losses.sse, reduction=reduction)


def flatten_perm(H, W, C_):
    """perm with torch's flat index k (order (c, i, j)) reading fnbp's flat index perm[k] (order (i, j, c))."""
    return np.arange(H * W * C_).reshape(H, W, C_).transpose(2, 0, 1).ravel()


class Case:
    """One model, its fnbp params, x, d, and the torch-layout arrays of the same."""

    def __init__(self, name, seed=0):
        kind, act, loss, reduction = CASES[name]
        self.name, self.kind, self.loss_name, self.reduction = name, kind, loss, reduction
        self.loss = fnbp_loss(loss, reduction)
        A = _ACT[act]
        if kind == "mlp":
            self.model = nn.serial(nn.Dense(5), A(), nn.Dense(4), A(), nn.Dense(C))
            shape, self.layers = (3,), ["linear", "act", "linear", "act", "linear"]
        else:
            self.model = nn.serial(nn.Conv2D(3, 3, padding=1), A(), nn.MaxPool(2), nn.Flatten(), nn.Dense(C))
            shape, self.layers = IMAGE, ["conv", "act", "maxpool", "flatten", "linear"]
        k = jax.random.split(jax.random.key(seed), 4)
        params, _ = self.model.init(k[0], shape, jnp.float64)
        self.params = jax.tree_util.tree_map(      # nonzero biases, weights away from init's symmetries
            lambda p: p + 0.3 * jax.random.normal(k[1], p.shape, p.dtype), params)
        self.x = jax.random.normal(k[2], (B,) + shape, jnp.float64)
        self.d = (jax.random.randint(k[3], (B,), 0, C) if loss == "ce"
                  else jax.random.normal(k[3], (B, C), jnp.float64))
        H, W_, _ = IMAGE
        self.dense_perm = flatten_perm(H // 2, W_ // 2, 3) if kind == "cnn" else None   # the Dense after Flatten
        self.patch_perm = flatten_perm(3, 3, IMAGE[2]) if kind == "cnn" else None       # conv patch entries

    def perm_of(self, i):
        """The column permutation torch applies to parametrised layer i's inputs (None: the same order)."""
        if self.kind != "cnn":
            return None
        return self.patch_perm if i == 0 else self.dense_perm

    def torch_arrays(self):
        out = {"x": np.asarray(self.x if self.kind == "mlp" else jnp.transpose(self.x, (0, 3, 1, 2))),
               "d": np.asarray(self.d)}
        for i, p in enumerate(self.params):
            W = np.asarray(p["W"])
            if self.kind == "cnn" and i == 1:
                W = W[:, self.dense_perm]
            out[f"p{i}.weight"], out[f"p{i}.bias"] = W, np.asarray(p["b"])
        return out

    def spec(self, groups):
        return {"groups": list(groups), "layers": self.layers, "activation": CASES[self.name][1],
                "loss": self.loss_name, "reduction": self.reduction, "padding": 1}

    def to_fnbp_W(self, i, value):
        """A torch-layout quantity of layer i's W (W's shape) in fnbp's layout."""
        value = np.asarray(value)
        if self.kind == "cnn" and i == 1:
            out = np.empty_like(value)
            out[:, self.dense_perm] = value
            return out
        return value

    def to_fnbp_A(self, i, A):
        """KFLR's input factor A of layer i in fnbp's order of the input (or patch) entries."""
        perm = self.perm_of(i)
        if perm is None:
            return np.asarray(A)
        inv = np.argsort(perm)
        return np.asarray(A)[inv][:, inv]


def torch_python():
    path = os.environ.get("FNBP_TORCH_PYTHON", "")
    if not path or not os.path.isfile(path):
        pytest.skip("FNBP_TORCH_PYTHON does not name a Python with torch and backpack-for-pytorch")
    return path


SECOND_ORDER = ("diag_ggn_exact", "diag_h", "kflr")
FIRST_ORDER = ("first",)       # BatchL2Grad, Variance, SumGradSquared in one backward


def backpack_results(folder, names=tuple(CASES), groups=SECOND_ORDER):
    """{case name: (Case, {key: array})}: BackPACK's quantities (torch layout) for each case, one backward per
    extension group (tests/backpack_torch.py's GROUPS); skips without FNBP_TORCH_PYTHON."""
    python = torch_python()
    folder = pathlib.Path(folder)
    cases = {name: Case(name) for name in names}
    (folder / "cases.json").write_text(json.dumps({n: c.spec(groups) for n, c in cases.items()}))
    for n, c in cases.items():
        np.savez(folder / f"{n}.in.npz", **c.torch_arrays())
    proc = subprocess.run([python, str(TORCH_SCRIPT), str(folder)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:                        # backpack_torch.MISSING: that Python lacks torch or backpack
        pytest.skip(f"FNBP_TORCH_PYTHON={python}: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for n, c in cases.items():
        with np.load(folder / f"{n}.out.npz") as f:
            out[n] = (c, dict(f))
    return out


def rel_err(got, ref):
    """max |got - ref| / max |ref| (ref not all zero)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = float(np.max(np.abs(ref)))
    assert scale > 0, "comparing against zeros"
    return float(np.max(np.abs(got - ref))) / scale
