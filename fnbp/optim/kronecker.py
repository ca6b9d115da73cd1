r"""K-FAC (Martens & Grosse 2015) as an optax ``GradientTransformationExtraArgs``, on ``fnbp.curvature``'s factors.

Each step takes the gradient g and this step's Kronecker factors (``fnbp.curvature.kfac`` for sampled columns,
``fnbp.curvature.kflr`` for exact ones: params' structure with ``KronFactors(G, A)`` at each W and b)::

    Ā ← ρ Ā + (1 − ρ) A,   Ḡ ← ρ Ḡ + (1 − ρ) G       (exponential moving averages; Ā = A, Ḡ = G at k = 0)
    every ``inverse_every`` steps (k = 0 included):  Ā⁻ = (Ā + √λ I)⁻¹,  Ḡ⁻ = (Ḡ + √λ I)⁻¹
    Δθ_W = −η · Ḡ⁻ mat(g_W) Ā⁻                         (λ the damping, split evenly between the factors)

mat(g_W) is W's gradient as the (C_out, K) matrix whose columns are ordered as the factors' rows: W itself for
a dense layer; (C_out, kh, kw, C_in) flattened for a conv2d W of shape (C_out, C_in, kh, kw) (fnbp.conv's im2col
order).  A leaf without factors this step (the factors tree holds an array there) keeps its previous averages
(identities until it has some).

Usage::

    opt = fnbp.optim.kfac(0.1, damping=1e-2)
    state = opt.init(params)
    factors = fnbp.curvature.kfac(params, x, d, key=key, model=model, loss=loss)
    updates, state = opt.update(grads, state, params, factors=factors)
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["KFACState", "Kron", "kfac"]


class KFACState(NamedTuple):
    count: Any           # step count k (int32)
    factors: Any         # the moving averages (Ā, Ḡ), factors' structure
    inverses: Any        # (Ā + √λ I)⁻¹, (Ḡ + √λ I)⁻¹, factors' structure


def _is_kron(x):
    return hasattr(x, "G") and hasattr(x, "A")


def _as_mat(g):
    if g.ndim == 4:                                        # conv2d: (C_out, C_in, kh, kw) -> (C_out, kh kw C_in)
        return jnp.moveaxis(g, 1, -1).reshape(g.shape[0], -1)
    return g.reshape(g.shape[0], -1) if g.ndim > 1 else g[:, None]


def _from_mat(m, shape):
    if len(shape) == 4:
        C_out, C_in, kh, kw = shape
        return jnp.moveaxis(m.reshape(C_out, kh, kw, C_in), -1, 1)
    return m.reshape(shape)


def _check(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fnbp.optim.kfac: {name} must be a number, got {value!r}")
    if not (value >= low and (high is None or value < high)):
        raise ValueError(f"fnbp.optim.kfac: {name} must be in [{low}, {high if high is not None else 'inf'}), "
                         f"got {value!r}")


class Kron(NamedTuple):
    """A leaf's factor pair in the state (G: (C_out, C_out), A: (K, K)); identities at init."""
    G: Any
    A: Any


def _is_pair(x):
    return isinstance(x, Kron)


def _identities(p):
    C_out = p.shape[0] if p.ndim else 1
    K = int(p.size // C_out) if p.ndim > 1 else 1
    return Kron(jnp.eye(C_out, dtype=p.dtype), jnp.eye(K, dtype=p.dtype))


def kfac(learning_rate, *, damping=1e-3, decay=0.95, inverse_every=10):
    """K-FAC's preconditioned step (module docstring): ``update(grads, state, params=None, *, factors)``."""
    _check("learning_rate", learning_rate, 0.0)
    _check("damping", damping, 0.0)
    if damping <= 0:
        raise ValueError(f"fnbp.optim.kfac: damping must be > 0, got {damping!r}")
    _check("decay", decay, 0.0, 1.0)
    if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or inverse_every < 1:
        raise ValueError(f"fnbp.optim.kfac: inverse_every must be a positive int, got {inverse_every!r}")
    root = damping ** 0.5

    def inverse(M):
        return jnp.linalg.inv(M + root * jnp.eye(M.shape[0], dtype=M.dtype))

    def init(params):
        pairs = jax.tree_util.tree_map(_identities, params)
        return KFACState(jnp.zeros((), jnp.int32), pairs, pairs)

    def update(grads, state, params=None, *, factors=None, **extra):
        if factors is None:
            raise ValueError("fnbp.optim.kfac: update needs factors= (fnbp.curvature.kfac or kflr of this batch)")
        k = state.count
        first = k == 0                                     # the averages start at the first batch's factors

        def average(old, new):
            if not _is_kron(new):                          # no factors for this leaf: keep the old pair
                return old
            if jnp.shape(new.G) != jnp.shape(old.G) or jnp.shape(new.A) != jnp.shape(old.A):
                raise ValueError(f"fnbp.optim.kfac: factors of shapes G {jnp.shape(new.G)}, A {jnp.shape(new.A)} "
                                 f"do not fit the parameter's G {jnp.shape(old.G)}, A {jnp.shape(old.A)}")
            return Kron(*(jnp.where(first, n, decay * o + (1 - decay) * n)
                          for o, n in ((old.G, new.G), (old.A, new.A))))

        avg = jax.tree_util.tree_map(average, state.factors, factors, is_leaf=_is_pair)
        inv = jax.lax.cond(k % inverse_every == 0,
                           lambda: jax.tree_util.tree_map(lambda f: Kron(inverse(f.G), inverse(f.A)), avg,
                                                          is_leaf=_is_pair),
                           lambda: state.inverses)

        def step(g, f_inv):
            return -learning_rate * _from_mat(f_inv.G @ _as_mat(g) @ f_inv.A, g.shape)

        updates = jax.tree_util.tree_map(step, grads, inv)
        return updates, KFACState(k + 1, avg, inv)

    return optax.GradientTransformationExtraArgs(init, update)
