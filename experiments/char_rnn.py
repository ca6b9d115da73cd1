"""Character-level Shakespeare: Elman vs GRU vs LSTM with hand-derived BPTT (fnbp.rnn).

Question (notes 001 -> recurrent networks; the notes' activation discussion): trained the same way for the same
wall-clock time, how far does each cell get on validation, what do its samples look like, and how does the
gradient of the last character's loss spread back through time -- does it vanish for the tanh (Elman) cell and
survive in the gated cells?

Setup: the shipped corpus (``fnbp.data.load_shakespeare``: 67 symbols, first 90 % train, last 10 % validation),
``fnbp.charlm`` models (embedding ``--embed`` -> cell of width ``--hidden`` -> dense on every step), stateful
truncated BPTT over d2l's sequential chunks (B = ``--batch`` rows, T = ``--seq-len``; the state carried across
chunks with its gradient cut; a fresh random offset per epoch from the seed's key), global-norm clipping 1
(``fnbp.optim.clip_by_global_norm``) then Adam ``--lr`` (``fnbp.optim.adam``), float32.  Each cell trains for
``--seconds`` of wall-clock time; validation loss (nats/char, over the whole validation stream, state carried) at
regular intervals.  Gradient norms through time: for the loss of the LAST character of a chunk, ||grad_{x_t} E||
(the gradient reaching the input embedding of step t, averaged over the batch) for t = 1..T, at initialisation and
after training.

    python experiments/char_rnn.py                 # writes experiments/results/char_rnn.{md,json,png}
    python experiments/char_rnn.py --quick --out /tmp/x
"""
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fnbp  # noqa: E402
from experiments import common  # noqa: E402
from fnbp import charlm, optim, text  # noqa: E402
from fnbp._malloc import keep_freed_memory  # noqa: E402

CELLS = ("elman", "gru", "lstm")


def grad_norms_through_time(params, ids, cell):
    """||grad_{x_t} E_T|| for t = 1..T, E_T the mean loss of the last character of each row (batch-averaged norm)."""
    x_ids, targets = ids[:, :-1], ids[:, 1:]

    def last_loss(x_emb):
        B = x_emb.shape[0]
        h0 = charlm.zero_state(params, B, cell)
        if cell == "lstm":
            hs, _ = fnbp.rnn.lstm(params["W_x"], params["W_h"], params["b"], x_emb, *h0)
        elif cell == "gru":
            hs = fnbp.rnn.gru(params["W_x"], params["W_h"], params["b"], params["b_h"], x_emb, h0)
        else:
            hs = fnbp.rnn.elman(params["W_x"], params["W_h"], params["b"], x_emb, h0)
        logits = fnbp.dense(params["W_out"], params["b_out"], hs[:, -1])
        return fnbp.losses.softmax_cross_entropy(logits, targets[:, -1])
    x_emb = fnbp.embedding(params["E"], x_ids)
    g = jax.grad(last_loss)(x_emb)                       # (B, T, d)
    return jnp.mean(jnp.linalg.norm(g, axis=-1), axis=0)


def train_cell(cell, corpus, args, key):
    V = len(corpus.vocab)
    key_init, key_epochs, key_sample = jax.random.split(key, 3)
    params = charlm.init(key_init, V, args.hidden, embed=args.embed, cell=cell)
    opt = optax.chain(optim.clip_by_global_norm(1.0), optim.adam(args.lr))
    step = charlm.make_train_step(opt, cell)
    opt_state = opt.init(params)
    probe = np.asarray(corpus.validation[:args.batch * (args.seq_len + 1)]).reshape(args.batch, args.seq_len + 1)
    norms_init = np.asarray(jax.jit(grad_norms_through_time, static_argnums=2)(params, probe, cell))
    valid = corpus.validation[:args.valid_chars] if args.valid_chars else corpus.validation
    curve = [{"step": 0, "seconds": 0.0, "valid": charlm.evaluate(params, valid, args.batch, args.seq_len, cell)}]
    first_loss, train_losses, grad_norms = None, [], []
    start, k, epoch, done = time.perf_counter(), 0, 0, False
    train_time = 0.0
    while not done:
        state = charlm.zero_state(params, args.batch, cell)
        for x, y in text.sequential_batches(corpus.train, args.batch, args.seq_len,
                                            key=jax.random.fold_in(key_epochs, epoch)):
            t0 = time.perf_counter()
            params, opt_state, state, E, gnorm = step(params, opt_state, state, x, y)
            E = float(E)
            train_time += time.perf_counter() - t0
            if first_loss is None:
                first_loss = E
            train_losses.append(E)
            grad_norms.append(float(gnorm))
            if not math.isfinite(E):
                raise FloatingPointError(f"char_rnn: {cell}'s loss is {E} at step {k}")
            k += 1
            if k % args.eval_every == 0 or train_time >= args.seconds:
                curve.append({"step": k, "seconds": train_time,
                              "train": float(np.mean(train_losses[-args.eval_every:])),
                              "valid": charlm.evaluate(params, valid, args.batch, args.seq_len, cell)})
                print(f"  {cell} step {k} ({train_time:.0f} s): valid {curve[-1]['valid']:.3f} nats/char", flush=True)
            if train_time >= args.seconds or (args.max_steps and k >= args.max_steps):
                done = True
                break
        epoch += 1
    if curve[-1]["step"] != k:
        curve.append({"step": k, "seconds": train_time, "train": float(np.mean(train_losses[-args.eval_every:])),
                      "valid": charlm.evaluate(params, valid, args.batch, args.seq_len, cell)})
    norms_trained = np.asarray(jax.jit(grad_norms_through_time, static_argnums=2)(params, probe, cell))
    prompt = text.encode("ROMEO:\n", corpus.vocab)
    sample = text.decode(charlm.sample(params, key_sample, prompt, args.sample_length, temperature=0.8, cell=cell),
                         corpus.vocab)
    return {"cell": cell, "first_loss": first_loss, "steps": k, "epochs_started": epoch,
            "train_seconds": train_time, "wall_seconds": time.perf_counter() - start, "curve": curve,
            "final_valid": curve[-1]["valid"], "grad_norm_per_step": grad_norms,
            "grad_norms_through_time": {"init": norms_init.tolist(), "trained": norms_trained.tolist()},
            "sample": "ROMEO:\n" + sample}


def main(argv=None):
    def add(p):
        p.add_argument("--cells", default=",".join(CELLS), help="comma-separated: elman, gru, lstm")
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--embed", type=int, default=64)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--seq-len", type=int, default=64)
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget per cell")
        p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
        p.add_argument("--eval-every", type=int, default=200, help="steps between validation evaluations")
        p.add_argument("--valid-chars", type=int, default=0, help="evaluate on the first N validation characters "
                                                                  "(0: all)")
        p.add_argument("--sample-length", type=int, default=400)
    args = common.parse_args("Elman vs GRU vs LSTM on character-level Shakespeare (hand-derived BPTT)", argv,
                             add_arguments=add)
    label = common.load_label(os.getloadavg()[0], common.busy_cores())
    keep_freed_memory()                                       # as fnbp train does: each cell's steps alike
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        raise SystemExit(f"char_rnn: --cells must be a comma-separated subset of {', '.join(CELLS)}, got "
                         f"{args.cells!r}")
    if args.quick:
        args.hidden, args.embed, args.batch, args.seq_len = 32, 16, 8, 16
        args.seconds, args.max_steps, args.eval_every, args.valid_chars, args.sample_length = 60.0, 40, 20, 4000, 60
    corpus = fnbp.data.load_shakespeare()
    V = len(corpus.vocab)
    results = {}
    with common.Timer() as timer:
        for i, cell in enumerate(cells):
            print(f"{cell}:", flush=True)
            results[cell] = train_cell(cell, corpus, args, jax.random.fold_in(jax.random.key(args.seed), i))

    fig, axes = common.plt.subplots(1, 2, figsize=(11, 4))
    for cell, r in results.items():
        axes[0].plot([p["seconds"] for p in r["curve"]], [p["valid"] for p in r["curve"]], marker="o", label=cell)
        for when, style in (("init", ":"), ("trained", "-")):
            axes[1].semilogy(np.arange(1, args.seq_len + 1), r["grad_norms_through_time"][when], style,
                             label=f"{cell} ({when})")
    axes[0].axhline(math.log(V), color="gray", lw=0.5)
    axes[0].set(xlabel="training seconds", ylabel="validation loss (nats/char)", title="validation")
    axes[1].set(xlabel="input step t (T = last)", ylabel="||grad_{x_t} E_T||", title="gradient of the last loss "
                "through time")
    axes[0].legend()
    axes[1].legend(fontsize=7)
    common.save_figure(fig, args.out, "char_rnn_curves.png")

    rows = [[cell, f"{r['first_loss']:.3f}", r["steps"], f"{r['train_seconds']:.0f}", f"{r['final_valid']:.3f}",
             f"{r['final_valid'] / math.log(2):.3f}",
             f"{r['grad_norms_through_time']['trained'][0] / r['grad_norms_through_time']['trained'][-1]:.1e}"]
            for cell, r in results.items()]
    md = ["# Character-level Shakespeare: Elman vs GRU vs LSTM (hand-derived BPTT)", "",
          f"H = {args.hidden}, embedding {args.embed}, B = {args.batch}, T = {args.seq_len}, stateful truncated "
          f"BPTT, clip 1 + Adam {args.lr}, {args.seconds:.0f} s per cell ({label}); "
          f"ln V = {math.log(V):.3f}.", "",
          common.md_table(["cell", "first loss", "steps", "train s", "valid nats/char", "valid bits/char",
                           "|g_x1| / |g_xT| trained"], rows), "",
          "![curves](char_rnn_curves.png)", ""]
    for cell, r in results.items():
        md += [f"## {cell} sample (temperature 0.8)", "", "```text", r["sample"], "```", ""]
    common.write_results(args.out, "char_rnn", "\n".join(md), {"settings": vars(args) | {"out": str(args.out)},
                                                               "results": results}, args=args, seconds=timer.seconds)
    return results


if __name__ == "__main__":
    main()
