"""BackPACK's side of the comparison (not collected by pytest; imports only numpy, torch and backpack).

Run by tests/backpack_oracle.py under the Python named by FNBP_TORCH_PYTHON (a venv with torch and
``backpack-for-pytorch``; fnbp's venv has neither, that one has no jax):

    python backpack_torch.py DIR

DIR/cases.json lists the cases; DIR/<case>.in.npz holds each one's torch-layout weights ``p<i>.weight``,
``p<i>.bias`` (one pair per parametrised module, in order), ``x`` (NCHW for images) and ``d``.  The script builds
the torch.nn.Sequential the case describes with those weights, extends it and the loss with BackPACK, runs one
backward per extension group the case asks for (spec["groups"], keys of GROUPS) and writes DIR/<case>.out.npz
with ``p<i>.<weight|bias>.<quantity>``: diag_ggn_exact, diag_h, kflr0 / kflr1 (the list KFLR returns), batch_l2, variance, sum_grad_squared, and grad.
"""
import json
import pathlib
import sys

import numpy as np

MISSING = 77             # the exit status when torch or backpack does not import: the tests skip

try:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import KFLR, BatchL2Grad, DiagGGNExact, DiagHessian, SumGradSquared, Variance
except ImportError as e:
    print(f"backpack_torch: {e}", file=sys.stderr)
    sys.exit(MISSING)

torch.set_default_dtype(torch.float64)

ACTIVATIONS = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU}
GROUPS = {"diag_ggn_exact": (DiagGGNExact,), "diag_h": (DiagHessian,), "kflr": (KFLR,),
          "first": (BatchL2Grad, Variance, SumGradSquared)}
SAVED = {"diag_ggn_exact": ("diag_ggn_exact",), "diag_h": ("diag_h",), "kflr": ("kflr",),
         "first": ("batch_l2", "variance", "sum_grad_squared")}


def build(spec, arrays):
    """torch.nn.Sequential from spec["layers"]: "linear", "conv" (stride 1, spec["padding"]), "act", "maxpool"
    (2 x 2), "flatten"; parametrised modules take p<i>.weight / p<i>.bias in order."""
    modules, i = [], 0
    for kind in spec["layers"]:
        if kind in ("linear", "conv"):
            W, b = (torch.from_numpy(arrays[f"p{i}.{n}"]) for n in ("weight", "bias"))
            if kind == "linear":
                m = torch.nn.Linear(W.shape[1], W.shape[0])
            else:
                m = torch.nn.Conv2d(W.shape[1], W.shape[0], tuple(W.shape[2:]), padding=spec["padding"])
            with torch.no_grad():
                m.weight.copy_(W)
                m.bias.copy_(b)
            modules.append(m)
            i += 1
        elif kind == "act":
            modules.append(ACTIVATIONS[spec["activation"]]())
        elif kind == "maxpool":
            modules.append(torch.nn.MaxPool2d(2))
        elif kind == "flatten":
            modules.append(torch.nn.Flatten())
        else:
            raise ValueError(f"backpack_torch: unknown layer {kind!r}")
    return extend(torch.nn.Sequential(*modules))


def run_case(spec, arrays):
    model = build(spec, arrays)
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction=spec["reduction"]) if spec["loss"] == "ce"
                     else torch.nn.MSELoss(reduction=spec["reduction"]))
    x = torch.from_numpy(arrays["x"])
    d = torch.from_numpy(arrays["d"])
    params = [m for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    out = {}
    for group in spec["groups"]:
        exts = GROUPS[group]
        model.zero_grad()
        loss = loss_fn(model(x), d)
        with backpack(*(e() for e in exts)):
            loss.backward()
        for i, m in enumerate(params):
            for pname in ("weight", "bias"):
                p = getattr(m, pname)
                out[f"p{i}.{pname}.grad"] = p.grad.numpy().copy()
                for field in SAVED[group]:
                    value = getattr(p, field)
                    if isinstance(value, list):
                        for j, v in enumerate(value):
                            out[f"p{i}.{pname}.{field}{j}"] = v.detach().numpy().copy()
                    else:
                        out[f"p{i}.{pname}.{field}"] = value.detach().numpy().copy()
    return out


def main(folder):
    folder = pathlib.Path(folder)
    for name, spec in json.loads((folder / "cases.json").read_text()).items():
        with np.load(folder / f"{name}.in.npz") as f:
            arrays = dict(f)
        np.savez(folder / f"{name}.out.npz", **run_case(spec, arrays))


if __name__ == "__main__":
    main(sys.argv[1])
