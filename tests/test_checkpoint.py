"""Tests for fnbp.checkpoint: bit-exact round trips, atomic writes, structure and corruption errors."""
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnbp import checkpoint as ckpt


class Pair(NamedTuple):
    a: jax.Array
    b: tuple


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "layers": [
            {"w": jax.random.normal(k1, (3, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)},
            {"w": jax.random.normal(k2, (4, 2), jnp.float64), "b": jnp.arange(2, dtype=jnp.bfloat16)},
        ],
        "pair": Pair(jax.random.uniform(k3, (5,)), (np.int32(7), np.arange(3, dtype=np.int16))),
        "scale": 0.5,
        "count": 3,
    }


def _float_params(p):
    """The differentiable part of _params (optax needs inexact leaves)."""
    return {"layers": p["layers"], "pair_a": p["pair"].a}


def _adam_state(params, steps=3):
    opt = optax.adam(1e-2)
    state = opt.init(params)
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1 * (i + 1)), params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_bit_identical(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        xa, ya = np.asarray(x), np.asarray(y)
        assert xa.dtype == ya.dtype and xa.shape == ya.shape
        assert xa.tobytes() == ya.tobytes()


@pytest.mark.parametrize("key_kind", ["raw", "typed", "none"])
def test_round_trip_bit_identical(tmp_path, key_kind):
    key = {"raw": jax.random.PRNGKey(42), "typed": jax.random.key(42), "none": None}[key_kind]
    if key is not None:
        key = jax.random.split(key)[1]  # not a trivially reconstructible key
    p = _params()
    fp, opt_state = _adam_state(_float_params(p))
    params = {**p, "trained": fp}
    path = tmp_path / "ckpt.npz"
    ckpt.save(path, params=params, opt_state=opt_state, step=123, epoch=4, key=key,
              extra={"lr": 1e-2, "note": "ünïcode", "hist": [1, 2]})
    out = ckpt.load(path, params_like=params, opt_state_like=opt_state)
    assert set(out) == {"params", "opt_state", "batch_stats", "step", "epoch", "key", "extra", "args"}
    assert out["batch_stats"] is None and out["args"] is None
    _assert_bit_identical(out["params"], params)
    _assert_bit_identical(out["opt_state"], opt_state)
    assert isinstance(out["opt_state"][0], optax.ScaleByAdamState)
    assert out["opt_state"][0].count.dtype == jnp.int32 and int(out["opt_state"][0].count) == 3
    assert out["params"]["layers"][1]["b"].dtype == jnp.bfloat16
    assert out["params"]["layers"][1]["w"].dtype == jnp.float64
    assert type(out["params"]["scale"]) is float and type(out["params"]["count"]) is int
    assert isinstance(out["params"]["pair"].b[0], np.int32)
    assert out["step"] == 123 and out["epoch"] == 4
    assert out["extra"] == {"lr": 1e-2, "note": "ünïcode", "hist": [1, 2]}
    if key is None:
        assert out["key"] is None
    else:
        _assert_bit_identical(out["key"], key)
        np.testing.assert_array_equal(jax.random.normal(out["key"], (3,)), jax.random.normal(key, (3,)))
    names = ckpt.read_metadata(path)["leaves"]
    assert "params['layers'][0]['w']" in {r["name"] for r in names}
    assert "opt_state[0].mu['layers'][1]['b']" in {r["name"] for r in names}
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_typed_key_leaf_inside_tree_and_shape_dtype_templates(tmp_path):
    params = {"w": jnp.ones((2, 2), jnp.float32), "k": jax.random.split(jax.random.key(1), 3)}
    state = optax.sgd(0.1).init({"w": params["w"]})
    ckpt.save(tmp_path / "c", params=params, opt_state=state, step=0, epoch=0, key=None)
    like = jax.eval_shape(lambda: {"w": params["w"]})
    like = {"w": like["w"], "k": params["k"]}
    out = ckpt.load(tmp_path / "c", params_like=like, opt_state_like=state)
    _assert_bit_identical(out["params"], params)


def _train(params, opt_state, key, n, opt):
    """A tiny noisy regression loop: bit-identical resumption needs exact params, state and key."""
    x = jnp.linspace(-1, 1, 16, dtype=jnp.float32)[:, None]

    def loss(p, noise):
        return jnp.mean((x @ p["w"] + p["b"] - (2 * x + noise)) ** 2)

    for _ in range(n):
        key, sub = jax.random.split(key)
        g = jax.grad(loss)(params, 0.1 * jax.random.normal(sub, x.shape, jnp.float32))
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
    return params, opt_state, key


@pytest.mark.slow
def test_resumed_training_is_bit_identical(tmp_path):
    opt = optax.adam(0.05)
    p0 = {"w": jnp.zeros((1, 1), jnp.float32), "b": jnp.zeros((1,), jnp.float32)}
    key0 = jax.random.key(0)
    straight = _train(p0, opt.init(p0), key0, 6, opt)
    p, s, k = _train(p0, opt.init(p0), key0, 3, opt)
    ckpt.save(tmp_path / "mid.npz", params=p, opt_state=s, step=3, epoch=0, key=k)
    r = ckpt.load(tmp_path / "mid.npz", params_like=p0, opt_state_like=opt.init(p0))
    resumed = _train(r["params"], r["opt_state"], r["key"], 3, opt)
    _assert_bit_identical(resumed[:2], straight[:2])
    _assert_bit_identical(resumed[2], straight[2])


def _simple(step):
    params = {"w": jnp.full((2,), float(step), jnp.float32)}
    return params, optax.sgd(0.1).init(params)


def test_atomic_write_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ckpt.npz"
    p1, s1 = _simple(1)
    ckpt.save(path, params=p1, opt_state=s1, step=1, epoch=0, key=jax.random.PRNGKey(1))
    before = path.read_bytes()

    def boom(src, dst):
        assert os.path.exists(src) and os.path.dirname(src) == str(path.parent)  # temp file, same dir
        raise OSError("simulated crash during os.replace")

    monkeypatch.setattr(os, "replace", boom)
    p2, s2 = _simple(2)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save(path, params=p2, opt_state=s2, step=2, epoch=0, key=jax.random.PRNGKey(2))
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["ckpt.npz"]  # no temp files left
    monkeypatch.undo()
    out = ckpt.load(path, params_like=p1, opt_state_like=s1)
    assert out["step"] == 1 and float(out["params"]["w"][0]) == 1.0


def test_atomic_write_when_savez_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    p1, s1 = _simple(1)
    ckpt.save(path, params=p1, opt_state=s1, step=1, epoch=0, key=None)
    before = path.read_bytes()

    def half_then_fail(file, **arrays):
        file.write(b"PK\x03\x04 partial zip bytes")
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(path, params=p1, opt_state=s1, step=2, epoch=0, key=None)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_structure_mismatch_names_paths_and_values(tmp_path):
    params, state = _simple(1)
    params = {**params, "v": jnp.zeros((3,), jnp.float32)}
    state = optax.sgd(0.1).init(params)
    path = tmp_path / "c.npz"
    ckpt.save(path, params=params, opt_state=state, step=0, epoch=0, key=None)

    missing = {**params, "extra_leaf": jnp.zeros(1)}
    with pytest.raises(ValueError) as ei:
        ckpt.load(path, params_like=missing, opt_state_like=state)
    msg = str(ei.value)
    assert str(path) in msg and "missing from the file: params['extra_leaf']" in msg

    fewer = {"w": params["w"]}
    with pytest.raises(ckpt.CheckpointError, match=r"extra in the file.*params\['v'\]"):
        ckpt.load(path, params_like=fewer, opt_state_like=state)

    reshaped = {**params, "v": jnp.zeros((4,), jnp.float32)}
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatch at params\['v'\]: template \(4,\), file \(3,\)"):
        ckpt.load(path, params_like=reshaped, opt_state_like=state)

    retyped = {**params, "w": params["w"].astype(jnp.float64)}
    with pytest.raises(ckpt.CheckpointError, match=r"dtype mismatch at params\['w'\]: template float64, file float32"):
        ckpt.load(path, params_like=retyped, opt_state_like=state)

    adam = optax.adam(1e-3).init(params)  # a different optimiser's state
    with pytest.raises(ckpt.CheckpointError, match=r"opt_state\[0\]\.mu\['w'\]"):
        ckpt.load(path, params_like=params, opt_state_like=adam)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    params, state = _simple(1)
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        ckpt.load(tmp_path / "nothing.npz", params_like=params, opt_state_like=state)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(ckpt.CheckpointError, match="garbage.npz"):
        ckpt.load(garbage, params_like=params, opt_state_like=state)

    good = tmp_path / "good.npz"
    ckpt.save(good, params=params, opt_state=state, step=1, epoch=1, key=jax.random.PRNGKey(0))
    raw = good.read_bytes()
    npy = raw.index(b"\x93NUMPY")  # first member's .npy header; its array data follows it
    data_at = npy + 10 + int.from_bytes(raw[npy + 8: npy + 10], "little")
    flipped = raw[:data_at + 1] + bytes([raw[data_at + 1] ^ 0xFF]) + raw[data_at + 2:]  # CRC must catch it
    for name, blob in [("truncated.npz", raw[: len(raw) // 2]), ("empty.npz", b""),
                       ("flipped.npz", flipped)]:
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(ckpt.CheckpointError, match=name):
            ckpt.load(p, params_like=params, opt_state_like=state)

    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.zeros(2))
    with pytest.raises(ckpt.CheckpointError, match=r"plain.npz.*not an fnbp checkpoint"):
        ckpt.load(plain, params_like=params, opt_state_like=state)


def test_save_rejects_bad_arguments_before_writing(tmp_path):
    params, state = _simple(1)
    path = tmp_path / "c.npz"
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(path, params=params, opt_state=state, step=0, epoch=0, key=None, extra={"f": object()})
    with pytest.raises(TypeError, match="step"):
        ckpt.save(path, params=params, opt_state=state, step=1.5, epoch=0, key=None)
    with pytest.raises(TypeError, match="uint32"):
        ckpt.save(path, params=params, opt_state=state, step=0, epoch=0, key=jnp.zeros(2, jnp.float32))
    with pytest.raises(TypeError, match=r"leaf params\['s'\]"):
        ckpt.save(path, params={"s": "text"}, opt_state=state, step=0, epoch=0, key=None)
    assert os.listdir(tmp_path) == []
    # jax / numpy integer scalars are fine as step and epoch
    ckpt.save(path, params=params, opt_state=state, step=jnp.int32(5), epoch=np.int64(2), key=None)
    assert ckpt.read_metadata(path)["step"] == 5


def test_stale_temp_files_of_our_pattern_are_cleaned(tmp_path):
    path = tmp_path / "checkpoint.npz"
    stale = [tmp_path / ".checkpoint.npz.abc123.tmp", tmp_path / ".checkpoint.npz.zz_9.tmp"]
    others = [tmp_path / ".other.npz.abc.tmp", tmp_path / "checkpoint.npz.tmp", tmp_path / "notes.txt"]
    for f in stale + others:
        f.write_bytes(b"x" * 10)
    removed = ckpt.clean_stale_temp_files(path)
    assert sorted(removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in others)
    assert ckpt.clean_stale_temp_files(tmp_path / "missing" / "c.npz") == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_file_mode_follows_the_umask(tmp_path, umask, mode):
    params, state = _simple(1)
    old = os.umask(umask)
    try:
        ckpt.save(tmp_path / "c.npz", params=params, opt_state=state, step=0, epoch=0, key=None)
    finally:
        os.umask(old)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == mode


def _fnbp_params():
    from fnbp import mlp, optim
    params = mlp.init(jax.random.PRNGKey(0), [3, 4, 2], batch_norm=True)
    return params, optim.adagrad(0.1).init(params), mlp.init_state(params)


def test_template_free_load_returns_the_trees_and_run_arguments(tmp_path):
    params, opt_state, stats = _fnbp_params()
    stats = [{"mean": stats[0]["mean"] + 1.5, "var": stats[0]["var"] * 2}, {}]
    path = tmp_path / "c.npz"
    ckpt.save(path, params=params, opt_state=opt_state, batch_stats=stats, step=7, epoch=2,
              key=jax.random.PRNGKey(3), extra={"args": {"lr": 0.1, "layers": [3, 4, 2]}, "history": []})
    out = ckpt.load(path)
    assert out["args"] == {"lr": 0.1, "layers": [3, 4, 2]} and out["step"] == 7 and out["epoch"] == 2
    assert isinstance(out["params"], list) and len(out["params"]) == 2
    assert set(out["params"][0]) == {"W", "b", "gamma", "beta"}
    _assert_bit_identical(out["params"], params)
    assert set(out["opt_state"]) == {"count", "r"}                   # AdaGradState's fields, as a dict
    _assert_bit_identical(out["opt_state"]["r"], opt_state.r)
    assert out["batch_stats"] == [{"mean": out["batch_stats"][0]["mean"], "var": out["batch_stats"][0]["var"]}, {}]
    _assert_bit_identical(out["batch_stats"][0], stats[0])
    with np.load(path) as z:                                        # statistics under their own name
        assert any(k.startswith("batch_stats[0]") for k in z.files)
        assert not any(k.startswith("opt_state") and "mean" in k for k in z.files)
        assert {k for k in z.files if "['W']" in k and not k.startswith("opt_state")} == \
            {"params[0]['W']", "params[1]['W']"}
    templated = ckpt.load(path, params_like=params, opt_state_like=opt_state, batch_stats_like=stats)
    _assert_bit_identical(templated["batch_stats"], stats)


def _rewrite_meta(path, change):
    import json
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__fnbp_meta__"].tobytes())
    change(meta, arrays)
    arrays["__fnbp_meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)


def _set(field, value):
    def change(meta, arrays):
        meta[field] = value
    return change


def _record(name, field, value):
    def change(meta, arrays):
        next(r for r in meta["leaves"] if r["name"] == name)[field] = value
    return change


def _array(name, value):
    def change(meta, arrays):
        arrays[name] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set("epoch", "3"), r"epoch must be a non-negative integer, got '3'"),
    (_set("epoch", -1), r"epoch must be a non-negative integer, got -1"),
    (_set("step", True), r"step must be a non-negative integer, got True"),
    (_set("step", 2.5), r"step must be a non-negative integer"),
    (_set("leaves", {"a": 1}), r"leaves must be a list"),
    (_set("key", {"name": "key", "kind": "array", "dtype": "float32", "shape": [2]}), r"key"),
    (_record("params['w']", "shape", [3]), r"params\['w'\]: the array is float32\[2\] but the metadata records "
                                           r"float32\[3\]"),
    (_record("params['w']", "dtype", "float64"), r"params\['w'\]: the array is float32\[2\] but .* float64"),
    (_record("params['w']", "dtype", "no_such_dtype"), r"unknown dtype 'no_such_dtype'"),
    (_record("params['w']", "tree", "elsewhere"), r"tree must be one of"),
    (_array("params['w']", np.zeros((2, 2), np.float32)), r"the array is float32\[2, 2\]"),
    (_array("key", np.zeros(2, np.float32)), r"key"),
])
def test_tampered_metadata_fails_at_load_naming_the_file(tmp_path, change, message):
    params, state = _simple(1)
    path = tmp_path / "tampered.npz"
    ckpt.save(path, params=params, opt_state=state, step=3, epoch=1, key=jax.random.PRNGKey(0))
    _rewrite_meta(path, change)
    for load in (lambda: ckpt.load(path), lambda: ckpt.load(path, params_like=params, opt_state_like=state),
                 lambda: ckpt.read_metadata(path)):
        with pytest.raises(ckpt.CheckpointError, match=r"tampered\.npz: corrupt or tampered metadata") as ei:
            load()
        assert re.search(message, str(ei.value)), str(ei.value)


def _pre_wave2_file(path, params, opt_state, stats, args):
    """A checkpoint as `fnbp train` wrote it before batch_stats had its own name (checked against a file
    written by commit 6dd948d^): opt_state=(optimizer state, batch-norm state), records without "keys",
    metadata without "structure", run arguments without --model/--augment/--dp-*."""
    ckpt.save(path, params=params, opt_state=(opt_state, stats), step=5, epoch=1, key=jax.random.PRNGKey(1),
              extra={"args": args, "history": [{"epoch": 1}]})

    def old_layout(meta, arrays):
        del meta["structure"]
        for rec in meta["leaves"]:
            del rec["keys"]
    _rewrite_meta(path, old_layout)


def test_pre_wave2_checkpoint_loads_with_batch_stats_under_their_own_name(tmp_path):
    params, opt_state, stats = _fnbp_params()
    stats = [{"mean": stats[0]["mean"] - 0.5, "var": stats[0]["var"] * 3}, {}]
    path = tmp_path / "old.npz"
    _pre_wave2_file(path, params, opt_state, stats, {"layers": [3, 4, 2], "batch_norm": True})
    with np.load(path) as z:                                       # the old layout, as stored
        assert "opt_state[1][0]['mean']" in z.files and not any(k.startswith("batch_stats") for k in z.files)
    templated = ckpt.load(path, params_like=params, opt_state_like=opt_state, batch_stats_like=stats)
    _assert_bit_identical(templated["params"], params)
    _assert_bit_identical(templated["opt_state"], opt_state)
    _assert_bit_identical(templated["batch_stats"], stats)
    free = ckpt.load(path)
    assert set(free["opt_state"]) == {"count", "r"}
    _assert_bit_identical(free["opt_state"]["r"], opt_state.r)
    _assert_bit_identical(free["batch_stats"][0], stats[0])
    # without batch-norm statistics (an MLP without --batch-norm): everything under opt_state[0]
    from fnbp import mlp, optim
    plain = mlp.init(jax.random.PRNGKey(2), [3, 4, 2])
    plain_state = optim.adagrad(0.1).init(plain)
    _pre_wave2_file(tmp_path / "plain.npz", plain, plain_state, [{}, {}], {"layers": [3, 4, 2]})
    got = ckpt.load(tmp_path / "plain.npz", params_like=plain, opt_state_like=plain_state, batch_stats_like=[{}, {}])
    _assert_bit_identical(got["opt_state"], plain_state)


def test_a_tuple_opt_state_of_today_is_not_mistaken_for_the_old_layout(tmp_path):
    params, opt_state, stats = _fnbp_params()
    chained = (opt_state, {"scale": jnp.ones(3)})                 # e.g. an optax.chain state: a real tuple
    path = tmp_path / "chain.npz"
    ckpt.save(path, params=params, opt_state=chained, step=1, epoch=1, key=None, extra={"args": {}})
    free = ckpt.load(path)
    assert isinstance(free["opt_state"], list) and len(free["opt_state"]) == 2 and free["batch_stats"] is None
    got = ckpt.load(path, params_like=params, opt_state_like=chained, batch_stats_like=[{}, {}])
    _assert_bit_identical(got["opt_state"], chained)
    with pytest.raises(ckpt.CheckpointError, match=r"missing from the file: batch_stats\[0\]\['mean'\]"):
        ckpt.load(path, params_like=params, opt_state_like=chained, batch_stats_like=stats)


# --- export recipes (docs/checkpoints.md): the page's blocks run as written, on a checkpoint written by fnbp ---

def _lenet_checkpoint(path):
    """The trees of a digits LeNet with batch norm and Adam (structure from fnbp.cnn and fnbp.optim, found
    with jax.eval_shape so nothing compiles; values random), saved by fnbp.checkpoint.save as
    fnbp train --model lenet --batch-norm --epochs 2 saves them (step 178 = 2 epochs x 89 steps)."""
    from fnbp import cnn, optim
    arch = cnn.lenet((8, 8, 1), batch_norm=True)

    def trees(key):
        params = cnn.init(key, arch)
        return {"params": params, "opt_state": optim.adam(1e-2).init(params), "batch_stats": cnn.init_state(params)}
    rng = np.random.default_rng(0)
    original = jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape) if jnp.issubdtype(s.dtype, jnp.floating)
                   else rng.integers(1, 100, s.shape)).astype(s.dtype), jax.eval_shape(trees, jax.random.PRNGKey(0)))
    ckpt.save(path, **original, step=178, epoch=2, key=jax.random.PRNGKey(0),
              extra={"args": {"model": "lenet", "batch_norm": True}, "history": []})
    return original


def _same_leaves(a, b):
    """Same leaf names (paths, so a NamedTuple state and its dict form compare), dtypes, shapes and bytes."""
    fa, fb = ckpt.flat_dict(a), ckpt.flat_dict(b)
    assert sorted(fa) == sorted(fb) and fa
    for name, x in fa.items():
        y = fb[name]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


def test_docs_export_recipes_to_safetensors_and_orbax_read_back_bit_identical(tmp_path, monkeypatch, capsys):
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md").read_text()
    blocks, printed = re.findall(r"```python\n(.*?)```", page, re.S), re.findall(r"```text\n(.*?)```", page, re.S)
    assert len(blocks) == len(printed) == 3
    original = _lenet_checkpoint(tmp_path / "runs" / "digits-lenet" / "checkpoint.npz")
    monkeypatch.chdir(tmp_path)
    ns = {}
    for code, expected in zip(blocks, printed):
        exec(compile(code, "docs/checkpoints.md", "exec"), ns)
        assert capsys.readouterr().out == expected
    # safetensors: every leaf of the three trees, under its path name, with its dtype and bytes
    from safetensors.numpy import load_file
    flat = load_file(tmp_path / "lenet.safetensors")
    assert "params.conv.0.W" in flat and "opt_state.s.dense.1.b" in flat and "batch_stats.conv.1.var" in flat
    _same_leaves(ckpt.unflatten(flat, like=original), original)
    _same_leaves(ns["restored"], original)
    # orbax: the restored tree equals what fnbp saved
    back = ns["back"]
    assert back["step"] == 178
    _same_leaves({k: back[k] for k in original}, original)


@pytest.mark.parametrize("field, value", [("step", -1), ("epoch", -3), ("step", np.int64(-2))])
def test_save_refuses_what_load_refuses(tmp_path, field, value):
    """save(step=-1) used to write a file that load refused; both now run the one validator (_check_meta)."""
    params, state = _simple(1)
    path = tmp_path / "c.npz"
    kw = {"step": 1, "epoch": 0, field: value}
    with pytest.raises(ckpt.CheckpointError, match=rf"fnbp.checkpoint.save: .*c\.npz: refusing to write a checkpoint "
                                                   rf"that fnbp.checkpoint.load would refuse .*\n  {field} must be a "
                                                   rf"non-negative integer, got {int(value)}"):
        ckpt.save(path, params=params, opt_state=state, key=None, **kw)
    assert os.listdir(tmp_path) == []


def test_os_errors_name_the_checkpoint_not_a_temporary_file(tmp_path, monkeypatch):
    params, state = _simple(1)
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match=r"fnbp.checkpoint.save: .*adir is a directory; a checkpoint is a "
                                                r"file path") as ei:
        ckpt.save(tmp_path / "adir", params=params, opt_state=state, step=0, epoch=0, key=None)
    assert ei.value.filename == str(tmp_path / "adir") and ".tmp" not in str(ei.value)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device", src, None, dst)
    monkeypatch.setattr(os, "replace", disk_full)
    path = tmp_path / "c.npz"
    with pytest.raises(OSError, match=r"cannot write .*c\.npz: No space left on device") as ei:
        ckpt.save(path, params=params, opt_state=state, step=0, epoch=0, key=None)
    assert ei.value.filename == str(path) and ".tmp" not in str(ei.value) and ei.value.errno == 28
    assert sorted(os.listdir(tmp_path)) == ["adir"]                 # the temporary file is gone
