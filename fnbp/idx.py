"""IDX files, the format of MNIST (http://yann.lecun.com/exdb/mnist/): :func:`read_idx` and :func:`write_idx`.

An IDX file is a 4-byte magic number -- two zero bytes, a type code, the number of dimensions
``ndim`` -- then ``ndim`` big-endian uint32 sizes, then the array's elements, big-endian, in C
order. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
(MNIST's images are ``0x00000803`` = 2051, uint8 of shape (count, 28, 28); its labels
``0x00000801`` = 2049, uint8 of shape (count,)). A name ending in ``.gz`` is gzip-compressed.

``fnbp.data`` re-exports these names (``fnbp.data.read_idx`` etc.) and builds the MNIST loader on them.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDXFormatError", "read_idx", "write_idx", "IDX_DTYPES"]


class IDXFormatError(ValueError):
    """An IDX file (or a pair of MNIST files) is corrupt or inconsistent; the message names the file."""


# IDX type code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODE_OF = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"fnbp.idx.read_idx: file not found: {path}")
    if path.is_dir():
        raise IDXFormatError(f"fnbp.idx.read_idx: {path} is a directory, expected an IDX file")
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise IDXFormatError(
                f"fnbp.idx.read_idx: {path}: not a valid gzip file or the gzip stream is cut short "
                f"({type(e).__name__}: {e})"
            ) from e
    return path.read_bytes()


def read_idx(path) -> np.ndarray:
    """Read one IDX file (``.gz`` names are decompressed transparently) into a numpy array.

    Header: bytes 0-1 must be zero, byte 2 is the type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), byte 3 the number of dimensions, then one big-endian
    uint32 per dimension; the payload is the big-endian data in C order. The result has the native
    byte order and shape ``dims``.

    Raises ``FileNotFoundError`` for a missing file and :class:`IDXFormatError` (a ``ValueError``)
    naming the file for: a bad gzip stream, a header shorter than its declared size, a bad magic
    number (expected and found values given), a payload shorter or longer than the dims imply
    (expected N bytes, got M).
    """
    path = Path(path)
    raw = _read_bytes(path)
    fn = "fnbp.idx.read_idx"
    if len(raw) < 4:
        raise IDXFormatError(f"{fn}: {path}: file too short for an IDX header: expected at least 4 bytes, got {len(raw)}")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise IDXFormatError(
            f"{fn}: {path}: bad magic number: expected 0x0000 followed by a type code in "
            f"{{0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E}} and ndim >= 1 (e.g. 2051 = 0x00000803 for "
            f"uint8 images, 2049 = 0x00000801 for uint8 labels), found {magic} = 0x{magic:08X}"
        )
    dtype = IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(
            f"{fn}: {path}: truncated header: ndim={ndim} needs {header} header bytes, got {len(raw)}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise IDXFormatError(
            f"{fn}: {path}: truncated payload: dims {dims} of {dtype.newbyteorder('=')} need "
            f"expected {expected} bytes, got {got}"
        )
    if got > expected:
        raise IDXFormatError(
            f"{fn}: {path}: payload longer than its header declares: dims {dims} of "
            f"{dtype.newbyteorder('=')} need expected {expected} bytes, got {got} ({got - expected} extra)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path, array) -> Path:
    """Write ``array`` as an IDX file at ``path`` (gzip-compressed when the name ends in ``.gz``).

    Supported dtypes: uint8, int8, int16, int32, float32, float64; 1 to 255 dimensions, each below
    2**32. The gzip header's mtime is 0, so equal arrays give byte-identical files. Parent
    directories must exist. Returns ``Path(path)``.
    """
    fn = "fnbp.idx.write_idx"
    path = Path(path)
    arr = np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _IDX_CODE_OF:
        raise ValueError(
            f"{fn}: {path}: unsupported dtype {arr.dtype}; IDX supports uint8, int8, int16, int32, "
            f"float32, float64"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"{fn}: {path}: IDX needs 1..255 dimensions, got ndim={arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"{fn}: {path}: dimension too large for IDX: shape {arr.shape}")
    code = _IDX_CODE_OF[native]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    data = header + payload
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
