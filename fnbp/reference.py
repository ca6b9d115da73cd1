"""Plain-``jnp`` references for every rule: the same forward, no custom rule.

These are what the tests and ``fnbp.check`` differentiate with JAX's own
autodiff (``jax.vjp``) to cross-check the hand-written backward rules.  They are
deliberately the most literal transcription of the forward equations.
"""
import jax
import jax.numpy as jnp


def dense(W, b, h):
    return h @ W.T + b


def identity(a):
    return a


def sigmoid(a):
    return jax.nn.sigmoid(a)


def tanh(a):
    return jnp.tanh(a)


def relu(a):
    return jnp.where(a > 0, a, 0.0)


def leaky_relu(a, slope=0.01):
    return jnp.where(a > 0, a, slope * a)


def prelu(a, alpha):
    return jnp.where(a > 0, a, alpha * a)


def step(a):
    # autodiff of a comparison gives zero, like the notes' g' = 0
    return jnp.where(a > 0, 1.0, 0.0).astype(a.dtype)


def sign(a):
    return jnp.sign(a)


def softmax(a):
    return jax.nn.softmax(a, axis=-1)


def _reduce(per_example, reduction):
    return jnp.mean(per_example) if reduction == "mean" else jnp.sum(per_example)


def half_sse(y, d, *, reduction="mean"):
    return _reduce(0.5 * jnp.sum((y - d) ** 2, axis=-1), reduction)


def sse(y, d, *, reduction="mean"):
    return _reduce(jnp.sum((y - d) ** 2, axis=-1), reduction)


def mse(y, d, *, reduction="mean"):
    return _reduce(jnp.mean((y - d) ** 2, axis=-1), reduction)


def mae(y, d, *, reduction="mean"):
    return _reduce(jnp.mean(jnp.abs(y - d), axis=-1), reduction)


def cross_entropy(p, d, *, reduction="mean"):
    return _reduce(-jnp.sum(d * jnp.log(p), axis=-1), reduction)


def softmax_cross_entropy(logits, labels, *, reduction="mean"):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return _reduce(-jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0], reduction)


def l2_penalty(params, lam):
    weights = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(p[-1], jax.tree_util.DictKey) and p[-1].key == "W"]
    return lam * 0.5 * sum(jnp.sum(W ** 2) for W in weights)


def batch_norm(x, gamma, beta, *, eps=1e-5):
    mu = jnp.mean(x, axis=0)
    var = jnp.var(x, axis=0)
    return gamma * (x - mu) / jnp.sqrt(var + eps) + beta


def dropout(x, p, key):
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0.0)


# --- convolutional layers (lax's own ops, differentiated by JAX) ----------------
def _lax_padding(padding):
    return padding.upper() if isinstance(padding, str) else ((padding, padding), (padding, padding))


def conv2d(W, b, h, *, stride=1, padding="SAME"):
    """lax.conv_general_dilated with x NHWC, W (C_out, C_in, kh, kw) (OIHW), plus the bias."""
    from jax import lax
    a = lax.conv_general_dilated(h, W, (stride, stride), _lax_padding(padding),
                                 dimension_numbers=("NHWC", "OIHW", "NHWC"))
    return a + b


def max_pool(x, window=2, stride=None):
    """lax.reduce_window max over (window x window), no padding; autodiff gives select_and_scatter."""
    from jax import lax
    s = window if stride is None else stride
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, s, s, 1), "VALID")


def avg_pool(x, window=2, stride=None):
    from jax import lax
    s = window if stride is None else stride
    return lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, s, s, 1), "VALID") / (window * window)


def flatten(x):
    return x.reshape(x.shape[0], -1)


def global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))


def batch_norm_channels(x, gamma, beta, *, eps=1e-5):
    mu = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return gamma * (x - mu) / jnp.sqrt(var + eps) + beta
