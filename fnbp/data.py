"""Datasets for fnbp: scikit-learn digits, MNIST from IDX files, and the four-point toy sets.

Every loader returns a :class:`Dataset` of numpy arrays (float32 features in [0, 1] unless
standardised, int32 labels). Every random choice (the train/test split) is driven by an integer
``seed`` fed to ``numpy.random.default_rng``; the same seed always gives the same split.

Nothing here downloads anything: digits ship inside scikit-learn, MNIST is read from IDX files in a
directory the user names (see :func:`load_mnist`).
"""
from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .idx import IDXFormatError, read_idx, write_idx
from .text import CharCorpus, load_shakespeare

__all__ = [
    "Dataset",
    "IDXFormatError",
    "MNISTNotFoundError",
    "MNIST_FILES",
    "TOY_NAMES",
    "DATASET_NAMES",
    "stratified_split",
    "check_shift",
    "standardize_features",
    "load_digits",
    "read_idx",
    "write_idx",
    "load_mnist",
    "toy",
    "load",
    "CharCorpus",
    "load_shakespeare",
]


class Dataset(NamedTuple):
    """A classification dataset as numpy arrays.

    ``x_*`` are float features (float32 unless asked otherwise), ``y_*`` int32 class labels in
    ``[0, n_classes)``, ``name`` the dataset's name as given to :func:`load`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str


class MNISTNotFoundError(FileNotFoundError):
    """No usable MNIST directory or files; the message lists what was looked for and where."""


# ---------------------------------------------------------------------------------------------
# Splitting and standardisation
# ---------------------------------------------------------------------------------------------


def _check_fraction(fn: str, test_fraction) -> float:
    try:
        f = float(test_fraction)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: test_fraction must be a number in (0, 1), got {test_fraction!r}") from None
    if not 0.0 < f < 1.0:
        raise ValueError(f"{fn}: test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    return f


def _check_seed(fn: str, seed) -> int:
    if isinstance(seed, bool):
        raise TypeError(f"{fn}: seed must be a non-negative integer, got bool {seed!r}")
    try:
        s = operator.index(seed)
    except TypeError:
        raise TypeError(
            f"{fn}: seed must be a non-negative integer (numpy's default_rng seed), "
            f"got {type(seed).__name__} {seed!r}"
        ) from None
    if s < 0:
        raise ValueError(f"{fn}: seed must be a non-negative integer, got {s}")
    return s


def check_shift(shift, image_shape, name: str = "shift") -> int:
    """``shift`` (the largest random shift of an image, in pixels) as an int, bounded by the image it moves.

    ``image_shape`` is one image's ``(H, W)`` or ``(H, W, C)``.  A shift of s pixels moves up to s rows and
    s columns out of view, so s must be at most ``min(H, W) // 2``: at least half of every image stays
    visible (a larger shift can blank an image entirely: a 28x28 MNIST digit shifted by 28 is all zeros).
    ``name`` names the option in the error (e.g. ``"--augment"`` or ``"fnbp.cnn.Config: augment"``).
    Raises ValueError naming it for a shift that is not an integer >= 0 (``operator.index``: numpy and
    JAX integer scalars are integers, floats and bools are not) or that exceeds the bound.
    """
    if isinstance(shift, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= 0 (pixels), got the bool {shift!r}")
    try:
        s = operator.index(shift)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 0 (pixels), got {type(shift).__name__} {shift!r}") from None
    shape = tuple(int(n) for n in image_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"check_shift: image_shape must be one image's (H, W) or (H, W, C), got {shape}")
    limit = min(shape[:2]) // 2
    if not 0 <= s <= limit:
        raise ValueError(f"{name} must be an integer in [0, {limit}] for {shape[0]}x{shape[1]} images (at most half "
                         f"the image side, so that every shifted image keeps at least half of its pixels), got {s}")
    return s


def stratified_split(y, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of sample indices into (train_idx, test_idx).

    Procedure (deterministic for a given ``y``, ``test_fraction``, ``seed``):

    1. ``rng = numpy.random.default_rng(seed)``.
    2. The total test size is ``round(test_fraction * n)``. It is shared among the classes by the
       largest-remainder method: class ``c`` with ``n_c`` samples gets ``floor(test_fraction * n_c)``
       test samples, and the remaining slots go one each to the classes with the largest fractional
       parts (ties broken by smaller class label). Each class's count is then clamped to
       ``[1, n_c - 1]`` so that every class appears in both parts (this clamp is the only way the
       total can differ from ``round(test_fraction * n)``).
    3. For each class in ascending label order, ``rng.permutation`` of that class's indices is
       taken; its first ``k_c`` go to test, the rest to train.
    4. Both index arrays are returned sorted ascending (int64), so the split decides membership only;
       minibatch shuffling is the training loop's job.

    Raises ``ValueError`` if ``y`` is not a 1-D integer array, if a class has fewer than 2 samples,
    or if ``test_fraction`` is not in (0, 1); ``TypeError`` if ``seed`` is not an integer.
    """
    fn = "fnbp.data.stratified_split"
    f = _check_fraction(fn, test_fraction)
    s = _check_seed(fn, seed)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{fn}: y must be a 1-D array of labels, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{fn}: y must hold integer labels, got dtype {y.dtype}")
    n = y.shape[0]
    classes, counts = np.unique(y, return_counts=True)
    if n == 0:
        raise ValueError(f"{fn}: y is empty")
    small = classes[counts < 2]
    if small.size:
        raise ValueError(
            f"{fn}: every class needs at least 2 samples to appear in both train and test; "
            f"classes with fewer: {small.tolist()} (counts {counts[counts < 2].tolist()})"
        )
    quota = f * counts
    k = np.floor(quota).astype(np.int64)
    remaining = int(round(f * n)) - int(k.sum())
    if remaining > 0:
        frac = quota - k
        order = np.lexsort((classes, -frac))  # largest fraction first, then smaller label
        k[order[:remaining]] += 1
    k = np.clip(k, 1, counts - 1)

    rng = np.random.default_rng(s)
    train_parts, test_parts = [], []
    for c, kc in zip(classes, k):
        idx = np.flatnonzero(y == c)
        perm = idx[rng.permutation(idx.size)]
        test_parts.append(perm[:kc])
        train_parts.append(perm[kc:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


def standardize_features(x_train, x_test, *, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Standardise features with the training split's statistics only.

    Computes per-feature (axis 0) ``mean`` and ``std`` of ``x_train`` in float64; features whose
    train std is below ``eps`` (constant features) get std 1, so they become exactly 0 on train and
    ``x_test - mean`` on test. Returns ``((x_train - mean) / std, (x_test - mean) / std)`` cast back
    to ``x_train``'s dtype. The test split is not re-centred: its mean is generally not 0.
    """
    x_train = np.asarray(x_train)
    x_test = np.asarray(x_test)
    mean = x_train.astype(np.float64).mean(axis=0)
    std = x_train.astype(np.float64).std(axis=0)
    std = np.where(std < eps, 1.0, std)
    dt = x_train.dtype
    return (
        ((x_train - mean) / std).astype(dt),
        ((x_test - mean) / std).astype(dt),
    )


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


def load_digits(*, seed: int = 0, test_fraction: float = 0.2, standardize: bool = False,
                dtype=np.float32) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download).

    Features are the 64 pixel values (0..16) divided by 16, so they lie in [0, 1], cast to
    ``dtype`` (float32 by default); labels are int32. The split is
    ``stratified_split(y, test_fraction, seed)`` (359 test / 1438 train at the default 0.2). With
    ``standardize=True`` the features are standardised by :func:`standardize_features` using the
    training split's per-feature mean and std only (constant features get std 1).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"fnbp.data.load_digits: dtype must be a floating dtype, got {dtype}")
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(dtype)
    y = np.asarray(bunch.target).astype(np.int32)
    tr, te = stratified_split(y, test_fraction, seed)
    x_tr, x_te = x[tr], x[te]
    if standardize:
        x_tr, x_te = standardize_features(x_tr, x_te)
    return Dataset(x_tr, y[tr], x_te, y[te], 10, "digits")


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Standard MNIST file names; each may also be present with a ``.gz`` suffix."""

_MNIST_ENV = "FNBP_MNIST_DIR"
_MNIST_DEFAULT = Path("..") / "shared" / "data" / "mnist"


def _mnist_dir(path) -> Path:
    fn = "fnbp.data.load_mnist"
    if path is not None:
        d, source = Path(path), "the path argument"
    elif os.environ.get(_MNIST_ENV):
        d, source = Path(os.environ[_MNIST_ENV]), f"environment variable {_MNIST_ENV}"
    else:
        d = Path.cwd() / _MNIST_DEFAULT
        if not d.is_dir():
            raise MNISTNotFoundError(
                f"{fn}: no MNIST directory given: pass path=..., or set the environment variable "
                f"{_MNIST_ENV}, or provide the default directory {_MNIST_DEFAULT} relative to the "
                f"current working directory (looked for {d.resolve()}, which does not exist)"
            )
        return d
    if not d.is_dir():
        raise MNISTNotFoundError(
            f"{fn}: MNIST directory {d} (from {source}) does not exist or is not a directory; "
            f"it should hold the IDX files {sorted(MNIST_FILES.values())} (each optionally .gz)"
        )
    return d


def _find(d: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        p = d / name
        if p.is_file():
            return p
    return None


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    fn = "fnbp.data.load_mnist"
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise IDXFormatError(
            f"{fn}: {images_path}: expected a 3-D image array (count, rows, cols), found ndim="
            f"{images.ndim} with shape {images.shape}"
        )
    if images.dtype != np.uint8:
        raise IDXFormatError(f"{fn}: {images_path}: expected uint8 pixels (type code 0x08), found {images.dtype}")
    if labels.ndim != 1:
        raise IDXFormatError(
            f"{fn}: {labels_path}: expected a 1-D label array (count,), found ndim={labels.ndim} "
            f"with shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise IDXFormatError(f"{fn}: {labels_path}: expected integer labels, found {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{fn}: image/label count mismatch: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size:
        bad = (labels < 0) | (labels > 9)
        if bad.any():
            raise IDXFormatError(
                f"{fn}: {labels_path}: labels must be digits 0-9, found {int(bad.sum())} out of range "
                f"(min {int(labels.min())}, max {int(labels.max())}, first bad at index {int(np.argmax(bad))})"
            )
    return images, labels.astype(np.int32)


def load_mnist(path=None, *, seed: int = 0, test_fraction: float = 0.2, standardize: bool = False,
               flatten: bool = True) -> Dataset:
    """MNIST from the standard IDX files in a local directory (nothing is downloaded).

    Directory search order: (1) ``path`` if given; (2) the environment variable ``FNBP_MNIST_DIR``
    if set and non-empty; (3) ``../shared/data/mnist`` relative to the current working directory,
    if it exists. A given directory that does not exist is an error (no fallthrough).

    In that directory each file is looked up as ``<name>`` then ``<name>.gz`` (the raw file wins if
    both exist):

    * Four-file layout (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
      ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``): the official split, train = the
      ``train-*`` files (60,000), test = the ``t10k-*`` files (10,000). ``seed`` and
      ``test_fraction`` are not used.
    * Only the two ``t10k-*`` files: the 10,000 test images are split by
      ``stratified_split(labels, test_fraction, seed)`` into train and test (8000 / 2000 at the
      default ``test_fraction=0.2``, class proportions preserved).
    * Exactly one of the two ``train-*`` files, or missing ``t10k-*`` files: ``MNISTNotFoundError``
      listing the files looked for, the directory, and ``FNBP_MNIST_DIR``.

    Pixels are uint8 0..255 divided by 255 (float32 in [0, 1]); ``flatten=True`` gives
    ``x`` of shape ``(n, rows*cols)`` (784), else ``(n, rows, cols)``. ``standardize=True`` applies
    :func:`standardize_features` with per-pixel statistics of the training split only. Labels are
    int32 in 0..9, ``n_classes=10``, ``name='mnist'``.

    Corrupt files raise :class:`IDXFormatError` naming the file (bad magic, truncation, wrong ndim,
    non-uint8 pixels, labels outside 0-9, image/label count mismatch naming both files, train/test
    image sizes that differ).
    """
    fn = "fnbp.data.load_mnist"
    if not isinstance(flatten, bool):
        raise TypeError(f"{fn}: flatten must be a bool, got {flatten!r}")
    f = _check_fraction(fn, test_fraction)
    s = _check_seed(fn, seed)
    d = _mnist_dir(path)
    found = {k: _find(d, base) for k, base in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
    have_test = found["test_images"] is not None and found["test_labels"] is not None
    n_train_files = (found["train_images"] is not None) + (found["train_labels"] is not None)
    if not have_test or n_train_files == 1:
        looked = ", ".join(f"{b}[.gz]" for b in MNIST_FILES.values())
        raise MNISTNotFoundError(
            f"{fn}: incomplete MNIST files in {d.resolve()}: missing {', '.join(m + '[.gz]' for m in missing)}. "
            f"Looked for {looked}; needed either all four (official 60k/10k split) or the two t10k "
            f"files (seeded stratified split). Point path=... or the environment variable "
            f"{_MNIST_ENV} at a directory holding them."
        )
    x_te, y_te = _read_pair(found["test_images"], found["test_labels"])
    if n_train_files == 2:
        x_tr, y_tr = _read_pair(found["train_images"], found["train_labels"])
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise IDXFormatError(
                f"{fn}: image size differs between {found['train_images']} ({x_tr.shape[1]}x"
                f"{x_tr.shape[2]}) and {found['test_images']} ({x_te.shape[1]}x{x_te.shape[2]})"
            )
    else:
        tr, te = stratified_split(y_te, f, s)
        x_tr, y_tr, x_te, y_te = x_te[tr], y_te[tr], x_te[te], y_te[te]

    def prep(x):
        x = x.astype(np.float32) / np.float32(255.0)
        return x.reshape(x.shape[0], -1) if flatten else x

    x_tr, x_te = prep(x_tr), prep(x_te)
    if standardize:
        x_tr, x_te = standardize_features(x_tr, x_te)
    return Dataset(x_tr, y_tr, x_te, y_te, 10, "mnist")


# ---------------------------------------------------------------------------------------------
# Toy sets
# ---------------------------------------------------------------------------------------------

_TOY_RULES = {
    "or": lambda a, b: a or b,
    "and": lambda a, b: a and b,
    "xor": lambda a, b: a != b,
    "a_and_not_b": lambda a, b: a and not b,
}
TOY_NAMES = tuple(_TOY_RULES)
DATASET_NAMES = ("digits", "mnist") + TOY_NAMES


def toy(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A two-input boolean truth table: ``name`` in 'or', 'and', 'xor', 'a_and_not_b'.

    Returns ``(x, y)``: ``x`` float32 of shape (4, 2) with rows in binary order 00, 01, 10, 11
    (column 0 is input a, column 1 is input b), ``y`` int32 of shape (4,) with the function's value
    (0 or 1) on each row.
    """
    if name not in _TOY_RULES:
        raise ValueError(f"fnbp.data.toy: unknown toy set {name!r}; expected one of {list(TOY_NAMES)}")
    rows = [(a, b) for a in (0, 1) for b in (0, 1)]
    x = np.array(rows, dtype=np.float32)
    y = np.array([int(bool(_TOY_RULES[name](bool(a), bool(b)))) for a, b in rows], dtype=np.int32)
    return x, y


def load(name: str, **kw) -> Dataset:
    """Load a dataset by name.

    'digits' -> ``load_digits(**kw)``; 'mnist' -> ``load_mnist(**kw)``; 'or' | 'and' | 'xor' |
    'a_and_not_b' -> the toy truth table as a Dataset whose train and test parts are both the same
    4 points (copies), ``n_classes=2``; toy sets take no keyword arguments (``TypeError`` otherwise).
    Unknown names raise ``ValueError`` listing the valid ones.
    """
    if name == "digits":
        return load_digits(**kw)
    if name == "mnist":
        return load_mnist(**kw)
    if name in _TOY_RULES:
        if kw:
            raise TypeError(f"fnbp.data.load: toy set {name!r} takes no keyword arguments, got {sorted(kw)}")
        x, y = toy(name)
        return Dataset(x, y, x.copy(), y.copy(), 2, name)
    raise ValueError(f"fnbp.data.load: unknown dataset {name!r}; expected one of {list(DATASET_NAMES)}")
