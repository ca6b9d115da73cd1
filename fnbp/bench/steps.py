"""What ``fnbp.bench`` runs: the network's FLOP count, the compared training steps, and the
runners (callables that run one synchronous step) the cases hand to ``harness.interleaved``.

The MLP reference: the 784-512-512-10 ReLU network, softmax cross-entropy, float32, Adam
(lr ``LEARNING_RATE``), one step = forward + backward + Adam update, in

- ``fnbp_autodiff``: ``jax.value_and_grad`` through fnbp's custom_vjp layers + ``fnbp.optim.adam``;
- ``fnbp_backprop``: the explicit walker ``fnbp.backprop`` + ``fnbp.optim.adam``;
- ``peer_jax``: ``jax.value_and_grad`` of a plain-jnp forward + ``optax.adam`` (the peer);
- ``TorchStep``: PyTorch eager on CPU (optional: torch is not a dependency of fnbp);
- ``Gemm``: the limit, ``jit(a @ b)`` on square float32 matrices.

A new runner needs only ``__call__`` (one step, blocking until its result is ready); ``JaxStep``
wraps any ``step(params, opt_state, x, y) -> (params, opt_state, E)`` with jit, donation and
ahead-of-time compilation, and records the compile time, XLA's temp memory and the HLO text.
"""
import time

import numpy as np

from .harness import temp_bytes

LEARNING_RATE = 1e-3
STEP_VARIANTS = ("fnbp_autodiff", "fnbp_backprop", "peer_jax", "torch_eager", "gemm")
LABELS = {
    "fnbp_autodiff": "fnbp: value_and_grad through custom_vjp rules + fnbp.optim.adam",
    "fnbp_backprop": "fnbp: explicit fnbp.backprop loop + fnbp.optim.adam",
    "peer_jax": "peer: value_and_grad of plain jnp + optax.adam",
    "torch_eager": "PyTorch eager (CPU) + torch.optim.Adam",
    "gemm": "limit: jit(a @ b), square float32 GEMM",
}
SHORT = {"fnbp_autodiff": "fnbp autodiff", "fnbp_backprop": "fnbp backprop", "peer_jax": "peer (jax+optax)",
         "torch_eager": "torch eager", "gemm": "GEMM limit"}
FLOP_FORMULA = ("FLOPs/step = 2*B*P (forward) + 2*B*P (weight gradients) + 2*B*(P - P1) (input gradients), "
                "P = number of weight-matrix entries sum_k n_{k-1} n_k (biases not counted), P1 = n_0 n_1 "
                "(the first layer's input gradient is not needed). Not counted: bias adds and bias "
                "gradients, ReLU, softmax/cross-entropy, the Adam update (all O(B*n) or O(P), not GEMMs).")


def weight_counts(sizes):
    """(P, P1): weight-matrix entries of the whole network and of the first layer."""
    sizes = [int(n) for n in sizes]
    P = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return P, sizes[0] * sizes[1]


def step_flops(sizes, batch_size):
    """FLOPs of one training step's matrix products: 4*B*P + 2*B*(P - P1) (see FLOP_FORMULA)."""
    P, P1 = weight_counts(sizes)
    B = int(batch_size)
    return 2 * B * P + 2 * B * P + 2 * B * (P - P1)


def make_data(sizes, batch_size, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], size=batch_size).astype(np.int32)
    return x, y


def init_params(sizes, seed):
    import jax
    from fnbp import mlp
    return mlp.init(jax.random.PRNGKey(seed), sizes)


def peer_loss(params, x, y):
    """The peer's plain-jnp forward: h @ W.T + b, jax.nn.relu, optax's integer-label cross-entropy."""
    import jax
    import optax
    h = x
    for k, layer in enumerate(params):
        h = h @ layer["W"].T + layer["b"]
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def fnbp_loss(params, x, y):
    from fnbp import losses, mlp
    return losses.softmax_cross_entropy(mlp.apply(params, x), y)


def step_functions():
    """name -> (step(params, opt_state, x, y) -> (params, opt_state, E), optimizer)."""
    import jax
    import optax
    from fnbp import losses, optim
    from fnbp import backprop

    ours_opt, peer_opt = optim.adam(LEARNING_RATE), optax.adam(LEARNING_RATE)

    def fnbp_autodiff(params, opt_state, x, y):
        E, grads = jax.value_and_grad(fnbp_loss)(params, x, y)
        updates, opt_state = ours_opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, E

    def fnbp_backprop(params, opt_state, x, y):
        E, grads = backprop(params, x, y, loss=losses.softmax_cross_entropy)
        updates, opt_state = ours_opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, E

    def peer_jax(params, opt_state, x, y):
        E, grads = jax.value_and_grad(peer_loss)(params, x, y)
        updates, opt_state = peer_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, E

    return {"fnbp_autodiff": (fnbp_autodiff, ours_opt), "fnbp_backprop": (fnbp_backprop, ours_opt),
            "peer_jax": (peer_jax, peer_opt)}


class JaxStep:
    """A jit-compiled, donated training step holding its own parameter and optimizer buffers."""

    def __init__(self, fn, opt, params, x, y, *, donate=True, place=None):
        import jax
        import jax.numpy as jnp
        params = jax.tree_util.tree_map(jnp.array, params)        # own copy: the buffers get donated
        opt_state = opt.init(params)
        if place is not None:
            params, opt_state, x, y = place(params, opt_state, x, y)
        jitted = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
        t0 = time.perf_counter()
        self.compiled = jitted.lower(params, opt_state, x, y).compile()
        self.compile_s = time.perf_counter() - t0
        self.temp_bytes = temp_bytes(self.compiled)
        self.hlo = self.compiled.as_text()
        self.params, self.opt_state, self.x, self.y = params, opt_state, x, y
        self.last_loss = None

    def __call__(self):
        import jax
        self.params, self.opt_state, E = out = self.compiled(self.params, self.opt_state, self.x, self.y)
        jax.block_until_ready(out)
        self.last_loss = E


class Gemm:
    """jit(a @ b) on random n x n float32 matrices."""

    def __init__(self, n, seed=0):
        import jax
        import jax.numpy as jnp
        rng = np.random.default_rng(seed)
        self.a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        self.b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        self.n, self.flops = n, 2 * n ** 3
        self.compiled = jax.jit(lambda a, b: a @ b).lower(self.a, self.b).compile()

    def __call__(self):
        self.compiled(self.a, self.b).block_until_ready()


def torch_available():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


class TorchStep:
    """PyTorch eager training step on CPU: nn.Linear/ReLU, F.cross_entropy, torch.optim.Adam."""

    def __init__(self, params, x, y, threads):
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(threads)
        layers = []
        for k, layer in enumerate(params):
            W, b = np.asarray(layer["W"]), np.asarray(layer["b"])
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W.copy()))
                lin.bias.copy_(torch.from_numpy(b.copy()))
            layers.append(lin)
            if k < len(params) - 1:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.x = torch.from_numpy(np.array(x, order="C"))
        self.y = torch.from_numpy(np.asarray(y).astype(np.int64))
        self.F = F
        self.last_loss = None

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.last_loss = loss.detach()


class GemmsOnly:
    """Diagnostic: exactly the step's matrix products, nothing else, through fnbp's own
    ``dense_forward``/``dense_backward`` (so the layouts are the ones the step uses) on random
    inputs of the step's shapes: per layer the forward product, the weight gradient, and the
    input gradient of every layer but the first.  Same FLOP count as ``step_flops``."""

    def __init__(self, sizes, batch_size, seed):
        import jax
        import jax.numpy as jnp
        from fnbp.layers import dense_backward, dense_forward
        rng = np.random.default_rng(seed)

        def arr(*shape):
            return jnp.asarray(rng.standard_normal(shape), jnp.float32)

        self.args = [(arr(n_out, n_in), jnp.zeros((n_out,), jnp.float32), arr(batch_size, n_in),
                      arr(batch_size, n_out)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]

        def f(args):
            outs = []
            for k, (W, b, h, d) in enumerate(args):
                a, res = dense_forward(W, b, h)
                gW, gb, gh = dense_backward(res, d)
                outs += [a, gW] + ([gh] if k else [])
            return outs

        self.compiled = jax.jit(f).lower(self.args).compile()
        self.hlo = self.compiled.as_text()

    def __call__(self):
        import jax
        jax.block_until_ready(self.compiled(self.args))


class AdamOnly:
    """Diagnostic: fnbp.optim.adam's update + apply_updates alone on the network's parameters
    (jit, donated), to see the optimizer's share of a step."""

    def __init__(self, params, seed, opt=None, apply=None):
        import jax
        import jax.numpy as jnp
        from fnbp import optim
        opt = opt or optim.adam(LEARNING_RATE)
        apply = apply or optim.apply_updates
        rng = np.random.default_rng(seed + 2)
        grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype) * 1e-2, params)

        def upd(p, s, g, _):
            u, s = opt.update(g, s, p)
            return apply(p, u), s, jnp.zeros(())

        self.step = JaxStep(upd, opt, params, grads, None)
        self.compile_s, self.temp_bytes, self.hlo = self.step.compile_s, self.step.temp_bytes, self.step.hlo

    def __call__(self):
        self.step()
