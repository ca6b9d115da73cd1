"""The training loop: epochs of shuffled mini-batches, one jit-compiled epoch at a time.

Design (fastest on CPU and GPU for data that fits in device memory): the whole
epoch -- permutation, gathering each mini-batch, forward, backward, optimizer
update -- is ONE jit-compiled ``jax.lax.scan`` over the steps, with the
parameter, optimizer and batch-norm buffers donated.  Python runs once per
epoch (evaluation, progress bar, checkpoint), never per step.

Randomness: the epoch's permutation comes from ``fold_in(key, epoch)`` and each
step's dropout key from ``fold_in(epoch_key, step)``; so a run is a pure
function of (initial parameters, key, hyperparameters), and resuming at epoch e
reproduces the uninterrupted run bit for bit on CPU.
"""
import dataclasses
import functools
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import activations, dp, extensions, graph, keys, losses, mlp, optim
from .cnn import shift_augment
from .data import check_shift
from .per_example import extension_layers
from .objective import objective
from .rules import rule_of
from .train_checks import (NonFiniteError, NonFiniteInputError, NonFiniteLossError, NonFiniteParamsError,
                           check_labels, _FN, _check_data, _check_finite_tree, _check_hyperparameters)

__all__ = ["Config", "TrainResult", "train", "evaluate", "evaluate_in_chunks", "forward", "make_step", "make_epoch",
           "resolve_model", "NonFiniteError", "NonFiniteLossError", "NonFiniteParamsError", "NonFiniteInputError",
           "batch_plan", "check_labels"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The training recipe: how one step computes its gradient (hashable, static under jit).  The model is
    an argument of ``train``/``make_step``/``make_epoch``/``evaluate`` (``model=``, any ``fnbp.nn`` model).

    loss: a loss spec (``fnbp.losses.loss_spec``): one of ``fnbp.losses`` (``reduction='mean'``
      unless a ``functools.partial`` says 'sum'), a rule of your own, or -- with grad="autodiff"
      only -- any function L(y, d) -> scalar (e.g. an optax loss with ``.mean()``).
    l2: lambda of the L2 penalty on the weights (one node of the objective, ``fnbp.objective``, under
      DP-SGD too).
    grad: ``"autodiff"`` -- ``jax.value_and_grad`` through ``fnbp.graph.apply`` (the custom_vjp
      rules), or ``"backprop"`` -- the explicit walker ``fnbp.graph.forward``/``backward``; both
      run every op (batch norm and dropout included) and give the same gradients.
    dp_clip, dp_noise: DP-SGD (``fnbp.dp``) when dp_clip = C > 0: each example's gradient clipped to
      norm C (from one backward of the explicit rules, whatever ``grad`` says), then N(0, (dp_noise C)^2 I)
      added to the step's sum, from the step's key (``fnbp.keys.dp_noise``).  Any model without batch norm.
    augment: the largest random shift, in pixels, of each training image (``fnbp.cnn.shift_augment``, key
      ``fnbp.keys.augment``); 0 = none.  Images only, smaller than the image.

    Without ``model=``, the MLP of ``fnbp.mlp`` (the parameters of ``fnbp.mlp.init``) described by
    activation, output (hidden and output activations), dropout (between hidden layers), bn_position and
    bn_momentum (batch norm where the parameters have ``"gamma"``/``"beta"``).  With a model these five stay
    at their defaults (a model carries its own layers): anything else is refused, never silently ignored.
    """
    loss: Callable = losses.softmax_cross_entropy
    l2: float = 0.0
    grad: str = "autodiff"
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    augment: int = 0
    activation: Callable = activations.relu
    output: Callable = activations.identity
    dropout: float = 0.0
    bn_position: str = "before"
    bn_momentum: float = 0.1

    def __post_init__(self):
        if not (self.dp_clip >= 0 and self.dp_noise >= 0) or (self.dp_noise and not self.dp_clip):
            raise ValueError(f"fnbp.train.Config: dp_clip and dp_noise must be >= 0, and dp_noise needs dp_clip > 0 "
                             f"(fnbp train: --dp-noise needs --dp-clip > 0); "
                             f"got dp_clip={self.dp_clip}, dp_noise={self.dp_noise}")
        if self.grad not in ("autodiff", "backprop"):
            raise ValueError(f"fnbp.train.Config: grad must be 'autodiff' or 'backprop', got {self.grad!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"fnbp.train.Config: dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or self.augment < 0:
            raise ValueError(f"fnbp.train.Config: augment must be an int >= 0 (pixels), got {self.augment!r}")
        losses.loss_spec(self.loss, name="fnbp.train.Config")       # a bad loss or reduction fails here

    def mlp(self):
        """The MLP of the five model fields (what ``model=None`` means)."""
        return mlp.Network(activation=self.activation, output=self.output, dropout=self.dropout,
                           bn_position=self.bn_position, bn_momentum=self.bn_momentum)


_MLP_FIELDS = ("activation", "output", "dropout", "bn_position", "bn_momentum")


def resolve_model(cfg, model, name=None):
    """The model a step runs: ``model``, or ``cfg``'s MLP when None.  Refuses a model together with MLP fields
    of ``cfg`` that are not at their defaults (they would be ignored)."""
    name = name or _FN
    if model is None or model == cfg.mlp():
        return cfg.mlp()
    if not (hasattr(model, "graph") and hasattr(model, "init_state") and hasattr(model, "check_params")):
        raise TypeError(f"{name}: model must be an fnbp.nn model (fnbp.nn.serial(...), fnbp.nn.mlp, fnbp.nn.lenet), "
                        f"got {type(model).__name__}")
    defaults = Config()
    changed = [f for f in _MLP_FIELDS if getattr(cfg, f) != getattr(defaults, f)]
    if changed:
        raise ValueError(f"{name}: Config fields {changed} describe the MLP used without model=; with a model they "
                         f"would be ignored (put the activation, dropout or batch norm into the model's layers)")
    return model


class TrainResult(NamedTuple):
    params: Any
    opt_state: Any
    state: Any          # batch-norm running statistics (``fnbp.mlp.init_state``)
    key: Any
    epoch: int          # epochs completed
    step: int           # optimizer steps taken
    history: list       # one dict per epoch
    compile_seconds: float


def _accuracy(y, d):
    if jnp.issubdtype(d.dtype, jnp.integer):
        return jnp.mean(jnp.argmax(y, axis=-1) == d)
    if y.shape[-1] == 1:                                  # one sigmoid output vs 0/1 targets
        return jnp.mean((y[..., 0] > 0.5) == (d[..., 0] > 0.5))
    return jnp.mean(jnp.argmax(y, axis=-1) == jnp.argmax(d, axis=-1))


def make_step(cfg: Config, opt, *, model=None, accumulate=1):
    """One optimizer step ``(params, opt_state, state), (x, d, key) -> (new carry, E)``.

    The objective E = L(y; d) + lambda Omega is one graph (``fnbp.objective`` on ``model``'s graph, or the
    MLP's without a model), differentiated by the explicit walker or by autodiff (``cfg.grad``), or under DP-SGD
    clipped per example (``fnbp.dp.clipped_objective``, the same L2 node).  With ``accumulate = m > 1`` the
    mini-batch is split into m equal micro-batches whose objectives are combined as the loss combines examples
    (``fnbp.losses.reduce``: their mean for reduction='mean', their sum for 'sum', the penalty counted once),
    followed by one optimizer update -- the same update as the whole batch at once, with 1/m of the
    activation memory.  (Batch norm then normalises each micro-batch with its own statistics.)
    """
    m = resolve_model(cfg, model)
    spec = losses.loss_spec(cfg.loss, name="fnbp.train")         # parsed once, here
    with_l2 = mlp.has_l2(cfg.l2)
    # m micro-batch objectives J_i = L_i + (lambda / c) Omega weighted by c / m, c = reduce(ones(m)), make J
    with jax.ensure_compile_time_eval():                        # a constant, even when traced inside a jit
        combined = float(losses.reduce(jnp.ones(accumulate), spec.reduction))
    weight, l2_each = combined / accumulate, cfg.l2 / combined if with_l2 else cfg.l2

    def objective_and_grad(params, state, x, d, key):
        """((E, new state), grads) of one (micro-)batch's objective."""
        if cfg.augment:
            x = shift_augment(keys.augment(key), x, cfg.augment)
        if cfg.dp_clip:     # the clipped sum of per-example gradients, reduced as the loss reduces examples
            E, grads, _ = dp.clipped_objective(params, x, d, clip=cfg.dp_clip, model=m, loss=spec, l2=l2_each,
                                               key=key, name="fnbp.train (DP-SGD)")
            return (E, state), grads
        net = objective(m.graph(params, train=True), spec, l2=with_l2)
        inputs = {"x": x, "d": d, "key": key, "l2": l2_each}
        return graph.value_and_grad(net, params, inputs, state, explicit=cfg.grad == "backprop", who="fnbp.train")

    def step(carry, batch):
        params, opt_state, state = carry
        x, d, key = batch
        at = optim.gradient_point(opt, params, opt_state)   # θ̃: = params unless the optimizer looks ahead (Nesterov)
        if accumulate == 1:
            (E, state), grads = objective_and_grad(at, state, x, d, key)
        else:
            micro_x = x.reshape((accumulate, -1) + x.shape[1:])
            micro_d = d.reshape((accumulate, -1) + d.shape[1:])

            def micro(acc, mb):
                E_acc, g_acc, st = acc
                i, xm, dm = mb
                (E, st), g = objective_and_grad(at, st, xm, dm, keys.micro_batch(key, i))
                return (E_acc + weight * E, jax.tree_util.tree_map(lambda a, b: a + weight * b, g_acc, g), st), None

            zero = jax.tree_util.tree_map(jnp.zeros_like, at)
            (E, grads, state), _ = jax.lax.scan(
                micro, (jnp.zeros((), x.dtype), zero, state), (jnp.arange(accumulate), micro_x, micro_d))
        if cfg.dp_noise:       # N(0, (sigma C s)^2 I) on the step's reduced clipped sum, once, after accumulation
            std = dp.noise_std(cfg.dp_clip, cfg.dp_noise, dp.example_scale(spec, x.shape[0]))
            grads = dp.gaussian(grads, keys.dp_noise(key), std)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        return (params, opt_state, state), E

    return step


def batch_plan(n_examples, batch_size, accumulate=1):
    """(batch size, steps per epoch); ``batch_size=None`` means full batch.

    Each epoch takes a fresh permutation and cuts it into ``n // B`` batches of
    B examples; the ``n mod B`` examples left at the end of the permutation are
    not used in that epoch (different ones each epoch).
    """
    B = n_examples if batch_size is None else int(batch_size)
    if not 1 <= B <= n_examples:
        raise ValueError(f"fnbp.train: batch_size must be between 1 and the number of training examples "
                         f"({n_examples}), got {batch_size}")
    if B % accumulate:
        raise ValueError(f"fnbp.train: batch_size {B} is not divisible by accumulate={accumulate} "
                         f"(micro-batches must be equal)")
    return B, n_examples // B


def _all_finite(tree):
    """One boolean: every inexact leaf of ``tree`` is finite (integer leaves such as counts are skipped)."""
    flags = [jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(jnp.result_type(v), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def make_epoch(cfg: Config, opt, *, model=None, batch_size, n_examples, accumulate=1, batch_sharding=None):
    """A function ``(params, opt_state, state, x, d, epoch_key) -> (params, opt_state, state, losses)``
    running one epoch as a ``lax.scan`` over its steps (jit it; ``train`` does, with donation)."""
    return _make_epoch(cfg, opt, model=model, batch_size=batch_size, n_examples=n_examples, accumulate=accumulate,
                       batch_sharding=batch_sharding, finite_flags=False)


def _make_epoch(cfg, opt, *, model, batch_size, n_examples, accumulate, batch_sharding, finite_flags):
    """``make_epoch``; with ``finite_flags`` the epoch also returns one boolean per step: the
    parameters, optimizer state and batch-norm statistics after that step are all finite (a cheap
    in-jit check; the host reads the flags once per epoch, with the losses)."""
    B, n_steps = batch_plan(n_examples, batch_size, accumulate)
    plain_step = make_step(cfg, opt, model=model, accumulate=accumulate)

    def step(carry, batch):
        carry, E = plain_step(carry, batch)
        return carry, ((E, _all_finite(carry)) if finite_flags else E)

    def epoch(params, opt_state, state, x, d, epoch_key):
        perm = jax.random.permutation(epoch_key, x.shape[0])[: n_steps * B].reshape(n_steps, B)

        def body(carry, i):
            idx = perm[i]
            xb, db = x[idx], d[idx]
            if batch_sharding is not None:                   # data parallel: split the batch over devices
                from .parallel import shard_batch
                xb, db = shard_batch(xb, batch_sharding), shard_batch(db, batch_sharding)
            return step(carry, (xb, db, keys.step(epoch_key, i)))

        (params, opt_state, state), per_step = jax.lax.scan(body, (params, opt_state, state), jnp.arange(n_steps))
        if finite_flags:
            return (params, opt_state, state) + tuple(per_step)
        return params, opt_state, state, per_step

    return epoch


def forward(cfg: Config, params, state, x, *, model=None, train=False, key=None):
    """``(y, new_state)``: the model's (or ``cfg``'s MLP's) output and running statistics."""
    net = resolve_model(cfg, model).graph(params, train=train)
    return graph.apply(net, params, {"x": x, "key": key}, state)


def evaluate(cfg: Config, params, state, x, d, *, model=None):
    """(mean loss, accuracy) in inference mode (running batch-norm statistics, no dropout)."""
    y, _ = forward(cfg, params, state, x, model=model)
    return losses.loss_spec(cfg.loss, name="fnbp.train")(y, d, reduction="mean"), _accuracy(y, d)


EVAL_CHUNK = 256
"""Examples per forward of ``evaluate_in_chunks`` (``train``'s evaluation after every epoch)."""


def evaluate_in_chunks(cfg: Config, params, state, x, d, *, model=None, chunk=EVAL_CHUNK):
    """``evaluate``'s (mean loss, accuracy) from forwards of at most ``chunk`` examples: ``lax.map`` over the
    N // chunk full chunks, one more forward for the rest, then loss = sum_c n_c L_c / N and accuracy = sum_c n_c
    A_c / N (L_c, A_c each chunk's mean).  The same numbers up to rounding, with the temporaries of ``chunk``
    examples instead of N (one forward of a LeNet over 60,000 MNIST images holds a 3.5 GB im2col matrix)."""
    N = x.shape[0]
    if N <= chunk:
        return evaluate(cfg, params, state, x, d, model=model)

    def part(xd):
        xc, dc = xd
        loss, acc = evaluate(cfg, params, state, xc, dc, model=model)
        return loss * xc.shape[0], acc * xc.shape[0]

    full = (N // chunk) * chunk
    chunks = jax.tree_util.tree_map(lambda v: v[:full].reshape((N // chunk, chunk) + v.shape[1:]), (x, d))
    loss_sums, hits = jax.lax.map(part, chunks)
    loss, hit = jnp.sum(loss_sums), jnp.sum(hits)
    if full < N:
        rest_loss, rest_hit = part((x[full:], d[full:]))
        loss, hit = loss + rest_loss, hit + rest_hit
    return loss / N, hit / N


def _learning_rate(schedule, step, opt_state):
    """eta at ``step``: from ``record_learning_rate``, else from an ``optax.inject_hyperparams`` state, else None."""
    if schedule is not None:
        return float(schedule(jnp.asarray(step))) if callable(schedule) else float(schedule)
    injected = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
                if "learning_rate" in getattr(s, "hyperparams", {})]
    return float(injected[0].hyperparams["learning_rate"]) if injected else None


def _uses_batch_norm(net):
    return any(not n.aux and extensions.couples_examples(rule_of(n.op) or n.op) for n in net.nodes)


def _output_width(cfg, m, params, state, x):
    """The model's number of outputs (last axis of y), from its shapes alone (nothing is computed)."""
    if x is None:
        return None
    y = jax.eval_shape(lambda p, s, x_: forward(cfg, p, s, x_, model=m)[0], params, state, jnp.asarray(x))
    return int(y.shape[-1])


def _check_recipe(cfg, m, params, x, micro_batch):
    """What the recipe needs from the model and the data, checked before anything is compiled."""
    net = m.graph(params, train=True)
    if _uses_batch_norm(net) and micro_batch < 2:
        raise ValueError(f"{_FN}: batch norm in training needs at least 2 examples per batch (per micro-batch with "
                         f"accumulate), got {micro_batch}: with one example the normalised activation is 0 and the "
                         f"layer outputs beta whatever the input (PyTorch refuses it too)")
    if cfg.dp_clip:
        extension_layers(net, f"{_FN} (DP-SGD, dp_clip={cfg.dp_clip})")     # batch norm, a node without extension: named
    if cfg.augment:
        if x.ndim != 4:
            raise ValueError(f"{_FN}: augment={cfg.augment} shifts images (batch, H, W, C); the training inputs have "
                             f"shape {tuple(x.shape)}")
        check_shift(cfg.augment, x.shape[1:], f"{_FN}: augment")


def train(params, opt, data, *, key, epochs, batch_size=64, cfg=Config(), model=None, opt_state=None, state=None,
          accumulate=1, start_epoch=0, start_step=0, record_learning_rate=None, progress=None, on_epoch=None, mesh=None):
    """Train ``params`` on ``data`` for ``epochs`` epochs; returns a ``TrainResult``.

    Args:
      params: the model's parameters (``model.init``; ``fnbp.mlp.init`` without a model).
      opt: an optax-compatible GradientTransformation (``fnbp.optim.adam(1e-3)``, any optax one).
      data: a ``fnbp.data.Dataset`` (x_train, y_train, x_test, y_test, ...).
      key: ``jax.random`` key: epoch e shuffles with ``fold_in(key, e)``.
      epochs: total number of epochs (training runs epochs ``start_epoch .. epochs-1``).
      batch_size: examples per step: ``None`` = full batch, 1 = one example at a
        time (SGD), else mini-batch.  See ``batch_plan`` for the remainder.
      cfg: the training recipe (``Config``): loss, L2, gradient mode, DP-SGD, augmentation.
      model: any ``fnbp.nn`` model (``fnbp.nn.serial(...)``, ``fnbp.nn.lenet(...)``); None: ``cfg``'s MLP.
      opt_state, state: optimizer state and batch-norm statistics to resume from
        (default: fresh ``opt.init(params)`` and ``model.init_state(params)``).
      accumulate: micro-batches per step (gradient accumulation).
      start_epoch, start_step: where a resumed run starts (from a checkpoint).
      record_learning_rate: a number or schedule k -> eta_k written into the history (it does not
        set anything: ``opt`` has its own).  Default: read from an ``optax.inject_hyperparams``
        state in ``opt_state`` when there is one, else the history's learning_rate is None.
      progress: show a tqdm bar (loss, accuracy, examples/s); default: only when stderr is a terminal.
      on_epoch: callback ``on_epoch(result_so_far)`` after every good epoch (e.g. to
        write a checkpoint).
      mesh: a ``jax.sharding.Mesh`` with one axis ``"data"`` for data-parallel
        training (see ``fnbp.parallel``); None for one device.

    Checks before anything is compiled (on the host, once): integer hyperparameters
    (TypeError for bool/float/str, ValueError below their minimum), every split's
    labels (``check_labels``) and features finite, and the parameters, optimizer
    state and batch-norm statistics finite (``NonFiniteInputError``); batch norm
    with one example per batch is refused.

    During training each step also returns a finiteness flag of the new parameters,
    optimizer state and statistics (a reduction inside the jit-compiled scan; the
    host reads flags and losses once per epoch).  A NaN or inf loss raises
    ``NonFiniteLossError``, a non-finite parameter/state with a finite loss
    ``NonFiniteParamsError`` (both ``NonFiniteError``), naming the epoch and step,
    before ``on_epoch`` is called, so the last checkpoint written is the last good one.

    History entries: epoch, loss (mean training loss over the epoch's steps),
    test_loss, test_accuracy, train_accuracy, learning_rate (at the epoch's last
    step), seconds, examples_per_s (compile time excluded).
    """
    epochs, batch_size, accumulate, start_epoch, start_step = _check_hyperparameters(
        opt, key, epochs, batch_size, accumulate, start_epoch, start_step, on_epoch)
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"{_FN}: on_epoch must be callable or None, got {type(on_epoch).__name__}")
    m = resolve_model(cfg, model)
    params, opt_state, state, arrays, B, n_steps, batch_sharding = _prepare(
        cfg, m, opt, data, params, opt_state, state, batch_size, accumulate, mesh)
    x_train, y_train, x_test, y_test = arrays

    epoch_fn = jax.jit(_make_epoch(cfg, opt, model=m, batch_size=B, n_examples=x_train.shape[0],
                                   accumulate=accumulate, batch_sharding=batch_sharding, finite_flags=True),
                       donate_argnums=(0, 1, 2))
    eval_fn = jax.jit(functools.partial(evaluate if mesh is not None else evaluate_in_chunks, cfg, model=m))
    t0 = time.perf_counter()
    compiled = epoch_fn.lower(params, opt_state, state, x_train, y_train, jax.random.fold_in(key, start_epoch)).compile()
    compile_seconds = time.perf_counter() - t0

    bar = _progress_bar(progress, epochs - start_epoch)
    history, step = [], start_step
    result = TrainResult(params, opt_state, state, key, start_epoch, step, history, compile_seconds)
    for epoch in range(start_epoch, epochs):
        t = time.perf_counter()
        params, opt_state, state, step_losses, step_finite = compiled(params, opt_state, state, x_train, y_train,
                                                                      jax.random.fold_in(key, epoch))
        step_losses, step_finite = np.asarray(step_losses), np.asarray(step_finite)   # the epoch's one host sync
        seconds = time.perf_counter() - t
        _raise_if_not_finite(step_losses, step_finite, epoch, step, n_steps)
        step += n_steps
        test_loss, test_acc = eval_fn(params, state, x_test, y_test)
        _, train_acc = eval_fn(params, state, x_train, y_train)
        record = {"epoch": epoch + 1, "loss": float(step_losses.mean()), "test_loss": float(test_loss),
                  "test_accuracy": float(test_acc), "train_accuracy": float(train_acc),
                  "learning_rate": _learning_rate(record_learning_rate, step - 1, opt_state), "seconds": seconds,
                  "examples_per_s": n_steps * B / seconds}
        history.append(record)
        result = TrainResult(params, opt_state, state, key, epoch + 1, step, history, compile_seconds)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['test_accuracy']:.4f}",
                            ex_s=f"{record['examples_per_s']:.0f}")
            bar.update(1)
        if on_epoch is not None:
            on_epoch(result)
    if bar is not None:
        bar.close()
    return result


def _prepare(cfg, m, opt, data, params, opt_state, state, batch_size, accumulate, mesh):
    """``train``'s checks and placement, on the host before anything is compiled.

    Returns ``(params, opt_state, state, (x_train, y_train, x_test, y_test), B, n_steps, batch_sharding)``:
    copies of the caller's trees (the epoch donates its buffers), the data as device arrays (sharded over
    ``mesh``'s ``"data"`` axis when one is given), B examples per step and n_steps steps per epoch.
    """
    x_first = np.asarray(data.x_train)[:2] if hasattr(data, "x_train") else None
    m.check_params(params, x_first, name=_FN)
    state = m.init_state(params) if state is None else state
    _check_data(data, _output_width(cfg, m, params, state, x_first))
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    opt_state = opt.init(params) if opt_state is None else opt_state
    _check_finite_tree("params", params)
    _check_finite_tree("opt_state", opt_state)
    _check_finite_tree("state", state)
    B, n_steps = batch_plan(x_train.shape[0], batch_size, accumulate)
    _check_recipe(cfg, m, params, x_train, B // accumulate)
    params, opt_state, state = jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), (params, opt_state, state))
    batch_sharding = None
    if mesh is not None:
        from . import parallel
        params, opt_state, state, x_train, y_train, batch_sharding = parallel.place(
            mesh, B, params, opt_state, state, x_train, y_train)
        x_test, y_test = parallel.replicate(mesh, (x_test, y_test))    # evaluation inputs on the same devices
    return params, opt_state, state, (x_train, y_train, x_test, y_test), B, n_steps, batch_sharding


def _progress_bar(progress, total):
    """A tqdm bar over ``total`` epochs, or None; ``progress=None`` means: only when stderr is a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="fnbp train", unit="epoch", leave=True)


def _raise_if_not_finite(step_losses, step_finite, epoch, step, n_steps):
    """Raise ``NonFiniteLossError`` / ``NonFiniteParamsError`` naming the first bad step of the epoch."""
    bad = np.flatnonzero(~np.isfinite(step_losses) | ~step_finite)
    if not bad.size:
        return
    i = int(bad[0])
    where = (f"at epoch {epoch} (0-based), step {i} of {n_steps} in that epoch (global step {step + i}); "
             f"training stopped, the parameters of this epoch are discarded and no checkpoint was written "
             f"for it")
    if not np.isfinite(step_losses[i]):
        raise NonFiniteLossError(f"fnbp.train: the training loss became {step_losses[i]} {where} "
                                 f"(lower the learning rate?)")
    raise NonFiniteParamsError(f"fnbp.train: the parameters, optimizer state or batch-norm statistics became "
                               f"NaN or inf {where} (a non-finite gradient or update; lower the learning "
                               f"rate?)")
