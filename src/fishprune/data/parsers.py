"""Parsers for the IDX format ((Fashion-)MNIST) and the CIFAR binary format.

IDX (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 <dtype> <ndim>``,
then ``ndim`` big-endian uint32 dimensions, then the row-major data. Files may be gzipped.

CIFAR binary (https://www.cs.toronto.edu/~kriz/cifar.html): fixed-length records of
``label_bytes`` label bytes then 3072 pixel bytes (1024 red, 1024 green, 1024 blue; each
channel a row-major 32×32 image). CIFAR-10 has one label byte; CIFAR-100 two (coarse, fine).

Every failure (bad gzip stream, truncation, wrong magic, wrong length) raises
:class:`~fishprune.data.files.DatasetFileError` naming the file.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fishprune.data.files import DatasetFileError

# IDX type byte -> numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
CIFAR_IMAGE_BYTES = 3 * 32 * 32


def read_maybe_gzip(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped if it starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetFileError(f"{path}: cannot read ({error})") from error
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise DatasetFileError(f"{path}: corrupt or truncated gzip file ({error})") from error


def parse_idx(data: bytes, source: str | Path = "<bytes>") -> np.ndarray:
    """Parse an (uncompressed) IDX byte string into a native-endian numpy array.

    For uint8 data the result is a read-only view on ``data`` (no copy).
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DatasetFileError(f"{source}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise DatasetFileError(f"{source}: IDX file with zero dimensions")
    if len(data) < header:
        raise DatasetFileError(f"{source}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetFileError(
            f"{source}: IDX header announces shape {dims} ({expected} bytes) but the file has "
            f"{len(data)} bytes (truncated or corrupt)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped); see :func:`parse_idx`."""
    return parse_idx(read_maybe_gzip(path), path)


def parse_cifar(
    data: bytes, label_bytes: int, source: str | Path = "<bytes>"
) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR binary records into (images N×3×32×32 uint8, labels N uint8).

    The label is the last label byte of each record: the only one for CIFAR-10, the fine
    label for CIFAR-100 (whose records are ``coarse, fine, pixels``).
    """
    record = label_bytes + CIFAR_IMAGE_BYTES
    if not data or len(data) % record:
        raise DatasetFileError(
            f"{source}: {len(data)} bytes is not a whole number of {record}-byte CIFAR records "
            "(truncated or corrupt)"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_bytes - 1]


def read_tar_members(path: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Read the regular-file members ``names`` from a (gzipped) tar archive into memory.

    Nothing is extracted to disk, so member names cannot escape any directory (no path
    traversal); links and other special members are ignored. A leading ``./`` is tolerated.

    Raises:
        DatasetFileError: the archive is unreadable or lacks one of ``names``.
    """
    wanted = set(names)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        found[name] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetFileError(f"{path}: corrupt or truncated archive ({error})") from error
    missing = sorted(wanted - found.keys())
    if missing:
        raise DatasetFileError(f"{path}: archive lacks {', '.join(missing)}")
    return found
