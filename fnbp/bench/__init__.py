"""fnbp.bench -- fnbp's hand-written rules vs JAX autodiff vs PyTorch vs the machine's GEMM rate.

Run it as ``fnbp bench`` (``--quick`` for a short run, ``--help`` for the options),
``python -m fnbp.bench``, or ``python -m experiments.bench`` in a source checkout (which also
writes ``experiments/results/bench.{json,md}`` after a full run). Nothing here asserts speed:
speed goals are ratios measured side by side in one run and reported, never tested.

The reference case (``train_step``) times one full training step (forward, backward, Adam
update) of the 784-512-512-10 ReLU network with softmax cross-entropy, float32, for

1. ``fnbp_autodiff``: ``jax.value_and_grad`` through fnbp's custom_vjp layers
   (``fnbp.mlp.apply`` + ``fnbp.losses.softmax_cross_entropy``) + ``fnbp.optim.adam``;
2. ``fnbp_backprop``: the explicit loop ``fnbp.backprop.backprop`` + ``fnbp.optim.adam``;
3. ``peer_jax``: ``jax.value_and_grad`` of a plain-jnp forward (``h @ W.T + b``,
   ``jax.nn.relu``, ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``) + ``optax.adam``;
4. ``torch_eager``: PyTorch eager on CPU, same model, ``torch.optim.Adam`` (skipped with a
   note when torch is not installed; it is not a dependency of fnbp);
5. ``gemm``: the limit, a jit-compiled ``a @ b`` on random square float32 matrices at the
   size with the best rate in the ``gemm`` case's sweep over ``--gemm-sizes``.

1-3 are jit-compiled with the parameter and optimizer buffers donated. All variants of one
batch size are interleaved (``harness.interleaved``: one step of each per round, in a random
order per round -- a few in a row for a reference much faster than the slowest --) so that
drift on a shared machine hits all alike, after a warm-up, until every variant has at least
``--min-time`` seconds of samples. Reported per variant: median ms/step and its spread (IQR,
min-max), examples/s, GFLOP/s (``steps.step_flops``), the fraction of the GEMM rate measured in
the same rounds, the ratio to the peer (3) -- ratio of medians and median of the per-round
ratios --, compile time and XLA's temp memory; all also in process CPU time (all threads).

Modules: ``harness`` (interleaved timing, medians, paired ratios, machine, HLO inspection),
``steps`` (FLOP count, the compared steps and runners), ``cases`` (the GEMM limit, the MLP
step, weight-gradient layouts, the optimizer alone, per-example gradients), ``simulated``
(data parallel over simulated CPU devices, in a subprocess), ``multiprocess`` (several
processes), ``per_example_rules`` (per-example norms and DP-SGD), ``lenet`` (the LeNet step of
issue #13: fnbp's rules in fnbp's scan loop vs ``jax.grad`` through ``lax`` convolutions, jit per
step and in scan, vs PyTorch eager), ``lenet_run`` (whole-run images/s of ``fnbp train --data mnist --model
lenet`` vs a plain PyTorch loop in a child process, ``_torch_lenet_run.py``), ``text_run`` (``fnbp train --data
shakespeare --model lstm`` vs PyTorch's ``nn.LSTM`` in a child process, ``_torch_text_run.py``: validation loss
at the same training time, ``--text-seconds``), ``report`` (markdown and stdout),
``registry`` (the case registry), ``run`` (the command line).

Adding a case (a section of the report: e.g. more per-example or data-parallel rows; see
``lenet.py`` for a whole one). Write ``fnbp/bench/<topic>.py``::

    from . import harness
    from .registry import register

    def run(ctx):                      # ctx: registry.Context (sizes, batch_sizes, min_time, seed,
        runners = {...}                # quick, cores, log, results of earlier cases, ...)
        samples = harness.interleaved(runners, ctx.min_time)          # side by side, never alone
        rows = {n: harness.summarize(samples[n]) for n in runners}
        return {"variants": rows,
                "ratio_paired": harness.paired_ratio(samples["ours"], samples["peer"])}

    def render(section, result):       # -> markdown lines
        return ["## My case\\n", f"ours / peer: {section['ratio_paired']['median']:.3f}", ""]

    register("my_case", run=run, render=render, help="one line for --help")

and append ``"fnbp.bench.<topic>"`` to ``registry.CASE_MODULES``. Its result lands in the JSON
report under ``"my_case"``; ``fnbp bench --cases my_case`` runs it alone (with the cases it
``requires``). The MLP rows keep their meaning: other work compares against them.
"""
from .harness import interleaved, paired_ratio, summarize
from .registry import CASES, Case, Context, load_cases, register
from .report import render_markdown
from .run import build_parser, main
from .steps import step_flops, weight_counts

__all__ = ["main", "build_parser", "register", "Case", "Context", "CASES", "load_cases", "interleaved",
           "summarize", "paired_ratio", "render_markdown", "step_flops", "weight_counts"]
