"""IDX files, the format Fashion-MNIST ships in: parsing with validation (sizes bounded by the
header, gzip streamed in pieces), reading and writing."""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist import FmnistError
from fmnist.io import atomic_open

GUNZIP_PIECE = 1 << 20  # bytes decompressed at a time
MAX_IDX_BYTES = 1 << 32  # an IDX payload larger than 4 GiB is refused from its header


class DataError(FmnistError):
    """A data file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name on the mirror, gzipped
    size: int  # bytes of the decompressed payload
    sha256: str  # of the decompressed payload



# IDX element types: the third byte of the magic number.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"



def gunzip_stream(chunks: Iterable[bytes], origin: str) -> Iterator[bytes]:
    """The decompressed bytes of gzip data (one member or several, as gzip reads them) arriving
    in `chunks`, in pieces of at most GUNZIP_PIECE bytes, decompressed only as they are taken:
    a consumer that stops early bounds the time and memory a gzip bomb costs, whatever its ratio."""
    decompressor, fed = zlib.decompressobj(wbits=31), False
    try:
        for chunk in chunks:
            while chunk:
                fed = True
                piece = decompressor.decompress(chunk, GUNZIP_PIECE)
                if piece:
                    yield piece
                if decompressor.eof:  # a member ended; another may follow
                    chunk, decompressor, fed = decompressor.unused_data, zlib.decompressobj(wbits=31), False
                else:
                    chunk = decompressor.unconsumed_tail
            while fed and not decompressor.eof and (piece := decompressor.decompress(b"", GUNZIP_PIECE)):
                yield piece  # output held back by the piece limit
    except zlib.error as e:
        raise DataError(f"{origin}: corrupt or truncated gzip data ({e})") from None
    if fed and not decompressor.eof:
        raise DataError(f"{origin}: corrupt or truncated gzip data (it ends in the middle of a stream)")


def _file_chunks(f, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def _read_payload(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip, read no further than its IDX header says
    the data goes (and never beyond MAX_IDX_BYTES): a gzip bomb or a huge file costs nothing
    more than its header."""
    try:
        with path.open("rb") as f:
            head = f.read(2)
            if not head:
                raise DataError(f"{path}: empty file")
            if head == _GZIP_MAGIC:
                f.seek(0)
                return _bounded_idx(gunzip_stream(_file_chunks(f), str(path)), f"{path}", gzipped=True)
            if path.suffix == ".gz":
                raise DataError(f"{path}: not a gzip file (named .gz but has no gzip header)")
            f.seek(0)
            return _bounded_idx(_file_chunks(f), str(path), gzipped=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _bounded_idx(pieces: Iterator[bytes], name: str, gzipped: bool) -> bytes:
    """The bytes of an IDX payload, taken from `pieces` up to the size its header declares plus
    one (so parse_idx sees trailing bytes), refusing a declared size over MAX_IDX_BYTES."""
    data, expected = bytearray(), None
    for piece in pieces:
        data += piece
        if expected is None:
            expected = idx_size(bytes(data[:20]), name)
            if expected is not None and expected > MAX_IDX_BYTES:
                raise DataError(f"{name}: header declares {expected:,} bytes of data, more than the "
                                f"limit of {MAX_IDX_BYTES:,}")
        if expected is not None and len(data) > expected:
            raise DataError(f"{name}: unexpected trailing bytes after the {expected:,} bytes its header declares")
    if not data:
        raise DataError(f"{name}: empty file" + (" (after gunzip)" if gzipped else ""))
    return bytes(data)


def idx_size(head: bytes, name: str = "<bytes>") -> int | None:
    """The total size in bytes an IDX header declares (header included), once `head` holds
    the whole header; None before. Sizes are Python integers: no dimensions overflow them."""
    if len(head) < 4:
        return None
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{name}: bad magic number 0x{head[:4].hex()} (not an IDX file)")
    dtype = _IDX_DTYPES.get(head[2])
    if dtype is None:
        raise DataError(f"{name}: unknown IDX element type 0x{head[2]:02x}")
    ndim = head[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{name}: unsupported number of dimensions {ndim}")
    header = 4 + 4 * ndim
    if len(head) < header:
        return None
    return header + math.prod(struct.unpack(f">{ndim}I", head[4:header])) * dtype.itemsize


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX payload (already decompressed), checking its header against its length."""
    expected = idx_size(raw, name)
    if expected is None:
        header = 4 + 4 * raw[3] if len(raw) >= 4 else 4
        raise DataError(f"{name}: truncated IDX header ({len(raw)} of {header} bytes)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) < expected:
        raise DataError(
            f"{name}: truncated file: header says {dims} needing {expected} bytes, found {len(raw)}"
        )
    if len(raw) > expected:
        raise DataError(f"{name}: {len(raw) - expected} unexpected trailing bytes after the data")
    try:
        array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    except ValueError:  # an empty array whose other dimensions overflow numpy's index type
        raise DataError(f"{name}: IDX shape {dims} is too large for an array") from None
    return array.astype(dtype.newbyteorder("="), copy=True)


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, gzipped or raw, into a numpy array of its declared shape and type."""
    path = Path(path)
    return parse_idx(_read_payload(path), str(path))


def save_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when the name ends in .gz), atomically."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot hold {array.dtype}")
    big_endian = array.astype(_IDX_DTYPES[code], copy=False)
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big_endian.tobytes()
    path = Path(path)
    with atomic_open(path) as f:
        f.write(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)

