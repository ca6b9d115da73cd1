"""Tests for fnbp.data (IDX files: tests/test_idx.py): MNIST layouts and errors, digits, toy sets, stratified split."""
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fnbp import data

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
README_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------ MNIST (synthetic files)


def _write_mnist(d: Path, name: str, images, labels, gz=True):
    sfx = ".gz" if gz else ""
    kind = "train" if name == "train" else "t10k"
    data.write_idx(d / f"{kind}-images-idx3-ubyte{sfx}", np.asarray(images, np.uint8))
    data.write_idx(d / f"{kind}-labels-idx1-ubyte{sfx}", np.asarray(labels, np.uint8))


def _fake(n, rows=4, cols=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(n) % 10
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_t10k_only_stratified_split(tmp_path, gz):
    images, labels = _fake(100)
    _write_mnist(tmp_path, "t10k", images, labels, gz=gz)
    ds = data.load_mnist(tmp_path, seed=3)
    assert ds.name == "mnist" and ds.n_classes == 10
    assert ds.x_train.shape == (80, 12) and ds.x_test.shape == (20, 12)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert np.bincount(ds.y_train, minlength=10).tolist() == [8] * 10
    assert np.bincount(ds.y_test, minlength=10).tolist() == [2] * 10
    allx = np.concatenate([ds.x_train, ds.x_test])
    assert allx.min() == 0.0 and allx.max() == 1.0
    # Every image is one of the originals, scaled by 1/255, with its own label.
    table = {images[i].tobytes(): labels[i] for i in range(100)}
    for x, y in zip(ds.x_test, ds.y_test):
        key = np.rint(x * 255).astype(np.uint8).reshape(4, 3).tobytes()
        assert table[key] == y
    again = data.load_mnist(tmp_path, seed=3)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    other = data.load_mnist(tmp_path, seed=4)
    assert not np.array_equal(other.x_test, ds.x_test)
    unflat = data.load_mnist(tmp_path, seed=3, flatten=False)
    assert unflat.x_train.shape == (80, 4, 3)
    np.testing.assert_array_equal(unflat.x_train.reshape(80, -1), ds.x_train)


def test_mnist_four_files_use_official_split(tmp_path):
    tr_i, tr_l = _fake(30, seed=1)
    te_i, te_l = _fake(20, seed=2)
    _write_mnist(tmp_path, "train", tr_i, tr_l, gz=False)
    _write_mnist(tmp_path, "t10k", te_i, te_l, gz=True)
    ds = data.load_mnist(tmp_path, flatten=False)
    np.testing.assert_array_equal(ds.x_train, tr_i.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, tr_l)
    np.testing.assert_array_equal(ds.x_test, te_i.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, te_l)
    st_ = data.load_mnist(tmp_path, standardize=True)
    np.testing.assert_allclose(st_.x_train.mean(axis=0), 0, atol=1e-5)


def test_mnist_count_mismatch_names_both_files(tmp_path):
    images, labels = _fake(12)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:11].astype(np.uint8))
    with pytest.raises(data.IDXFormatError) as ei:
        data.load_mnist(tmp_path)
    msg = str(ei.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "12 images" in msg and "11 labels" in msg


def test_mnist_bad_ndim_and_label_range(tmp_path):
    images, labels = _fake(10)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", images.reshape(10, -1))  # 2-D: wrong
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels.astype(np.uint8))
    with pytest.raises(data.IDXFormatError, match=r"t10k-images-idx3-ubyte.*expected a 3-D"):
        data.load_mnist(tmp_path)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    bad = labels.astype(np.uint8)
    bad[4] = 11
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", bad)
    with pytest.raises(data.IDXFormatError, match=r"t10k-labels-idx1-ubyte.*0-9.*max 11"):
        data.load_mnist(tmp_path)


def test_mnist_missing_files_message(tmp_path, monkeypatch):
    with pytest.raises(data.MNISTNotFoundError) as ei:
        data.load_mnist(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path.resolve()) in msg and "FNBP_MNIST_DIR" in msg
    for base in data.MNIST_FILES.values():
        assert base in msg
    assert isinstance(ei.value, FileNotFoundError)
    # only one of the two train files: incomplete, not silently ignored
    images, labels = _fake(20)
    _write_mnist(tmp_path, "t10k", images, labels)
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(data.MNISTNotFoundError, match="missing train-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)
    # a directory that does not exist
    with pytest.raises(data.MNISTNotFoundError, match=r"no-such-dir.*does not exist"):
        data.load_mnist(tmp_path / "no-such-dir")
    # nothing given, no env var, no default directory
    monkeypatch.delenv("FNBP_MNIST_DIR", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(data.MNISTNotFoundError, match="FNBP_MNIST_DIR"):
        data.load_mnist()


def test_mnist_search_order_env_then_default(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    _write_mnist(env_dir, "t10k", *_fake(50, seed=5))
    default_dir = tmp_path / "shared" / "data" / "mnist"
    default_dir.mkdir(parents=True)
    _write_mnist(default_dir, "t10k", *_fake(100, seed=6))
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.delenv("FNBP_MNIST_DIR", raising=False)
    assert len(data.load_mnist().y_train) == 80  # ../shared/data/mnist relative to the cwd
    monkeypatch.setenv("FNBP_MNIST_DIR", str(env_dir))
    assert len(data.load_mnist().y_train) == 40  # env var beats the default
    assert len(data.load_mnist(default_dir).y_train) == 80  # explicit path beats the env var


# ------------------------------------------------------------------------------ real MNIST


@pytest.fixture(scope="module")
def real_mnist():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST test set not present at {SHARED_MNIST}")
    return data.load_mnist(SHARED_MNIST)


def test_real_mnist_counts_and_split(real_mnist):
    ds = real_mnist
    readme = (SHARED_MNIST / "README.md").read_text()
    m = re.search(r"Class counts:\s*([\d ]+)", readme)
    assert m, "README.md has no 'Class counts:' line"
    assert [int(v) for v in m.group(1).split()] == README_COUNTS
    assert len(ds.y_train) + len(ds.y_test) == 10_000
    assert ds.x_train.shape == (8000, 784) and ds.x_test.shape == (2000, 784)
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    assert counts.tolist() == README_COUNTS
    # stratified: each class's test share is within one image of 20 %
    test_counts = np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) < 1)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() == 1.0
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32


def test_real_mnist_28x28_and_default_location(real_mnist, monkeypatch):
    raw = data.read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10_000, 28, 28) and raw.dtype == np.uint8
    monkeypatch.delenv("FNBP_MNIST_DIR", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repo root
    ds = data.load_mnist(flatten=False)  # found via ../shared/data/mnist
    assert ds.x_train.shape == (8000, 28, 28)
    np.testing.assert_array_equal(ds.y_test, real_mnist.y_test)


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratification():
    ds = data.load_digits()
    assert ds.name == "digits" and ds.n_classes == 10
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    allx = np.concatenate([ds.x_train, ds.x_test])
    assert allx.min() == 0.0 and allx.max() == 1.0
    p_train = np.bincount(ds.y_train, minlength=10) / len(ds.y_train)
    p_test = np.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    assert np.max(np.abs(p_train - p_test)) < 0.02
    assert data.load_digits(dtype=np.float64).x_train.dtype == np.float64


def test_digits_standardize_uses_train_statistics_only():
    raw = data.load_digits(seed=1)
    ds = data.load_digits(seed=1, standardize=True)
    mean = raw.x_train.astype(np.float64).mean(axis=0)
    std = raw.x_train.astype(np.float64).std(axis=0)
    live = std > 1e-8
    assert (~live).any()  # digits has constant (always-zero) border pixels in train
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0)[live], 1, atol=1e-4)
    assert np.all(ds.x_train[:, ~live] == 0)
    expected_test = (raw.x_test - mean) / np.where(live, std, 1.0)
    np.testing.assert_allclose(ds.x_test, expected_test, rtol=1e-5, atol=1e-5)
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3  # test is not re-centred on its own stats


def test_digits_seed_determinism():
    a, b, c = data.load_digits(seed=7), data.load_digits(seed=7), data.load_digits(seed=8)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_test, c.x_test)


# --------------------------------------------------------------------------- stratified split


def test_stratified_split_basic_properties():
    y = np.repeat(np.arange(3), [10, 20, 31])
    tr, te = data.stratified_split(y, 0.25, 0)
    assert len(te) == round(0.25 * 61) and len(tr) + len(te) == 61
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(61))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
    tr2, te2 = data.stratified_split(y, 0.25, 0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(2, 40), min_size=1, max_size=6),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_property(counts, frac, seed):
    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    tr, te = data.stratified_split(y, frac, seed)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    for c, n_c in enumerate(counts):
        k = int(np.sum(y[te] == c))
        assert 1 <= k <= n_c - 1  # every class in both parts
        assert abs(k - frac * n_c) < 1 or k in (1, n_c - 1)  # proportional, up to the clamp


def test_stratified_split_errors():
    with pytest.raises(ValueError, match=r"classes with fewer: \[2\]"):
        data.stratified_split([0, 0, 1, 1, 2], 0.5, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        data.stratified_split([0, 0, 1, 1], 1.0, 0)
    with pytest.raises(TypeError, match="seed"):
        data.stratified_split([0, 0, 1, 1], 0.5, 1.5)
    with pytest.raises(ValueError, match="1-D"):
        data.stratified_split(np.zeros((2, 2), int), 0.5, 0)


# -------------------------------------------------------------------------------- toy sets

PY_OPS = {
    "or": lambda a, b: a or b,
    "and": lambda a, b: a and b,
    "xor": lambda a, b: a ^ b,
    "a_and_not_b": lambda a, b: a and not b,
}


@pytest.mark.parametrize("name", sorted(PY_OPS))
def test_toy_truth_tables(name):
    x, y = data.toy(name)
    assert x.shape == (4, 2) and x.dtype == np.float32
    assert y.shape == (4,) and y.dtype == np.int32
    assert x.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    for (a, b), t in zip(x, y):
        assert t == int(PY_OPS[name](bool(a), bool(b)))
    ds = data.load(name)
    assert ds.n_classes == 2 and ds.name == name
    np.testing.assert_array_equal(ds.x_train, ds.x_test)
    np.testing.assert_array_equal(ds.y_train, y)


def test_toy_known_values_and_load_dispatch(tmp_path):
    assert data.toy("xor")[1].tolist() == [0, 1, 1, 0]
    assert data.toy("a_and_not_b")[1].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="nand"):
        data.toy("nand")
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*digits"):
        data.load("cifar")
    with pytest.raises(TypeError, match="no keyword"):
        data.load("xor", seed=1)
    assert data.load("digits", seed=2).x_train.shape == (1438, 64)
    _write_mnist(tmp_path, "t10k", *_fake(50))
    assert data.load("mnist", path=tmp_path).x_test.shape == (10, 12)


def test_check_shift_bounds_a_shift_by_the_image_it_moves():
    """--augment / cnn.Config(augment=...) larger than the image blanked every image; the bound is half the side."""
    from fnbp.data import check_shift
    assert check_shift(4, (8, 8)) == 4 and check_shift(np.int64(14), (28, 28, 1)) == 14 and check_shift(0, (1, 1)) == 0
    assert check_shift(3, (28, 6)) == 3                                  # the shorter side bounds it
    for shift, shape, message in [(5, (8, 8), r"an integer in \[0, 4\] for 8x8 images .* got 5"),
                                  (1000, (28, 28, 1), r"an integer in \[0, 14\] for 28x28 images .* got 1000"),
                                  (4, (28, 6), r"an integer in \[0, 3\] for 28x6 images .* got 4"),
                                  (-1, (8, 8), r"an integer in \[0, 4\] .* got -1"),
                                  (2.0, (8, 8), r"an integer >= 0 \(pixels\), got float 2.0"),
                                  (True, (8, 8), r"an integer >= 0 \(pixels\), got the bool True")]:
        with pytest.raises(ValueError, match=r"^fnbp.cnn.Config: augment must be " + message):
            check_shift(shift, shape, "fnbp.cnn.Config: augment")
    with pytest.raises(ValueError, match=r"check_shift: image_shape must be one image's"):
        check_shift(1, (10, 8, 8, 1))
