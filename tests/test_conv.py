"""fnbp.conv: conv2d's hand-written rule against autodiff of lax.conv_general_dilated and finite
differences; the readable conv2d_naive and the XLA-convolution conv2d_xla against the im2col one; padding
semantics; named errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnbp import conv, reference
from vjp_oracle import assert_within_tolerances, compile_fast, max_rel, vjp_check

rng = np.random.default_rng(0)

# (batch, H, W, C_in, C_out, kh, kw, stride, padding): strides 1-3, SAME/VALID/int, odd sizes,
# C_in = 1, kernels larger than the stride, non-square kernels, a stride larger than the kernel
CASES = [
    (2, 5, 6, 2, 3, 3, 3, 1, "SAME"),
    (1, 7, 5, 1, 2, 3, 3, 2, "SAME"),
    (2, 6, 7, 2, 2, 3, 2, 2, "VALID"),
    (1, 7, 7, 1, 2, 4, 4, 3, "SAME"),
    (1, 5, 6, 2, 2, 3, 3, 2, 1),
]
MORE_CASES = [                       # checked against lax (autodiff) only, and naive vs fast
    (2, 4, 5, 1, 3, 2, 3, 1, 2),
    (1, 8, 7, 2, 1, 2, 2, 3, "VALID"),
    (1, 5, 5, 3, 2, 5, 5, 1, "VALID"),
]


def _args(B, H, W, C_in, C_out, kh, kw):
    return (rng.standard_normal((C_out, C_in, kh, kw)), rng.standard_normal(C_out), rng.standard_normal((B, H, W, C_in)))


def _bind(fn, stride, padding):
    def f(W, b, x):
        return fn(W, b, x, stride=stride, padding=padding)
    return f


def test_conv2d_vjp_matches_autodiff_of_lax_and_finite_differences():
    checks = [(_bind(conv.conv2d, s, p), _bind(reference.conv2d, s, p), _args(B, H, W, C_in, C_out, kh, kw), (0, 1, 2))
              for B, H, W, C_in, C_out, kh, kw, s, p in CASES]
    assert_within_tolerances(vjp_check(checks))


@pytest.mark.slow
def test_naive_conv2d_matches_the_fast_one():
    # the readable loops-over-offsets version and the im2col + GEMM one: same forward, same VJP
    # (and two of MORE_CASES against lax's autodiff as well)
    cases = [(_bind(conv.conv2d, s, p), _bind(conv.conv2d_naive, s, p), _bind(reference.conv2d, s, p),
              _args(B, H, W, C_in, C_out, kh, kw)) for B, H, W, C_in, C_out, kh, kw, s, p in [CASES[1], CASES[4]] + MORE_CASES[1:]]

    def run(all_args):
        out = []
        for (fast, naive, ref, _), args in zip(cases, all_args):
            (a, vjp), (a_naive, vjp_naive), (a_ref, vjp_ref) = (jax.vjp(f, *args) for f in (fast, naive, ref))
            c = jnp.sin(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape)
            out.append((a, a_naive, a_ref, vjp(c), vjp_naive(c), vjp_ref(c)))
        return out
    for a, a_naive, a_ref, grads, grads_naive, grads_ref in compile_fast(run, [case[-1] for case in cases]):
        assert max_rel(a_naive, a) <= 1e-12 and max_rel(a, a_ref) <= 1e-12
        for g, g_naive, g_ref in zip(grads, grads_naive, grads_ref):
            assert max_rel(g_naive, g) <= 1e-12 and max_rel(g, g_ref) <= 1e-10


def test_xla_conv2d_equals_the_im2col_one():
    # XLA's convolution inside the hand-written rule (forward; grad_x by the flipped-kernel transposed convolution)
    # against im2col + GEMM: forward and all three gradients <= 1e-12 in float64, strides 1-3, SAME/VALID/int
    # padding, odd sizes, 1x1 kernels, the shapes on which lax's own autodiff aborts XLA:CPU
    cases = CASES + MORE_CASES + XLA_ABORT_CASES + [(2, 7, 7, 1, 2, 1, 1, 3, "SAME"), (2, 9, 8, 3, 4, 5, 5, 2, 2)]
    all_args = [_args(B, H, W, C_in, C_out, kh, kw) for B, H, W, C_in, C_out, kh, kw, _, _ in cases]

    def run(all_args):
        out = []
        for (*_, s, p), args in zip(cases, all_args):
            (a, vjp), (a_xla, vjp_xla) = (jax.vjp(_bind(fn, s, p), *args) for fn in (conv.conv2d, conv.conv2d_xla))
            c = jnp.sin(1.0 + jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape)
            out.append(((a,) + vjp(c), (a_xla,) + vjp_xla(c)))
        return out
    for case, (ours, xla) in zip(cases, jax.jit(run)(all_args)):
        for what, g, g_xla in zip(("a", "grad_W", "grad_b", "grad_x"), ours, xla):
            assert g_xla.shape == g.shape and max_rel(g_xla, g) <= 1e-12, (case, what, max_rel(g_xla, g))


def test_xla_conv2d_input_gradient_pads_inside_the_convolution_also_under_vmap():
    # stride 1: grad_x is one padded convolution (the zero padding in its window), not a pad op in front of a
    # VALID one, also when vmapped over several cotangents (curvature's columns): a separate pad there took
    # XLA:CPU's slow path, 6x slower (the LeNet's diag_ggn 13x one backward, now 5x)
    W, b, x = (a.astype(np.float32) for a in _args(4, 12, 12, 8, 16, 5, 5))
    _, vjp = jax.vjp(_bind(conv.conv2d_xla, 1, "VALID"), W, b, x)
    cts = jnp.ones((3, 4, 8, 8, 16), jnp.float32)
    hlo = jax.jit(jax.vmap(lambda c: vjp(c)[2])).lower(cts).compile().as_text()
    assert "pad=4_4x4_4" in hlo and " pad(" not in hlo, hlo


def test_xla_conv2d_promotes_mixed_dtypes_as_conv2d():
    # XLA's convolution takes one dtype; conv2d's GEMM promotes: float32 W with float64 x (and the reverse) give
    # conv2d's output dtype, and each gradient its primal's dtype, the same numbers
    W, b, x = _args(2, 7, 7, 2, 3, 3, 3)
    for w_dtype, x_dtype in ((np.float32, np.float64), (np.float64, np.float32)):
        args = (W.astype(w_dtype), b.astype(w_dtype), x.astype(x_dtype))
        ours, xla = (jax.jit(lambda *a, fn=fn: (fn(*a, stride=2, padding=1),) + jax.grad(
            lambda *a: jnp.sum(fn(*a, stride=2, padding=1) ** 2), argnums=(0, 1, 2))(*a))(*args)
            for fn in (conv.conv2d, conv.conv2d_xla))
        for g, g_xla in zip(ours, xla):
            assert g_xla.dtype == g.dtype and max_rel(g_xla, g) <= 1e-6


@pytest.mark.slow
def test_xla_conv2d_runs_xla_convolutions_and_keeps_the_per_example_extension():
    # the compiled gradient calls XLA's convolution (forward, grad_x); conv2d's has none.  Per-example gradients
    # of a LeNet whose conv nodes use conv2d_xla equal those with conv2d (the extension recomputes the patches)
    from fnbp import cnn, per_example
    W, b, x = _args(2, 9, 8, 3, 4, 3, 3)

    def program(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, stride=2, padding=1) ** 2), argnums=(0, 2))).lower(
            W, b, x).compile().as_text()
    assert program(conv.conv2d_xla).count(" convolution(") == 2 and " convolution(" not in program(conv.conv2d)
    arch = cnn.LeNet(image_shape=(10, 10, 1), channels=(2, 3), kernel=3, padding="SAME", hidden=(5,), n_classes=3)
    params = cnn.init(jax.random.key(0), arch, dtype=jnp.float64)
    xs, d = rng.standard_normal((3, 10, 10, 1)), rng.standard_normal((3, 3))
    net = cnn.network(params, arch=arch, train=True)
    net_xla = net._replace(nodes=tuple(n._replace(op=conv.conv2d_xla) if n.op is conv.conv2d else n
                                       for n in net.nodes))
    assert sum(n.op is conv.conv2d_xla for n in net_xla.nodes) == 2
    grads = jax.jit(lambda p, x, d: [per_example.grads(p, x, d, model=g) for g in (net, net_xla)])(params, xs, d)
    for g, g_xla in zip(*(jax.tree_util.tree_leaves(t) for t in grads)):
        assert max_rel(g_xla, g) <= 1e-12


def test_output_sizes_follow_lax_padding_semantics():
    # SAME: ceil(in / stride); VALID: floor((in - k) / stride) + 1; int p: floor((in + 2p - k) / stride) + 1
    assert conv.conv_output_size(7, 3, 2, "SAME") == 4
    assert conv.conv_output_size(7, 4, 3, "SAME") == 3
    assert conv.conv_output_size(7, 3, 2, "VALID") == 3
    assert conv.conv_output_size(5, 3, 2, 1) == 3
    assert conv.pad_amounts(7, 4, 1, "SAME") == (1, 2)          # the extra pixel goes to the bottom/right
    assert conv.pad_amounts(7, 1, 3, "SAME") == (0, 0)
    for B, H, W, C_in, C_out, kh, kw, s, p in CASES + MORE_CASES:
        out = jax.eval_shape(_bind(conv.conv2d, s, p), *_args(B, H, W, C_in, C_out, kh, kw))
        ref = jax.eval_shape(_bind(reference.conv2d, s, p), *_args(B, H, W, C_in, C_out, kh, kw))
        assert out.shape == ref.shape


# XLA:CPU (jaxlib 0.10.2) aborts the whole process ("Check failed" in its algebraic simplifier) when it compiles
# JAX's gradient with respect to h of a strided lax convolution with explicit padding, for some shapes: these
# two were drawn by test_hypothesis_shapes_match_lax (the first is the smallest found).  fnbp.reference.conv2d
# therefore applies an int padding with jnp.pad and convolves "VALID", the same function; fnbp's own rule
# (im2col + GEMM, no XLA convolution) never had the problem.
XLA_ABORT_CASES = [(1, 4, 4, 1, 1, 2, 4, 2, 1), (1, 6, 3, 2, 3, 2, 3, 2, 1)]


def test_reference_int_padding_is_lax_explicit_padding_and_differentiates_where_xla_aborts():
    from jax import lax
    for B, H, W, C_in, C_out, kh, kw, s, p in XLA_ABORT_CASES + [MORE_CASES[0]]:
        args = _args(B, H, W, C_in, C_out, kh, kw)
        W_, b, x = args
        lax_explicit = lax.conv_general_dilated(x, W_, (s, s), ((p, p), (p, p)),
                                                dimension_numbers=("NHWC", "OIHW", "NHWC")) + b
        np.testing.assert_allclose(reference.conv2d(W_, b, x, stride=s, padding=p), lax_explicit, rtol=1e-12, atol=1e-13)

        def grad_of(fn):
            return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(_bind(fn, s, p)(*a))), argnums=(0, 1, 2)))
        for g, g_ref in zip(grad_of(conv.conv2d)(*args), grad_of(reference.conv2d)(*args)):
            assert max_rel(g, g_ref) <= 1e-10


def test_conv2d_is_cross_correlation_with_pytorch_weight_layout():
    # one channel in, one out, a kernel with a single 1 at (0, 1): a[y, x] = x_pad[y, x + 1]
    x = np.arange(12.0).reshape(1, 3, 4, 1)
    W = np.zeros((1, 1, 2, 2))
    W[0, 0, 0, 1] = 1.0
    a = jax.jit(_bind(conv.conv2d, 1, "VALID"))(W, np.zeros(1), x)
    np.testing.assert_array_equal(np.asarray(a)[0, ..., 0], x[0, :2, 1:, 0])


def test_weight_gradient_is_one_gemm_over_examples_and_positions():
    # grad_W = sum over n, p of delta_{n,p} P_{n,p}^T with P from im2col: check against that formula
    W, b, x = _args(2, 5, 5, 2, 3, 3, 3)
    delta = rng.standard_normal((2, 5, 5, 3))

    def grads_and_columns(W, b, x, delta):
        _, vjp = jax.vjp(_bind(conv.conv2d, 1, "SAME"), W, b, x)
        return vjp(delta)[:2], conv.im2col(x, 3, 3, padding="SAME")
    (grad_W, grad_b), cols = compile_fast(grads_and_columns, W, b, x, delta)
    P = np.asarray(cols).reshape(-1, 18)                                      # columns ordered (i, j, c)
    expected = (delta.reshape(-1, 3).T @ P).reshape(3, 3, 3, 2).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(grad_W, expected, rtol=1e-12)
    np.testing.assert_allclose(grad_b, delta.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_col2im_is_the_adjoint_of_im2col():
    # <im2col(x), c> = <x, col2im(c)> for every x, c: col2im sums the overlapping patches
    x = rng.standard_normal((2, 7, 6, 2))
    geometries = ((1, "SAME"), (2, "VALID"), (3, 1))
    cs = [rng.standard_normal(jax.eval_shape(lambda x, s=s, p=p: conv.im2col(x, 3, 3, stride=s, padding=p), x).shape)
          for s, p in geometries]

    def both(x, cs):
        return [(conv.im2col(x, 3, 3, stride=s, padding=p), conv.col2im(c, x.shape, 3, 3, stride=s, padding=p))
                for (s, p), c in zip(geometries, cs)]
    for (cols, back), c in zip(compile_fast(both, x, cs), cs):
        lhs, rhs = np.vdot(np.asarray(cols), c), np.vdot(x, np.asarray(back))
        assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_each_pixel_gradient_counts_the_patches_covering_it():
    # all-ones W and delta, one channel: grad_x[pixel] = number of (kernel offset, patch) pairs covering it
    grad_x = jax.jit(jax.grad(lambda x: jnp.sum(conv.conv2d(jnp.ones((1, 1, 3, 3)), jnp.zeros(1), x,
                                                            padding="VALID"))))(np.zeros((1, 4, 4, 1)))[0, ..., 0]
    np.testing.assert_array_equal(grad_x, [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])


@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 7), W=st.integers(1, 7), C_in=st.integers(1, 3),
       C_out=st.integers(1, 3), kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.sampled_from(["SAME", "VALID", 0, 1, 2]), seed=st.integers(0, 2 ** 16))
def test_hypothesis_shapes_match_lax(B, H, W, C_in, C_out, kh, kw, stride, padding, seed):
    r = np.random.default_rng(seed)
    pads = {"SAME": 0, "VALID": 0}.get(padding, padding)
    if padding != "SAME" and (H + 2 * pads < kh or W + 2 * pads < kw):
        with pytest.raises(ValueError, match="larger than the padded input"):
            conv.conv2d(np.zeros((C_out, C_in, kh, kw)), np.zeros(C_out), np.zeros((B, H, W, C_in)), stride=stride,
                        padding=padding)
        return
    args = (r.standard_normal((C_out, C_in, kh, kw)), r.standard_normal(C_out), r.standard_normal((B, H, W, C_in)))
    f, ref = _bind(conv.conv2d, stride, padding), _bind(reference.conv2d, stride, padding)

    def both(W, b, x):
        (out, vjp), (out_ref, vjp_ref) = jax.vjp(f, W, b, x), jax.vjp(ref, W, b, x)
        c = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return out, out_ref, vjp(c), vjp_ref(c)
    out, out_ref, ours, theirs = compile_fast(both, *args)
    assert max_rel(out, out_ref) <= 1e-12
    for g, g_ref in zip(ours, theirs):
        assert max_rel(g, g_ref) <= 1e-10


def test_float32_forward_and_gradient_close_to_lax():
    args = [np.asarray(a, np.float32) for a in _args(2, 9, 9, 3, 4, 3, 3)]
    f, ref = _bind(conv.conv2d, 2, "SAME"), _bind(reference.conv2d, 2, "SAME")
    out = jax.jit(f)(*args)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(*args), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(*args)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), argnums=(0, 1, 2)))(*args)
    for a, b in zip(g, g_ref):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn", [conv.conv2d, conv.conv2d_naive, conv.conv2d_xla])
def test_named_errors(fn):
    name = "fnbp." + fn.__name__
    W, b, x = np.zeros((4, 3, 3, 3)), np.zeros(4), np.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match=rf"{name}: x has 2 channels .* expects C_in = 3"):
        fn(W, b, np.zeros((2, 8, 8, 2)))
    with pytest.raises(ValueError, match=rf"{name}: kernel of size 3 is larger than the padded input \(2 \+ 0 \+ 0"):
        fn(W, b, np.zeros((2, 2, 8, 3)), padding="VALID")
    with pytest.raises(ValueError, match=rf"{name}: kernel of size 5 is larger than the padded input \(2 \+ 1 \+ 1"):
        fn(np.zeros((4, 3, 5, 5)), b, np.zeros((2, 2, 8, 3)), padding=1)
    for stride, shown in ((0, "0"), (-1, "-1"), (1.5, "float 1.5"), (True, "the bool True"), (2.0, "float 2.0"),
                          (np.float32(2), "float 2.0"), ("2", "str '2'")):
        with pytest.raises(ValueError, match=rf"{name}: stride must be an integer >= 1.*, got {shown}$"):
            fn(W, b, x, stride=stride)
    for padding in ("same-ish", -1, 1.0, None, np.float64(1)):
        with pytest.raises(ValueError, match=rf"{name}: padding must be 'SAME', 'VALID' or an integer >= 0.*, got"):
            fn(W, b, x, padding=padding)
    with pytest.raises(ValueError, match=rf"{name}: b must have shape \(C_out,\) = \(4,\)"):
        fn(W, np.zeros(3), x)
    with pytest.raises(ValueError, match=rf"{name}: W must have shape \(C_out, C_in, kh, kw\), got shape \(4, 27\)"):
        fn(np.zeros((4, 27)), b, x)
    with pytest.raises(ValueError, match=rf"{name}: x must have shape \(batch, H, W, C_in\)"):
        fn(W, b, np.zeros((8, 8, 3)))


def test_nan_in_the_input_propagates():
    x = rng.standard_normal((1, 4, 4, 1))
    x[0, 1, 1, 0] = np.nan
    a = np.asarray(jax.jit(_bind(conv.conv2d, 1, "VALID"))(np.ones((1, 1, 2, 2)), np.zeros(1), x))[0, ..., 0]
    assert np.isnan(a[:2, :2]).all() and np.isfinite(a[2:, :]).all()


@pytest.mark.parametrize("fn", [conv.conv2d, conv.conv2d_naive, conv.conv2d_xla])
def test_integer_like_scalars_are_accepted_as_ints(fn):
    """numpy and JAX integer scalars are integers (operator.index accepts them): the same result as a Python int,
    under jit too (the options are static)."""
    W, b, x = rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2), rng.standard_normal((2, 7, 7, 3))
    want = np.asarray(fn(W, b, x, stride=2, padding=1))
    for like in (np.int64, np.int32, np.uint8, jnp.int32):
        two, one = like(2), like(1)               # made outside jit: concrete (inside jit a jnp scalar is traced)
        got = fn(W, b, x, stride=two, padding=one)
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda W, b, x: fn(W, b, x, stride=two))(W, b, x)),
                                      np.asarray(fn(W, b, x, stride=2)))
    assert conv.conv_output_size(7, 3, np.int64(2), np.int16(1)) == 4
