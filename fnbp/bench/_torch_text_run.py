"""A plain PyTorch training loop for the ``text_run`` case of ``fnbp.bench`` (run as a script, by a Python that
has torch: it imports numpy and torch only, never fnbp or jax).

    <torch python> fnbp/bench/_torch_text_run.py DATA.npz --threads 2

DATA.npz holds what fnbp's run uses: the token ids ``train`` and ``validation`` (int32), fnbp's initial weights
E (V, d), W_x (4H, d), W_h (4H, H), b (4H,), W_out (V, H), b_out (V,) (float32), and the recipe of ``fnbp train
--data shakespeare --model lstm``: batch_size B, seq_len T, eval_rows, lr, lr_schedule (constant, inverse or
exponential), lr_decay, clip (0 = none), steps_per_epoch (0 = a whole pass), seconds (the training-time budget),
dropout (the drop probability on the LSTM's outputs, training only; 0 = none), seed (``torch.manual_seed``: the
dropout masks are PyTorch's own draws, not fnbp's) and ``offsets`` (epoch e reads the training stream from
offsets[e], the offset fnbp's epoch e drew).

The model: ``nn.Embedding(V, d)`` -> ``nn.LSTM(d, H, batch_first=True)`` -> ``nn.Linear(H, V)`` on every step,
weight_ih = W_x, weight_hh = W_h (PyTorch's gate order i, f, g, o is fnbp's), bias_ih = b and bias_hh = 0 held
fixed (fnbp.rnn.lstm's one bias is PyTorch's b_ih + b_hh: a second trainable bias would be a different model,
moving twice as fast under Adam), mean cross-entropy over the B T tokens.  The recipe, as fnbp's
(``fnbp._cli_text.train``): d2l's sequential partitioning of the stream from the epoch's offset into B rows read in
chunks of T, the state (h, c) carried from chunk to chunk with its gradient cut (``detach``), from zeros at each
epoch's start; ``torch.nn.utils.clip_grad_norm_(clip)`` (which divides by norm + 1e-6 where fnbp divides by the
norm: a relative difference of 1e-6/norm in the clipped gradient), then ``torch.optim.Adam`` (betas 0.9, 0.999,
eps 1e-8: optax's and fnbp's formula) with the learning rate of step k (0 for the first) set before the step:
eta_0, eta_0 / (1 + k delta) or eta_0 exp(-k delta).  Validation (``fnbp.charlm.evaluate``): the whole validation
stream as eval_rows rows from offset 0, chunks of T, state carried; the mean of the chunks' mean losses.

Protocol: prints ``ready`` once built; then for each line ``epoch`` on stdin it runs the next epoch -- stopping
after steps_per_epoch chunks, or as soon as the cumulative training time reaches ``seconds`` -- and prints one
JSON line {"epoch", "seconds" (the epoch's training steps), "eval_seconds", "loss" (mean of its chunks'),
"valid_loss", "steps", "grad_norm" (mean, before clipping), "learning_rate" (at its last step), "chars_per_s",
"stopped" (true once the budget is spent)}; ``eval`` prints {"valid_loss"} of the weights as they are (no
training); ``quit`` (or end of input) ends it.
"""
import argparse
import json
import math
import sys
import time

import numpy as np


def sequential_chunks(ids, rows, seq_len, offset=0):
    """(x, y) int64 arrays (rows, seq_len): the stream ids[offset:] cut into ``rows`` equal rows, chunk k its
    columns [k T, (k+1) T) (``fnbp.text.sequential_batches``)."""
    row = (len(ids) - offset - 1) // rows
    xs = ids[offset:offset + rows * row].reshape(rows, row).astype(np.int64)
    ys = ids[offset + 1:offset + 1 + rows * row].reshape(rows, row).astype(np.int64)
    for k in range(row // seq_len):
        yield xs[:, k * seq_len:(k + 1) * seq_len], ys[:, k * seq_len:(k + 1) * seq_len]


def learning_rate(schedule, lr, decay, k):
    """eta_k of ``fnbp train --lr-schedule`` (k = 0 for the first update)."""
    if schedule == "constant":
        return lr
    if schedule == "inverse":
        return lr / (1 + k * decay)
    return lr * math.exp(-k * decay)


def main(argv=None):
    import torch                                      # here: importing this module needs no torch
    import torch.nn.functional as F
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    z = np.load(a.data)
    train_ids, valid_ids, offsets = z["train"], z["validation"], z["offsets"]
    B, T, eval_rows = int(z["batch_size"]), int(z["seq_len"]), int(z["eval_rows"])
    lr0, schedule, decay, clip = float(z["lr"]), str(z["lr_schedule"]), float(z["lr_decay"]), float(z["clip"])
    steps_per_epoch, budget = int(z["steps_per_epoch"]), float(z["seconds"])
    dropout = float(z["dropout"]) if "dropout" in z else 0.0
    torch.manual_seed(int(z["seed"]) if "seed" in z else 0)
    V, d = z["E"].shape
    H = z["W_h"].shape[1]
    emb = torch.nn.Embedding(V, d)
    lstm = torch.nn.LSTM(d, H, batch_first=True)
    out = torch.nn.Linear(H, V)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(z["E"]))
        lstm.weight_ih_l0.copy_(torch.from_numpy(z["W_x"]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(z["W_h"]))
        lstm.bias_ih_l0.copy_(torch.from_numpy(z["b"]))
        lstm.bias_hh_l0.zero_()
        out.weight.copy_(torch.from_numpy(z["W_out"]))
        out.bias.copy_(torch.from_numpy(z["b_out"]))
    lstm.bias_hh_l0.requires_grad_(False)             # fnbp's b is b_ih + b_hh: one trainable bias
    params = [emb.weight, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, out.weight, out.bias]
    opt = torch.optim.Adam(params, lr=lr0)

    def zero_state(rows):
        h = torch.zeros(1, rows, H)
        return h, h.clone()

    def chunk_loss(x, y, state, train=False):
        hs, state = lstm(emb(torch.from_numpy(x)), state)
        if train and dropout:
            hs = F.dropout(hs, dropout, training=True)        # inverted dropout, as fnbp.dropout
        logits = out(hs)
        return F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1)), state

    def validation_loss():
        total, n = 0.0, 0
        state = zero_state(eval_rows)
        with torch.no_grad():
            for x, y in sequential_chunks(valid_ids, eval_rows, T):
                E, state = chunk_loss(x, y, state)
                total, n = total + float(E), n + 1
        return total / n

    print("ready", flush=True)
    epoch, step, trained = 0, 0, 0.0
    for line in sys.stdin:
        if line.strip() == "eval":
            print(json.dumps({"valid_loss": validation_loss()}), flush=True)
            continue
        if line.strip() != "epoch":
            break
        state = zero_state(B)
        losses, norms, stopped = [], [], False
        t = time.perf_counter()
        for x, y in sequential_chunks(train_ids, B, T, int(offsets[epoch])):
            if steps_per_epoch and len(losses) == steps_per_epoch:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(schedule, lr0, decay, step)
            opt.zero_grad(set_to_none=True)
            E, state = chunk_loss(x, y, state, train=True)
            state = (state[0].detach(), state[1].detach())
            E.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip else
                         float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.grad)
                                                                     for q in params]))))
            opt.step()
            losses.append(float(E.detach()))
            step += 1
            if trained + time.perf_counter() - t >= budget:
                stopped = True
                break
        seconds = time.perf_counter() - t
        trained += seconds
        t_eval = time.perf_counter()
        valid = validation_loss()
        epoch += 1
        print(json.dumps({"epoch": epoch, "seconds": seconds, "eval_seconds": time.perf_counter() - t_eval,
                          "loss": float(np.mean(losses)), "valid_loss": valid, "steps": len(losses),
                          "grad_norm": float(np.mean(norms)),
                          "learning_rate": learning_rate(schedule, lr0, decay, step - 1),
                          "chars_per_s": len(losses) * B * T / seconds, "stopped": stopped}), flush=True)


if __name__ == "__main__":
    main()
