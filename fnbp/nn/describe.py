"""Models as JSON and back: ``describe`` (each layer's type and fields) and ``from_description``.

Checkpoints record a model's description (``fnbp.checkpoint.load_model`` rebuilds it).  Functions (an
activation's rule) are recorded by ``module:name`` and must be importable to be rebuilt.
"""
import functools
import importlib
from typing import Any

from . import layers as builtin
from .model import Model

__all__ = ["from_description", "layer_from_description"]


def from_description(desc):
    """The model ``Model.describe`` wrote."""
    if not isinstance(desc, dict) or not isinstance(desc.get("serial"), list):
        raise ValueError(f"fnbp.nn.from_description: expected {{'serial': [layer, ...]}}, got {desc!r:.120}")
    return Model(tuple(layer_from_description(d) for d in desc["serial"]))


def layer_from_description(desc):
    """The layer ``describe_layer`` wrote (raises ValueError for a function that cannot be imported)."""
    kind = desc["type"]
    if ":" in kind:
        module, name = kind.split(":", 1)
        cls = getattr(importlib.import_module(module), name)
    else:
        cls = getattr(builtin, kind, None)
        if cls is None:
            raise ValueError(f"fnbp.nn: unknown layer type {kind!r} in a model description")
    if cls is builtin.Residual:
        return builtin.Residual(*(layer_from_description(d) for d in desc["layers"]))
    fields = {}
    for k, v in desc.items():
        if k == "type":
            continue
        if isinstance(v, dict) and "type" in v:
            v = layer_from_description(v)
        elif isinstance(v, list) and v and all(isinstance(u, dict) and "type" in u for u in v):
            v = tuple(layer_from_description(u) for u in v)
        elif isinstance(v, dict) and "function" in v:
            if v["function"] is None:
                raise ValueError(f"fnbp.nn: the model's {kind}.{k} is a function that cannot be imported by name "
                                 f"(a lambda or a local function); rebuild the model in code")
            module, name = v["function"].split(":", 1)
            fn: Any = importlib.import_module(module)
            for part in name.split("."):
                fn = getattr(fn, part)
            v = functools.partial(fn, **v["options"]) if v["options"] else fn
        elif isinstance(v, list):
            v = tuple(v)
        fields[k] = v
    return cls(**fields)
