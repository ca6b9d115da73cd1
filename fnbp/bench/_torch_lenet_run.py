"""A plain PyTorch training loop for the ``lenet_run`` case of ``fnbp.bench`` (run as a script, by a Python that
has torch: it imports numpy and torch only, never fnbp or jax).

    <torch python> fnbp/bench/_torch_lenet_run.py DATA.npz --threads 2

DATA.npz holds the same tensors as fnbp's run: x_train (N, 28, 28, 1) float32, y_train, x_test, y_test, and the
initial weights W0, b0, ... (fnbp.nn.lenet's order: conv, conv, dense, dense; W in PyTorch's own layouts), plus
the recipe: batch_size, lr, dropout, augment, seed.  The same recipe as ``fnbp train --data mnist --model lenet``:
per epoch a fresh permutation, mini-batches gathered by index (the remainder dropped), each image shifted by its
own random (dy, dx) in [-augment, augment]^2 (zeros shifted in), Conv-ReLU-MaxPool x 2, flatten in NHWC order,
dropout before each dense layer, Adam, mean cross-entropy; after the epoch the test loss and accuracy and the
training accuracy, in eval mode (what ``fnbp.train.train`` records per epoch).

Protocol: prints ``ready`` once built; then for each line ``epoch`` on stdin it runs one epoch and prints one
JSON line {"seconds", "train_seconds", "loss", "test_loss", "test_accuracy",
"train_accuracy"}; ``eval`` prints {"test_loss", "test_accuracy"} of the weights as they are (no training);
``quit`` (or end of input) ends it.
"""
import argparse
import json
import sys
import time

import numpy as np


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
    B, lr, drop, aug = int(z["batch_size"]), float(z["lr"]), float(z["dropout"]), int(z["augment"])
    g = torch.Generator().manual_seed(int(z["seed"]))
    torch.manual_seed(int(z["seed"]))
    to_nchw = lambda v: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2)))     # noqa: E731
    x_train, x_test = to_nchw(z["x_train"]), to_nchw(z["x_test"])
    y_train, y_test = (torch.from_numpy(z[k].astype(np.int64)) for k in ("y_train", "y_test"))
    Ws = [torch.from_numpy(z[f"W{i}"].copy()) for i in range(4)]
    bs = [torch.from_numpy(z[f"b{i}"].copy()) for i in range(4)]
    convs = [torch.nn.Conv2d(W.shape[1], W.shape[0], tuple(W.shape[2:])) for W in Ws[:2]]
    linears = [torch.nn.Linear(W.shape[1], W.shape[0]) for W in Ws[2:]]
    with torch.no_grad():
        for m, W, b in zip(convs + linears, Ws, bs):
            m.weight.copy_(W)
            m.bias.copy_(b)
    params = [q for m in convs + linears for q in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    def logits(x, train):
        h = x
        for conv in convs:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)            # fnbp flattens NHWC
        for k, lin in enumerate(linears):
            h = lin(F.dropout(h, drop, training=train) if drop else h)
            h = F.relu(h) if k < len(linears) - 1 else h
        return h

    N, H, W_ = x_train.shape[0], x_train.shape[2], x_train.shape[3]
    ar_h, ar_w = torch.arange(H), torch.arange(W_)

    def shift(x):
        if not aug:
            return x
        s = torch.randint(0, 2 * aug + 1, (x.shape[0], 2), generator=g)
        padded = F.pad(x, (aug, aug, aug, aug))
        rows = (s[:, 0, None] + ar_h)[:, :, None]                     # (B, H, 1)
        cols = (s[:, 1, None] + ar_w)[:, None, :]                     # (B, 1, W)
        n = torch.arange(x.shape[0])[:, None, None]
        return padded[n, 0, rows, cols][:, None]

    def evaluate(x, y):
        correct, loss = 0, 0.0
        with torch.no_grad():
            for i in range(0, x.shape[0], 1000):
                out = logits(x[i:i + 1000], False)
                loss += float(F.cross_entropy(out, y[i:i + 1000], reduction="sum"))
                correct += int((out.argmax(1) == y[i:i + 1000]).sum())
        return loss / x.shape[0], correct / x.shape[0]

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "eval":
            test_loss, test_acc = evaluate(x_test, y_test)
            print(json.dumps({"test_loss": test_loss, "test_accuracy": test_acc}), flush=True)
            continue
        if line.strip() != "epoch":
            break
        t0 = time.perf_counter()
        perm = torch.randperm(N, generator=g)
        losses = []
        for i in range(N // B):
            idx = perm[i * B:(i + 1) * B]
            xb, yb = shift(x_train[idx]), y_train[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(logits(xb, True), yb)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        train_seconds = time.perf_counter() - t0
        test_loss, test_acc = evaluate(x_test, y_test)
        _, train_acc = evaluate(x_train, y_train)
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "train_seconds": train_seconds,
                          "loss": float(torch.stack(losses).mean()), "test_loss": test_loss,
                          "test_accuracy": test_acc, "train_accuracy": train_acc}), flush=True)


if __name__ == "__main__":
    main()
