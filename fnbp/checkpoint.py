"""Checkpoints: one atomic ``.npz`` file holding params, optimiser state, step, epoch, PRNG key.

Layout of the file (a plain ``numpy.savez`` zip, readable with ``np.load(path)``; no pickles):

* one entry per pytree leaf, named ``"params" + keystr(path)`` / ``"opt_state" + keystr(path)``
  (e.g. ``params['layers'][0]['w']``, ``opt_state[0].mu['w']``), where ``keystr`` is
  ``jax.tree_util.keystr`` of the leaf's path from ``tree_flatten_with_path``;
* the PRNG key under ``"key"`` (its raw ``uint32`` data; for a typed key from ``jax.random.key``
  the data from ``jax.random.key_data`` plus the implementation's name in the metadata);
* ``"__fnbp_meta__"``: UTF-8 JSON as a uint8 array with ``format``, ``step``, ``epoch``, ``extra``,
  ``treedef`` (the params / opt_state treedefs' strings, informative only) and ``leaves`` (one record
  per entry: ``name``, ``tree``, ``path``, ``kind``, ``dtype``, ``shape``, plus ``impl`` for keys).

Arrays are stored with their exact dtype and bytes, so a loaded checkpoint equals the saved state
bit for bit. Dtypes numpy cannot store natively (e.g. bfloat16) are stored as unsigned integers of
the same width and viewed back on load.
"""
from __future__ import annotations

import glob
import json
import operator
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ._checkpoint_format import (_KEY, _TREES, CheckpointError, _check_meta, _encode, _is_typed_key, _key_entry,
                                _fill, _np_dtype, _parse_keystr, _rebuild_tree, _skeleton, _split_legacy,
                                _stored_array, flat_dict, unflatten)

__all__ = ["CheckpointError", "save", "load", "read_metadata", "clean_stale_temp_files", "flat_dict", "unflatten",
           "FORMAT"]

FORMAT = "fnbp-checkpoint-v1"
_META = "__fnbp_meta__"


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _as_int(fn: str, what: str, v) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{fn}: {what} must be an integer, got bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        pass
    try:  # 0-d jax / numpy integer arrays
        a = np.asarray(v)
        if a.shape == () and np.issubdtype(a.dtype, np.integer):
            return int(a)
    except Exception:
        pass
    raise TypeError(f"{fn}: {what} must be an integer, got {type(v).__name__} {v!r}")


def save(path, *, params, opt_state, step, epoch, key, extra=None, batch_stats=None) -> Path:
    """Write a checkpoint to ``path`` atomically and return ``Path(path)``.

    ``params`` and ``opt_state`` are arbitrary pytrees (dicts, lists, tuples, NamedTuples such as
    optax states) whose leaves are jax/numpy arrays, numpy scalars, Python bool/int/float/complex or
    typed PRNG keys. ``key`` is a raw ``uint32`` key (``jax.random.PRNGKey``), a typed key
    (``jax.random.key``) or ``None``. ``step`` and ``epoch`` are integers; ``extra`` is any
    JSON-serialisable value (checked before anything is written). ``batch_stats`` (optional) is a
    third pytree stored under its own name, e.g. batch norm's running statistics
    (``fnbp.mlp.init_state``).

    Steps: the parent directory is created if missing; the npz is written to a temporary file
    ``.<name>.*.tmp`` in the same directory, flushed and ``os.fsync``-ed, then moved over ``path``
    with ``os.replace`` (atomic on POSIX); the directory is then fsync-ed where the OS allows. If
    anything fails the temporary file is removed and the exception propagates, so an existing
    checkpoint at ``path`` is either fully replaced or left untouched. The file is written exactly at
    ``path`` (no ``.npz`` suffix is added). The file's mode is ``0666`` less the umask (``0644``
    under the usual umask ``022``), as for any other file the program writes.
    """
    fn = "fnbp.checkpoint.save"
    path = Path(path)
    step = _as_int(fn, "step", step)
    epoch = _as_int(fn, "epoch", epoch)
    try:
        extra_json = json.loads(json.dumps(extra, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: extra must be JSON-serialisable (no NaN/inf), got {type(extra).__name__}: {e}") from e

    arrays: dict[str, np.ndarray] = {}
    records: list[dict] = []
    treedefs, structure = {}, {}
    trees = [("params", params), ("opt_state", opt_state)]
    if batch_stats is not None:
        trees.append(("batch_stats", batch_stats))
    for tree_name, tree in trees:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        treedefs[tree_name] = str(treedef)
        structure[tree_name] = _skeleton(tree)
        for kp, leaf in leaves:
            name = tree_name + jax.tree_util.keystr(kp)
            if name in arrays:
                raise ValueError(f"{fn}: two leaves map to the same entry name {name!r}")
            arr, rec = _encode(name, leaf, fn)
            arrays[name] = arr
            records.append({"name": name, "tree": tree_name, "path": jax.tree_util.keystr(kp),
                            "keys": [_key_entry(k) for k in kp], **rec})
    if key is None:
        key_rec = None
    else:
        if not (_is_typed_key(key) or isinstance(key, (jax.Array, np.ndarray))):
            raise TypeError(f"{fn}: key must be a jax PRNG key (raw uint32 or typed) or None, got {type(key).__name__}")
        if not _is_typed_key(key) and np.asarray(key).dtype != np.uint32:
            raise TypeError(
                f"{fn}: a raw key must be a uint32 array as made by jax.random.PRNGKey, got dtype {np.asarray(key).dtype}"
            )
        arr, key_rec = _encode(_KEY, key, fn)
        key_rec = {"name": _KEY, "tree": _KEY, "path": "", **key_rec}
        arrays[_KEY] = arr
    meta = {
        "format": FORMAT,
        "step": step,
        "epoch": epoch,
        "extra": extra_json,
        "treedef": treedefs,
        "structure": structure,
        "leaves": records,
        "key": key_rec,
    }
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600; give the usual mode of a new file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def clean_stale_temp_files(path) -> list[Path]:
    """Remove the temporary files ``.<name>.*.tmp`` that an interrupted :func:`save` to ``path``
    left behind (e.g. killed with SIGKILL between writing and renaming); returns the removed paths.
    Only files of exactly that pattern, beside ``path``, are touched. Call it when no other process
    is saving to ``path`` (``fnbp train`` does, at start)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def _fsync_dir(d: Path) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _read_all(path: Path, fn: str) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.exists():
        raise FileNotFoundError(f"{fn}: checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{fn}: {path} is a directory, expected a checkpoint .npz file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] != b"PK":
        what = "an empty file" if not head else f"a file starting with {head!r}"
        raise CheckpointError(
            f"{fn}: {path} is not a readable checkpoint: expected an .npz (zip) archive starting with "
            f"b'PK', found {what}"
        )
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{fn}: {path} is a single .npy array, not an fnbp checkpoint (.npz archive)")
        with z:
            arrays = {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{fn}: {path} is not a readable checkpoint (corrupt, truncated or not an .npz zip): "
            f"{type(e).__name__}: {e}"
        ) from e
    if _META not in arrays:
        raise CheckpointError(f"{fn}: {path} is an .npz file but not an fnbp checkpoint (no {_META!r} entry)")
    try:
        meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{fn}: {path}: metadata entry {_META!r} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{fn}: {path}: unknown checkpoint format: expected {FORMAT!r}, found {found!r}")
    _check_meta(meta, arrays, f"{fn}: {path}")
    return meta, arrays


def read_metadata(path) -> dict:
    """Return the JSON metadata of the checkpoint at ``path`` (step, epoch, extra, leaves, ...).

    Reads (and CRC-checks) the whole file; raises like :func:`load` for missing or corrupt files.
    """
    meta, _ = _read_all(Path(path), "fnbp.checkpoint.read_metadata")
    return meta


def _template_info(leaf):
    """(kind, dtype name, shape, impl) expected from a template leaf."""
    if _is_typed_key(leaf):
        return "key", str(np.asarray(jax.random.key_data(leaf)).dtype), tuple(leaf.shape), str(jax.random.key_impl(leaf))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return "array", np.dtype(leaf.dtype).name, tuple(leaf.shape), None
    if isinstance(leaf, (bool, int, float, complex)):
        return "python", np.asarray(leaf).dtype.name, (), None
    arr = np.asarray(leaf)
    return "array", arr.dtype.name, tuple(arr.shape), None


def _rebuild_leaf(template, arr: np.ndarray, rec: dict):
    if rec["kind"] == "key":
        return jax.random.wrap_key_data(jnp.asarray(arr), impl=rec["impl"])
    arr = _stored_array(arr, rec)
    if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
        return jnp.asarray(arr)
    if isinstance(template, np.ndarray):
        return arr
    if isinstance(template, np.generic):
        return arr[()]
    if isinstance(template, (bool, int, float, complex)):
        return type(template)(arr.item())
    return arr


def _diff_lines(tree_name: str, expected: dict, saved: dict) -> list[str]:
    lines = []
    miss = [n for n in expected if n not in saved]
    extra = [n for n in saved if n not in expected]
    for n in miss:
        lines.append(f"missing from the file: {n} (template has {expected[n][1]}{list(expected[n][2])})")
    for n in extra:
        lines.append(f"extra in the file (not in {tree_name}_like): {n} ({saved[n]['dtype']}{saved[n]['shape']})")
    for n, (kind, dtype, shape, impl) in expected.items():
        rec = saved.get(n)
        if rec is None:
            continue
        if (kind == "key") != (rec["kind"] == "key"):
            lines.append(f"kind mismatch at {n}: template is {'a typed PRNG key' if kind == 'key' else 'an array'}, "
                         f"file has {'a typed PRNG key' if rec['kind'] == 'key' else 'an array'}")
            continue
        if kind == "key" and impl != rec.get("impl"):
            lines.append(f"key implementation mismatch at {n}: template {impl}, file {rec.get('impl')}")
        if tuple(rec["shape"]) != shape:
            lines.append(f"shape mismatch at {n}: template {shape}, file {tuple(rec['shape'])}")
        if rec["dtype"] != dtype:
            lines.append(f"dtype mismatch at {n}: template {dtype}, file {rec['dtype']}")
    return lines


def load(path, *, params_like=None, opt_state_like=None, batch_stats_like=None) -> dict:
    """Read the checkpoint at ``path``; with templates, into their structures, else template-free.

    Template-free (``fnbp.checkpoint.load(path)``): each stored tree comes back as nested dicts
    (dict keys; NamedTuple states such as ``AdamState`` as a dict of their fields) and lists
    (sequence positions) of jax arrays (Python scalars for Python leaves), e.g. ``params[0]["W"]``.

    With a template (``params_like`` etc.) the template gives the pytree structure and each leaf's
    expected shape and dtype (their values are ignored; ``jax.ShapeDtypeStruct`` leaves are
    accepted). Every template leaf path must be in the file and vice versa, with equal shape and
    dtype; otherwise a :class:`CheckpointError` (``ValueError``) lists every difference: leaf paths
    missing from the file, extra leaf paths in the file, and shape / dtype mismatches, each with the
    path and both values. Leaves come back as the template leaf's type: jax arrays for jax-array (or
    ShapeDtypeStruct) templates, numpy arrays / scalars for numpy ones, Python scalars for Python
    ones, typed keys for typed-key templates, always with the saved dtype and exact bytes.

    Returns ``{"params", "opt_state", "batch_stats", "step", "epoch", "key", "extra", "args"}``:
    ``batch_stats`` is None when the file has none (and no template asks for it); ``args`` is
    ``extra["args"]`` when ``extra`` is a dict holding one (``fnbp train`` stores its run
    arguments there), else None. ``key`` is rebuilt from the file alone: a uint32 jax array for a
    raw key, a typed key (same implementation) for a typed one, ``None`` if none was saved. A
    missing file raises ``FileNotFoundError``; a file that is not a zip, is truncated, fails its CRC
    check, lacks fnbp metadata or whose metadata contradicts its arrays (wrong types of step,
    epoch, records; an array whose shape or dtype differs from its record) raises
    :class:`CheckpointError`; all messages name the file.

    Files of ``fnbp train`` from before batch-norm statistics had their own name (they stored
    ``opt_state=(optimizer state, batch-norm state)``) load as if written today: the file's
    ``opt_state[0]`` comes back as ``opt_state`` and ``opt_state[1]`` as ``batch_stats`` -- with
    templates when the file matches both templates in that old layout exactly, template-free when
    the file has the old layout's marks (run arguments, no ``structure`` record, no batch_stats).
    """
    fn = "fnbp.checkpoint.load"
    path = Path(path)
    meta, arrays = _read_all(path, fn)
    by_tree: dict[str, dict[str, dict]] = {t: {} for t in _TREES}
    for rec in meta["leaves"]:
        by_tree[rec["tree"]][rec["name"]] = rec

    out = {}
    problems = []
    plans = {}
    templates = {"params": params_like, "opt_state": opt_state_like, "batch_stats": batch_stats_like}
    expected = {}
    for tree_name, template in templates.items():
        if template is None:
            continue
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        expected[tree_name] = {tree_name + jax.tree_util.keystr(kp): _template_info(leaf) for kp, leaf in leaves}
        plans[tree_name] = (leaves, treedef)
    if opt_state_like is None and batch_stats_like is None:       # an old fnbp train file (see the docstring)
        _split_legacy(meta, by_tree, arrays)
    elif opt_state_like is not None and batch_stats_like is not None:
        _split_legacy(meta, by_tree, arrays, (expected["opt_state"], expected["batch_stats"]))
    for tree_name, names in expected.items():
        problems += _diff_lines(tree_name, names, by_tree[tree_name])
    if problems:
        shown = problems[:40]
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(
            f"{fn}: {path} does not match the templates ({len(problems)} difference(s)):\n  "
            + "\n  ".join(shown) + more
        )
    for tree_name in _TREES:
        if tree_name in plans:
            leaves, treedef = plans[tree_name]
            rebuilt = []
            for kp, leaf in leaves:
                name = tree_name + jax.tree_util.keystr(kp)
                rebuilt.append(_rebuild_leaf(leaf, arrays[name], by_tree[tree_name][name]))
            out[tree_name] = jax.tree_util.tree_unflatten(treedef, rebuilt)
        else:
            items = []
            for name, rec in by_tree[tree_name].items():
                like = jnp.zeros(())                  # jax arrays, or Python scalars for Python leaves
                if rec["kind"] == "python":
                    like = {"b": False, "i": 0, "u": 0, "f": 0.0, "c": 0j}[arrays[name].dtype.kind]
                keys = rec.get("keys") or _parse_keystr(rec["path"])
                items.append((keys, _rebuild_leaf(like, arrays[name], rec)))
            structure = meta.get("structure") if isinstance(meta.get("structure"), dict) else {}
            if structure.get(tree_name) is not None:
                out[tree_name] = _fill(structure[tree_name], {tuple(k[1] for k in keys): v for keys, v in items})
            else:                                    # files without the structure record
                out[tree_name] = _rebuild_tree(items) if items else None

    key_rec = meta.get("key")
    if key_rec is None:
        key = None
    elif key_rec["kind"] == "key":
        key = jax.random.wrap_key_data(jnp.asarray(arrays[_KEY]), impl=key_rec["impl"])
    else:
        key = jnp.asarray(arrays[_KEY])
    extra = meta.get("extra")
    out.update(step=meta["step"], epoch=meta["epoch"], key=key, extra=extra,
               args=extra.get("args") if isinstance(extra, dict) else None)
    return out


def load_model(path):
    """``(model, params, batch_stats, checkpoint)``: a checkpoint written by ``fnbp train`` reloaded into its
    model from what the file records (``extra["model"]``: an ``fnbp.nn`` model's description and input shape,
    or the MLP's widths and activation), without the command that made it.  ``model`` is an ``fnbp.nn`` model,
    or the ``fnbp.mlp.Network`` of an MLP run; ``checkpoint`` is ``load``'s dict (opt_state template-free).
    Raises ValueError naming the file when it records no model (files from before models were recorded)."""
    import jax
    from . import activations, mlp, nn
    fn = "fnbp.checkpoint.load_model"
    extra = read_metadata(path).get("extra")
    spec = extra.get("model") if isinstance(extra, dict) else None
    if not isinstance(spec, dict) or spec.get("kind") not in ("nn", "mlp"):
        raise ValueError(f"{fn}: {path} records no model (extra['model']); it was not written by fnbp train, or "
                         f"by a version before models were recorded: load it with fnbp.checkpoint.load and "
                         f"params_like= from the model that made it")
    if spec["kind"] == "nn":
        model = nn.from_description(spec["description"])
        params_like, state_like = jax.eval_shape(lambda: model.init(jax.random.key(0), tuple(spec["input_shape"])))
    else:
        g = activations.ACTIVATIONS[spec["activation"]]
        if spec["activation"] == "leaky_relu":
            import functools
            g = functools.partial(g, slope=spec["slope"])
        model = mlp.Network(activation=g, dropout=spec["dropout"])
        params_like = jax.eval_shape(lambda: mlp.init(jax.random.key(0), spec["layers"], batch_norm=spec["batch_norm"],
                                                      prelu_alpha=0.25 if spec["activation"] == "prelu" else None))
        state_like = mlp.init_state(params_like)
    loaded = load(path, params_like=params_like, batch_stats_like=state_like)
    return model, loaded["params"], loaded["batch_stats"], loaded
