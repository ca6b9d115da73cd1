"""Tests for fnbp.idx: IDX round trips for every supported dtype, and corrupt files named in the error."""
import gzip

import numpy as np
import pytest

from fnbp import data, idx


def test_data_reexports_the_idx_api():
    """fnbp.data keeps its public IDX names (the MNIST loader is built on them)."""
    assert (data.read_idx, data.write_idx, data.IDXFormatError) == (idx.read_idx, idx.write_idx, idx.IDXFormatError)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_images_and_labels(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    pi = idx.write_idx(tmp_path / f"img{suffix}", images)
    pl = idx.write_idx(tmp_path / f"lab{suffix}", labels)
    raw_i = gzip.decompress(pi.read_bytes()) if suffix else pi.read_bytes()
    raw_l = gzip.decompress(pl.read_bytes()) if suffix else pl.read_bytes()
    assert int.from_bytes(raw_i[:4], "big") == 2051  # the official MNIST image magic
    assert int.from_bytes(raw_l[:4], "big") == 2049  # the official MNIST label magic
    assert [int.from_bytes(raw_i[4 + 4 * i: 8 + 4 * i], "big") for i in range(3)] == [7, 5, 3]
    assert len(raw_i) == 16 + 7 * 5 * 3
    got_i, got_l = idx.read_idx(pi), idx.read_idx(pl)
    assert got_i.dtype == np.uint8 and got_l.dtype == np.uint8
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip_other_dtypes(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    got = idx.read_idx(idx.write_idx(tmp_path / "a.idx", a))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, a)


def test_idx_bad_magic_names_file(tmp_path):
    p = idx.write_idx(tmp_path / "bad-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8))
    raw = bytearray(p.read_bytes())
    raw[0:2] = b"\x12\x34"
    p.write_bytes(bytes(raw))
    with pytest.raises(idx.IDXFormatError) as ei:
        idx.read_idx(p)
    msg = str(ei.value)
    assert str(p) in msg and "bad magic" in msg
    assert "expected" in msg and "0x12340803" in msg  # what was found
    assert isinstance(ei.value, ValueError)


def test_idx_truncated_payload_names_file_and_sizes(tmp_path):
    p = idx.write_idx(tmp_path / "short", np.zeros((4, 5, 6), np.uint8))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(idx.IDXFormatError, match=r"expected 120 bytes, got 110") as ei:
        idx.read_idx(p)
    assert str(p) in str(ei.value) and "truncated" in str(ei.value)


def test_idx_truncated_gzip_and_header_rejected(tmp_path):
    p = idx.write_idx(tmp_path / "short.gz", np.arange(1000, dtype=np.int32))
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(idx.IDXFormatError) as ei:
        idx.read_idx(p)
    assert str(p) in str(ei.value)
    q = tmp_path / "tiny"
    q.write_bytes(b"\x00\x00")
    with pytest.raises(idx.IDXFormatError, match="tiny"):
        idx.read_idx(q)
    r = tmp_path / "hdr"
    r.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")  # declares 3 dims, has 1
    with pytest.raises(idx.IDXFormatError, match="truncated header"):
        idx.read_idx(r)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte"):
        idx.read_idx(tmp_path / "nope-idx1-ubyte")


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype"):
        idx.write_idx(tmp_path / "x", np.zeros(3, np.uint16))
