"""The checkpoint file's leaf encoding, metadata checks and template-free tree rebuild
(the parts of ``fnbp.checkpoint`` that know the layout; see that module's docstring)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

_KEY = "key"
_TREES = ("params", "opt_state", "batch_stats")
_KINDS = ("array", "python", "key")


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, not an fnbp checkpoint, or does not match the templates."""


def _is_typed_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _encode(name: str, leaf, fn: str) -> tuple[np.ndarray, dict]:
    """Leaf -> (array to store, metadata record)."""
    if _is_typed_key(leaf):
        data = np.asarray(jax.random.key_data(leaf))
        rec = {"kind": "key", "impl": str(jax.random.key_impl(leaf)), "dtype": str(data.dtype),
               "shape": list(leaf.shape)}
        return data, rec
    if isinstance(leaf, (bool, int, float, complex)):
        kind = "python"
    elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        kind = "array"
    else:
        raise TypeError(
            f"{fn}: leaf {name} has unsupported type {type(leaf).__name__}; expected a jax/numpy "
            f"array, a numpy scalar, a Python bool/int/float/complex or a jax PRNG key"
        )
    arr = np.asarray(leaf)
    if arr.dtype.kind in "OUSV" and not _is_user_dtype(arr.dtype):
        raise TypeError(f"{fn}: leaf {name} has unsupported dtype {arr.dtype}")
    rec = {"kind": kind, "dtype": arr.dtype.name, "shape": list(arr.shape)}
    if _is_user_dtype(arr.dtype):  # e.g. ml_dtypes bfloat16: np.save would write it as raw void
        arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    return arr, rec


def _is_user_dtype(dt: np.dtype) -> bool:
    return dt.num >= 256  # NPY_USERDEF: dtypes registered by extensions such as ml_dtypes


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))  # jnp.dtype knows bfloat16, float8_*, int4, ...


def _stored_array(arr: np.ndarray, rec: dict) -> np.ndarray:
    """Undo the unsigned-int view used for extension dtypes."""
    dt = _np_dtype(rec["dtype"])
    if _is_user_dtype(dt):
        arr = arr.view(dt)
    return arr


def _key_entry(k) -> list:
    """A path entry as JSON, for rebuilding the tree without a template."""
    if isinstance(k, jax.tree_util.DictKey):
        return ["dict", k.key if isinstance(k.key, (str, int)) else str(k.key)]
    if isinstance(k, jax.tree_util.SequenceKey):
        return ["seq", k.idx]
    if isinstance(k, jax.tree_util.GetAttrKey):
        return ["attr", k.name]
    return ["seq", getattr(k, "key", 0)]           # FlattenedIndexKey: position among the children


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_record(rec, arrays, where) -> str | None:
    """What is wrong with one leaf record (or the key record) and its stored array, or None."""
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        return f"a leaf record is not a dict with a string 'name': {rec!r:.80}"
    name = rec["name"]
    if rec.get("kind") not in _KINDS:
        return f"{name}: kind must be one of {list(_KINDS)}, got {rec.get('kind')!r}"
    shape = rec.get("shape")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        return f"{name}: shape must be a list of non-negative integers, got {shape!r}"
    try:
        dt = _np_dtype(rec.get("dtype"))
    except (TypeError, ValueError):
        return f"{name}: unknown dtype {rec.get('dtype')!r}"
    if rec["kind"] == "key" and not isinstance(rec.get("impl"), str):
        return f"{name}: a typed key needs its implementation name, got {rec.get('impl')!r}"
    if "keys" in rec and not (isinstance(rec["keys"], list) and all(
            isinstance(k, list) and len(k) == 2 and k[0] in ("dict", "seq", "attr") for k in rec["keys"])):
        return f"{name}: 'keys' must be a list of [kind, key] pairs, got {rec['keys']!r:.80}"
    if name not in arrays:
        return f"{name}: listed in the metadata but absent from the file"
    arr = arrays[name]
    stored = np.dtype(f"u{dt.itemsize}") if _is_user_dtype(dt) else dt
    ok_shape = (tuple(arr.shape[:len(shape)]) == tuple(shape) and arr.ndim == len(shape) + 1
                if rec["kind"] == "key" else tuple(arr.shape) == tuple(shape))
    if arr.dtype != stored or not ok_shape:
        return (f"{name}: the array is {arr.dtype}{list(arr.shape)} but the metadata records "
                f"{rec['dtype']}{shape}{' (key data)' if rec['kind'] == 'key' else ''}")
    return None


def _check_meta(meta: dict, arrays: dict, where: str, refusing: str = "corrupt or tampered metadata") -> None:
    """The one validator of a checkpoint's metadata and arrays, for ``load`` (refuse tampered metadata before
    any tree is rebuilt) and ``save`` (refuse to write what ``load`` would refuse; ``refusing`` says so):
    every field's type, every leaf's shape/dtype."""
    problems = []
    for field in ("step", "epoch"):
        if not _is_count(meta.get(field)):
            problems.append(f"{field} must be a non-negative integer, got {meta.get(field)!r}")
    leaves = meta.get("leaves")
    if not isinstance(leaves, list):
        problems.append(f"leaves must be a list of leaf records, got {type(leaves).__name__}")
        leaves = []
    for rec in leaves:
        problem = _check_record(rec, arrays, where)
        if problem is None and rec.get("tree") not in _TREES:
            problem = f"{rec['name']}: tree must be one of {list(_TREES)}, got {rec.get('tree')!r}"
        if problem:
            problems.append(problem)
    key_rec = meta.get("key")
    if key_rec is not None:
        problem = _check_record(key_rec, arrays, where)
        if problem is None and key_rec["kind"] != "key" and (key_rec["dtype"] != "uint32"):
            problem = f"key: a raw PRNG key must be uint32, the metadata records {key_rec['dtype']}"
        if problem:
            problems.append(problem if problem.startswith("key") else "key record: " + problem)
    if problems:
        raise CheckpointError(f"{where}: {refusing} ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems[:20]))


def _parse_keystr(path: str) -> list:
    """Fallback for records without 'keys': ``['a'][0].mu`` -> [["dict","a"], ["seq",0], ["attr","mu"]]."""
    out = []
    for m in re.finditer(r"\['((?:[^'\\]|\\.)*)'\]|\[(-?\d+)\]|\.(\w+)", path):
        out.append(["dict", m.group(1)] if m.group(1) is not None else
                   ["seq", int(m.group(2))] if m.group(2) is not None else ["attr", m.group(3)])
    return out


def _rebuild_tree(items: list):
    """Nested dicts (dict keys and NamedTuple fields) and lists (sequence positions) from
    ``[(keys, leaf), ...]``; a list position without leaves (an empty container) comes back as ``{}``."""
    if len(items) == 1 and not items[0][0]:
        return items[0][1]
    kinds = {keys[0][0] for keys, _ in items if keys}
    groups: dict = {}
    for keys, leaf in items:
        groups.setdefault(keys[0][1], []).append((keys[1:], leaf))
    if kinds == {"seq"}:
        return [_rebuild_tree(groups[i]) if i in groups else {} for i in range(max(groups) + 1)]
    return {k: _rebuild_tree(v) for k, v in groups.items()}


def _skeleton(x):
    """The container structure of a pytree as JSON (leaves as null), so a template-free load keeps empty
    containers: dicts and NamedTuples as {"d": {...}}, lists and tuples as {"l": [...]}."""
    if isinstance(x, dict):
        return {"d": {str(k): _skeleton(v) for k, v in x.items()}}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {"d": {f: _skeleton(getattr(x, f)) for f in x._fields}}
    if isinstance(x, (list, tuple)):
        return {"l": [_skeleton(v) for v in x]}
    return None


def _fill(skeleton, leaves: dict, path=()):
    """Rebuild from ``_skeleton`` output; ``leaves`` maps key tuples (str for dict keys and fields,
    int for positions) to leaves; a null without a stored leaf stays None."""
    if isinstance(skeleton, dict) and "d" in skeleton:
        return {k: _fill(v, leaves, path + (k,)) for k, v in skeleton["d"].items()}
    if isinstance(skeleton, dict) and "l" in skeleton:
        return [_fill(v, leaves, path + (i,)) for i, v in enumerate(skeleton["l"])]
    return leaves.get(path)


# Files written by ``fnbp train`` before batch-norm statistics had their own tree stored them beside the
# optimizer state: ``opt_state=(optimizer state, batch-norm state)``, i.e. entries "opt_state[0]..." and
# "opt_state[1]...", and no "batch_stats..." entry.
_LEGACY_OPT, _LEGACY_STATS = "opt_state[0]", "opt_state[1]"


def _split_legacy(meta: dict, by_tree: dict, arrays: dict, expected=None) -> bool:
    """Read an old ``fnbp train`` file's ``opt_state[0]`` as ``opt_state`` and ``opt_state[1]`` as
    ``batch_stats`` (renaming records and arrays in place); True when it did.

    With templates, ``expected = (opt_state names, batch_stats names)`` and the file is split only when
    its opt_state entries are exactly the templates' under the old layout. Template-free (``expected``
    None), only a file that has the old layout's marks: run arguments in ``extra`` (written by fnbp
    train), no ``structure`` record (added with the batch_stats tree), no batch_stats entry, and every
    opt_state entry under ``[0]`` or ``[1]``."""
    names = list(by_tree["opt_state"])
    if by_tree["batch_stats"] or not names or not all(n.startswith((_LEGACY_OPT, _LEGACY_STATS)) for n in names):
        return False
    if expected is not None:
        opt_names, stats_names = expected
        legacy = ({_LEGACY_OPT + n[len("opt_state"):] for n in opt_names}
                  | {_LEGACY_STATS + n[len("batch_stats"):] for n in stats_names})
        if set(names) != legacy or set(names) == set(opt_names):
            return False
    else:
        extra = meta.get("extra")
        if "structure" in meta or not (isinstance(extra, dict) and isinstance(extra.get("args"), dict)):
            return False
    for name in names:
        rec = by_tree["opt_state"].pop(name)
        tree = "opt_state" if name.startswith(_LEGACY_OPT) else "batch_stats"
        new = tree + name[len(_LEGACY_OPT):]
        rec = {**rec, "name": new, "tree": tree, "path": rec["path"][len("[0]"):]}
        if "keys" in rec:
            rec["keys"] = rec["keys"][1:]
        arrays[new] = arrays.pop(name)
        by_tree[tree][new] = rec
    return True


def _path_part(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    return str(getattr(k, "key", k))                  # FlattenedIndexKey


def flat_dict(tree, sep: str = ".") -> dict:
    """One numpy array per leaf of ``tree``, named by the leaf's path joined with ``sep``.

    Dict keys, list/tuple positions and NamedTuple fields make the names: a LeNet's params
    ``{"conv": [{"W": ...}, ...], "dense": [...]}`` give ``"conv.0.W"``, ``"conv.0.b"``, ...,
    ``"dense.1.W"``; an Adam state's ``s`` moments give ``"s.conv.0.W"``. This is the flat
    ``{name: array}`` form that safetensors (``safetensors.numpy.save_file``) and other
    name -> array formats store; :func:`unflatten` inverts it. Arrays keep their dtype and bytes
    (``np.asarray``; Python scalars become 0-d arrays). Raises ``ValueError`` when a dict key
    contains ``sep`` or ``tree`` is a bare leaf, ``TypeError`` for a typed PRNG key leaf (store
    ``jax.random.key_data(key)`` instead)."""
    fn = "fnbp.checkpoint.flat_dict"
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [_path_part(k) for k in kp]
        if not parts:
            raise ValueError(f"{fn}: expected a pytree of arrays (dict, list, tuple), got a bare leaf "
                             f"{type(leaf).__name__}")
        bad = [p for p in parts if sep in p or not p]
        if bad:
            raise ValueError(f"{fn}: the key {bad[0]!r} at {jax.tree_util.keystr(kp)} is empty or contains the "
                             f"separator {sep!r}; pass another sep")
        if _is_typed_key(leaf):
            raise TypeError(f"{fn}: leaf {jax.tree_util.keystr(kp)} is a typed PRNG key; store "
                            f"jax.random.key_data(key) instead")
        out[sep.join(parts)] = np.asarray(leaf)
    return out


def unflatten(flat: dict, like=None, sep: str = "."):
    """The pytree of a :func:`flat_dict` ``{name: array}`` (e.g. from ``safetensors.numpy.load_file``).

    With ``like`` (a pytree such as ``fnbp.cnn.init(key, arch)`` or ``fnbp.checkpoint.load(path)["params"]``)
    the result has ``like``'s structure (NamedTuples included), with ``flat``'s arrays as leaves; a
    name missing from ``flat`` or left over raises ``ValueError`` listing them. Without ``like``:
    nested dicts, a level whose keys are exactly ``"0"``, ..., ``"n-1"`` becoming a list, as
    ``fnbp.checkpoint.load`` returns trees template-free."""
    fn = "fnbp.checkpoint.unflatten"
    if like is not None:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        names = [sep.join(_path_part(k) for k in kp) for kp, _ in leaves]
        missing, extra = [n for n in names if n not in flat], sorted(set(flat) - set(names))
        if missing or extra:
            raise ValueError(f"{fn}: the names do not match the template: missing {missing[:10]}, "
                             f"not in the template {extra[:10]}")
        return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
    root: dict = {}
    for name, arr in flat.items():
        node, parts = root, name.split(sep)
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{fn}: {name!r} goes below the leaf {p!r}")
        if parts[-1] in node:
            raise ValueError(f"{fn}: {name!r} names both a leaf and a subtree")
        node[parts[-1]] = arr

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and set(node) == {str(i) for i in range(len(node))}:
            return [node[str(i)] for i in range(len(node))]
        return node
    return listify(root)
