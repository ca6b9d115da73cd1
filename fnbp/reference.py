"""Plain-``jnp`` references for every rule: the same forward, no custom rule.

These are what the tests and ``fnbp.check`` differentiate with JAX's own
autodiff (``jax.vjp``) to cross-check the hand-written backward rules.  They are
deliberately the most literal transcription of the forward equations.

Because they carry no ``jax.custom_vjp``, they are also fnbp's *forward-mode
twin*: ``jax.jvp``, ``jax.jacfwd`` and forward-over-reverse work on them (the
hand-written rules support reverse mode only).  Shapes and symbols follow the
rules they mirror: W (n_out, n_in), h (batch, n_in), a (batch, n), y and d
(batch, n) or (n,).
"""
import jax
import jax.numpy as jnp

__all__ = ["dense", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax",
           "half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy", "l2_penalty",
           "batch_norm", "dropout", "conv2d", "max_pool", "avg_pool", "flatten", "global_avg_pool",
           "batch_norm_channels", "lenet_logits", "add", "mul", "log", "batch_norm_eval", "dropout_per_example",
           "dense_fa", "dense_fa_feedback", "hardtanh", "hard_sigmoid"]


def dense(W, b, h):
    """a = W h + b on a batch: ``h @ W.T + b``; W (n_out, n_in), b (n_out,), h (batch, n_in) -> (batch, n_out).

    Reference for :func:`fnbp.dense`.
    """
    return h @ W.T + b


def identity(a):
    """g(a) = a.  Reference for :func:`fnbp.identity`."""
    return a


def sigmoid(a):
    """g(a) = 1 / (1 + e^-a) (``jax.nn.sigmoid``).  Reference for :func:`fnbp.sigmoid`."""
    return jax.nn.sigmoid(a)


def tanh(a):
    """g(a) = tanh(a).  Reference for :func:`fnbp.tanh`."""
    return jnp.tanh(a)


def relu(a):
    """g(a) = max(a, 0), written as ``where(a > 0, a, 0 a)`` so autodiff gives g'(0) = 0 like the rule
    and NaN stays NaN (0 NaN = NaN), as in ``jax.nn.relu``.

    Reference for :func:`fnbp.relu`.
    """
    return jnp.where(a > 0, a, 0.0 * a)


def leaky_relu(a, slope=0.01):
    """g(a) = a for a > 0, ``slope`` * a otherwise.  Reference for :func:`fnbp.leaky_relu`."""
    return jnp.where(a > 0, a, slope * a)


def prelu(a, alpha):
    """g(a) = a for a > 0, alpha * a otherwise, alpha a learned parameter (broadcast against a).

    Reference for :func:`fnbp.prelu`.
    """
    return jnp.where(a > 0, a, alpha * a)


def step(a):
    """Heaviside step g(a) = [a > 0] in a's dtype; autodiff of the comparison gives the notes' g' = 0.

    Reference for :func:`fnbp.step`.
    """
    return jnp.where(jnp.isnan(a), a, jnp.where(a > 0, 1.0, 0.0).astype(a.dtype))   # NaN stays NaN


def sign(a):
    """g(a) = sign(a) (g' = 0 almost everywhere).  Reference for :func:`fnbp.sign`."""
    return jnp.sign(a)


def softmax(a):
    """g(a)_i = e^{a_i} / sum_j e^{a_j} over the last axis.  Reference for :func:`fnbp.softmax`."""
    return jax.nn.softmax(a, axis=-1)


def _reduce(per_example, reduction):
    return jnp.mean(per_example) if reduction == "mean" else jnp.sum(per_example)


def half_sse(y, d, *, reduction="mean"):
    """E_n = 1/2 sum_i (y_i - d_i)^2 per example, then mean (or sum) over the batch.

    Reference for :func:`fnbp.losses.half_sse`.
    """
    return _reduce(0.5 * jnp.sum((y - d) ** 2, axis=-1), reduction)


def sse(y, d, *, reduction="mean"):
    """E_n = sum_i (y_i - d_i)^2 per example, then mean (or sum) over the batch.

    Reference for :func:`fnbp.losses.sse`.
    """
    return _reduce(jnp.sum((y - d) ** 2, axis=-1), reduction)


def mse(y, d, *, reduction="mean"):
    """E_n = 1/n sum_i (y_i - d_i)^2 (mean over the n outputs), then mean (or sum) over the batch.

    Reference for :func:`fnbp.losses.mse`.
    """
    return _reduce(jnp.mean((y - d) ** 2, axis=-1), reduction)


def mae(y, d, *, reduction="mean"):
    """E_n = 1/n sum_i |y_i - d_i| (mean over the n outputs), then mean (or sum) over the batch.

    Reference for :func:`fnbp.losses.mae`.
    """
    return _reduce(jnp.mean(jnp.abs(y - d), axis=-1), reduction)


def cross_entropy(p, d, *, reduction="mean"):
    """E_n = -sum_i d_i log p_i on probabilities p (after a softmax layer), then mean (or sum).

    Reference for :func:`fnbp.losses.cross_entropy`.
    """
    return _reduce(-jnp.sum(d * jnp.log(p), axis=-1), reduction)


def softmax_cross_entropy(logits, labels, *, reduction="mean"):
    """E_n = -log softmax(y)_{label_n} on logits y (batch, n) and integer labels (batch,).

    Reference for :func:`fnbp.losses.softmax_cross_entropy`.
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return _reduce(-jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0], reduction)


def l2_penalty(params, lam):
    """lambda Omega with Omega = 1/2 sum_k ||W_k||^2 over the leaves named ``"W"`` only (biases excluded).

    Reference for :func:`fnbp.losses.l2_penalty`.
    """
    weights = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(p[-1], jax.tree_util.DictKey) and p[-1].key == "W"]
    return lam * 0.5 * sum(jnp.sum(W ** 2) for W in weights)


def batch_norm(x, gamma, beta, *, eps=1e-5):
    """Training-mode batch norm over axis 0 of x (B, n): gamma (x - mu) / sqrt(sigma^2 + eps) + beta.

    mu and sigma^2 are the batch mean and *biased* variance (``jnp.var``).  Reference for
    :func:`fnbp.batch_norm`.
    """
    mu = jnp.mean(x, axis=0)
    var = jnp.var(x, axis=0)
    return gamma * (x - mu) / jnp.sqrt(var + eps) + beta


def dropout(x, p, key):
    """Inverted dropout: keep each unit with probability 1 - p (mask from ``key``), scale survivors by 1/(1 - p).

    Same key, same mask as :func:`fnbp.dropout`.
    """
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0.0)


def dropout_per_example(h, p, keys):
    """Row n of h (B, n_units) through :func:`dropout` with keys[n].  Reference for
    ``fnbp.regularization.dropout_per_example``."""
    return jax.vmap(lambda h_n, key_n: dropout(h_n, p, key_n))(h, keys)


# --- the walker's elementary ops (fnbp.ops) ----------------------------------------
def add(u, v):
    """u + v with broadcasting.  Reference for :func:`fnbp.ops.add`."""
    return u + v


def mul(u, v):
    """u * v with broadcasting.  Reference for :func:`fnbp.ops.mul`."""
    return u * v


def log(v):
    """log v.  Reference for :func:`fnbp.ops.log`."""
    return jnp.log(v)


def batch_norm_eval(x, gamma, beta, mean, var, *, eps=1e-5):
    """gamma (x - mean) / sqrt(var + eps) + beta with given statistics.  Reference for
    :func:`fnbp.ops.batch_norm_eval`."""
    return gamma * (x - mean) / jnp.sqrt(var + eps) + beta


# --- rules whose backward is not their forward's derivative (fnbp.feedback) --------
def dense_fa(W, b, h, B):
    """W h + b; B unused.  Reference for the W and b cotangents of :func:`fnbp.feedback.dense_fa`
    (the true ones)."""
    return dense(W, b, h)


def dense_fa_feedback(W, b, h, B):
    """B h + b: the surrogate forward whose derivative with respect to h, B^T delta, is
    :func:`fnbp.feedback.dense_fa`'s grad_h."""
    return dense(B, b, h)


def hardtanh(a):
    """clip(a, -1, 1): the surrogate of :func:`fnbp.feedback.sign_ste` (window 1)."""
    return jnp.clip(a, -1.0, 1.0)


def hard_sigmoid(a):
    """clip(a + 1/2, 0, 1): the surrogate of :func:`fnbp.feedback.step_ste` (window 1/2)."""
    return jnp.clip(a + 0.5, 0.0, 1.0)


# --- convolutional layers (lax's own ops, differentiated by JAX) ----------------
def conv2d(W, b, h, *, stride=1, padding="SAME"):
    """a = W * h + b: ``lax.conv_general_dilated`` with h NHWC, W (C_out, C_in, kh, kw) (OIHW), plus the bias.

    Reference for :func:`fnbp.conv.conv2d` (same padding semantics: "SAME", "VALID" or an int).

    An int padding p is applied as ``jnp.pad`` (p zeros on each side of H and W) followed by a
    "VALID" convolution -- the same function as ``conv_general_dilated(..., ((p, p), (p, p)))``,
    written this way because XLA:CPU (jaxlib 0.10.2) aborts the whole process (``Check failed`` in
    its algebraic simplifier) when it compiles JAX's gradient with respect to h of a *strided*
    convolution with explicit padding for some shapes, e.g. h (1, 4, 4, 1), W (1, 1, 2, 4),
    stride 2, padding 1.  "SAME" and "VALID" go to lax unchanged.
    """
    from jax import lax
    if isinstance(padding, str):
        lax_padding = padding.upper()
    else:
        h = jnp.pad(h, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        lax_padding = "VALID"
    a = lax.conv_general_dilated(h, W, (stride, stride), lax_padding, dimension_numbers=("NHWC", "OIHW", "NHWC"))
    return a + b


def max_pool(x, window=2, stride=None):
    """Max over each (window x window) window, step ``stride`` (default window), no padding:
    ``lax.reduce_window``; JAX differentiates it with select_and_scatter.  Reference for :func:`fnbp.pool.max_pool`.
    """
    from jax import lax
    s = window if stride is None else stride
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, s, s, 1), "VALID")


def avg_pool(x, window=2, stride=None):
    """Mean over each (window x window) window (``lax.reduce_window`` sum / window^2).  Reference for
    :func:`fnbp.pool.avg_pool`."""
    from jax import lax
    s = window if stride is None else stride
    return lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, s, s, 1), "VALID") / (window * window)


def flatten(x):
    """(B, H, W, C) -> (B, H W C).  Reference for :func:`fnbp.pool.flatten`."""
    return x.reshape(x.shape[0], -1)


def global_avg_pool(x):
    """Mean over the spatial axes: (B, H, W, C) -> (B, C).  Reference for :func:`fnbp.pool.global_avg_pool`."""
    return jnp.mean(x, axis=(1, 2))


def batch_norm_channels(x, gamma, beta, *, eps=1e-5):
    """Batch norm per channel over (B, H, W).  Reference for :func:`fnbp.pool.batch_norm_channels`."""
    mu = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return gamma * (x - mu) / jnp.sqrt(var + eps) + beta


def lenet_logits(params, x, *, arch):
    """A LeNet's logits (B, n_classes) from JAX's own ops, no batch norm or dropout: per block
    ``max_pool(relu(conv2d(W, b, h)))`` (``lax.conv_general_dilated``, ``lax.reduce_window``), then
    ``flatten`` and dense layers ``h W^T + b`` with ReLU between them.  Reference for
    :func:`fnbp.cnn.apply` (params from ``fnbp.cnn.init(key, arch)``, x (B, H, W, C_in))."""
    h = x
    for layer in params["conv"]:
        h = max_pool(relu(conv2d(layer["W"], layer["b"], h, padding=arch.padding)), window=arch.pool)
    h = flatten(h)
    for k, layer in enumerate(params["dense"]):
        h = dense(layer["W"], layer["b"], h)
        h = relu(h) if k < len(params["dense"]) - 1 else h
    return h
