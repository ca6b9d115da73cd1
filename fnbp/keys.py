"""Every random-key stream of fnbp, named in one place (``jax.random.fold_in`` tags).

A run is a pure function of its key: each use of randomness derives its key from the run's key
by ``fold_in`` with a tag written here, so no two streams can collide by accident.

    epoch e             fold_in(run_key, e)             permutation of the training set
    step i              fold_in(epoch_key, i)           the step's key: dropout masks, shifts, DP noise
    micro-batch m       fold_in(step_key, m)            gradient accumulation: each micro-batch's key
    dropout layer k     fold_in(step_key, k)            k = 0, 1, ... the model's dropout layers in order
    augmentation        fold_in(step_key, AUGMENT)      random shifts of the training images
    DP noise            fold_in(step_key, DP_NOISE)     N(0, sigma^2 C^2 I) of DP-SGD, once per step
    DP noise, leaf j    fold_in(noise_key, j)           one normal draw per parameter leaf
    per-example n       split(step_key, B)[n]           dropout masks of example n (per-example/DP walks)

The tags are those of fnbp's earlier releases, so runs reproduce bit for bit.  Dropout layers and micro-batches
share the small tags 0, 1, 2, ...; below DP_NOISE = 217 they cannot meet the DP noise's tag (a model with more
than 217 dropout layers, or more than 217 micro-batches per step, would).
"""
import jax

__all__ = ["AUGMENT", "DP_NOISE", "epoch", "step", "micro_batch", "dropout", "augment", "dp_noise", "leaf",
           "per_example"]

AUGMENT = 1 << 20        # dropout layers use the tags 0, 1, 2, ...: this one is far above them
DP_NOISE = 0x0D9


def epoch(run_key, e):
    """The key of epoch ``e`` (its permutation; its steps fold in their index)."""
    return jax.random.fold_in(run_key, e)


def step(epoch_key, i):
    """The key of step ``i`` of an epoch."""
    return jax.random.fold_in(epoch_key, i)


def micro_batch(step_key, m):
    """The key of micro-batch ``m`` of a step (gradient accumulation)."""
    return jax.random.fold_in(step_key, m)


def dropout(step_key, k):
    """The key of the model's ``k``-th dropout layer (0-based, in the order the model applies them)."""
    return jax.random.fold_in(step_key, k)


def augment(step_key):
    """The key of the step's random image shifts."""
    return jax.random.fold_in(step_key, AUGMENT)


def dp_noise(step_key):
    """The key of the step's DP-SGD noise."""
    return jax.random.fold_in(step_key, DP_NOISE)


def leaf(noise_key, j):
    """The key of parameter leaf ``j``'s noise draw."""
    return jax.random.fold_in(noise_key, j)


def per_example(step_key, batch_size):
    """One key per example (per-example dropout masks): ``split(step_key, B)``."""
    return jax.random.split(step_key, batch_size)
