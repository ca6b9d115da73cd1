"""Host-side checks that ``fnbp.train.train`` runs once, before anything is compiled, and its errors.

Hyperparameter types (no silent truncation of ``2.5`` or ``True``), every split's labels
(integer class indices in ``[0, n_classes)``), and finiteness of the data, initial parameters
and optimizer state.  Nothing here runs inside jit.
"""
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NonFiniteError", "NonFiniteLossError", "NonFiniteParamsError", "NonFiniteInputError", "check_labels"]


class NonFiniteError(FloatingPointError):
    """Training stopped: a loss, parameter or optimizer-state value became NaN or inf."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or inf."""


class NonFiniteParamsError(NonFiniteError):
    """The parameters, optimizer state or batch-norm statistics became NaN or inf during a step
    (a non-finite gradient or update), although the loss of that step was finite."""


class NonFiniteInputError(ValueError):
    """The data, the initial parameters or the optimizer state given to ``train`` hold NaN or inf."""


_FN = "fnbp.train"


def _check_int(name, value, minimum, *, allow_none=False):
    """``value`` as an int >= minimum; bool, float and str are refused (TypeError) rather than truncated."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{_FN}: {name} must be an integer{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{_FN}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_labels(split, labels, n_classes, *, name=_FN):
    """Validate one split's targets on the host (outside jit).

    1-D ``labels`` are class indices: an integer dtype with every value in ``[0, n_classes)``;
    anything else raises (TypeError for the dtype, ValueError for the range) naming the split, the
    count, min, max and the first bad index.  2-D targets (one-hot or regression, for the
    squared-error losses) must be finite.
    """
    d = np.asarray(labels)
    if d.ndim == 1:
        if not np.issubdtype(d.dtype, np.integer):
            raise TypeError(f"{name}: {split} labels must be integer class indices in [0, {n_classes}), got dtype "
                            f"{d.dtype}")
        bad = (d < 0) | (d >= n_classes)
        if bad.any():
            raise ValueError(f"{name}: {split} labels must be in [0, {n_classes}): {int(bad.sum())} of {d.size} are "
                             f"not (min {int(d.min())}, max {int(d.max())}, first bad at index {int(np.argmax(bad))})")
    else:
        _check_finite_array(f"{split} targets", d, name=name)


def _check_finite_array(what, a, *, name=_FN):
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.inexact):
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), a.shape)
            raise NonFiniteInputError(f"{name}: {what} holds {int(bad.sum())} NaN/inf value(s) (first at index "
                                      f"{tuple(int(i) for i in first)}); training would not be meaningful")


def _check_finite_tree(what, tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue
        _check_finite_array(what + jax.tree_util.keystr(path), leaf)


def _check_data(data, n_out):
    """Shapes, label ranges and finiteness of every split, once, on the host (n_out: the model's outputs)."""
    for field in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(data, field):
            raise TypeError(f"{_FN}: data must be a fnbp.data.Dataset (x_train, y_train, x_test, y_test, n_classes), "
                            f"got {type(data).__name__} without {field!r}")
    n_classes = getattr(data, "n_classes", None)
    if n_classes is None:
        n_classes = n_out
    elif isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise TypeError(f"{_FN}: data.n_classes must be a positive integer, got {n_classes!r}")
    for split in ("train", "test"):
        x, d = np.asarray(getattr(data, "x_" + split)), np.asarray(getattr(data, "y_" + split))
        if x.shape[:1] != d.shape[:1] or x.shape[0] == 0:
            raise ValueError(f"{_FN}: the {split} split needs as many labels as examples (at least one), got "
                             f"x_{split} of shape {x.shape} and y_{split} of shape {d.shape}")
        _check_finite_array(f"data.x_{split}", x)
        check_labels(split, d, n_classes)
        if d.ndim == 1 and n_out is not None and int(d.max()) >= n_out:
            raise ValueError(f"{_FN}: {split} label {int(d.max())} needs at least {int(d.max()) + 1} outputs, but the "
                             f"network's last layer has {n_out}")


def _check_hyperparameters(opt, key, epochs, batch_size, accumulate, start_epoch, start_step, on_epoch):
    if not (hasattr(opt, "init") and hasattr(opt, "update")):
        raise TypeError(f"{_FN}: opt must be a GradientTransformation (init, update), got {type(opt).__name__}")
    if key is None or not hasattr(key, "dtype"):
        raise TypeError(f"{_FN}: key must be a jax.random key (jax.random.PRNGKey or jax.random.key), got {key!r:.60}")
    epochs = _check_int("epochs", epochs, 1)
    start_epoch = _check_int("start_epoch", start_epoch, 0)
    if epochs <= start_epoch:
        raise ValueError(f"{_FN}: epochs is the total number of epochs and must exceed start_epoch={start_epoch}, "
                         f"got epochs={epochs}")
    return (epochs, _check_int("batch_size", batch_size, 1, allow_none=True), _check_int("accumulate", accumulate, 1),
            start_epoch, _check_int("start_step", start_step, 0))
