"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through :func:`replacing`: the bytes land in a hidden temporary file in the
destination's directory (``.{name}~{pid}@{host}~{random}.tmp{suffix}``, so the suffix survives
for libraries that detect the format from it), are ``fsync``-ed, and only then ``os.replace``
the destination, after which the directory is ``fsync``-ed too. On any exception the temporary
file is removed and the old file is left untouched. A process killed mid-write leaves a
temporary file; :func:`remove_stale_temps` deletes those whose writer is dead (its pid no longer
runs on this host), never one that another live process is still writing (a shared cache).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

PathLike = str | os.PathLike[str]


_OWNER = re.compile(r"~(\d+)@(.+)~[0-9a-f]{8}\.(?:tmp|part)")


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden temporary name next to ``path`` that says which process writes it."""
    owner = f"{os.getpid()}@{socket.gethostname()}"
    return path.with_name(f".{path.name}~{owner}~{secrets.token_hex(4)}.{kind}{path.suffix}")


def is_stale(tmp: Path) -> bool:
    """Whether the temporary file ``tmp`` was left by a process that is gone (a name without
    an owner, from an older fishprune, counts as left behind)."""
    match = _OWNER.search(tmp.name)
    if match is None:
        return True
    pid, host = int(match.group(1)), match.group(2)
    if host != socket.gethostname():
        return False  # another machine's writer: cannot tell, leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _create_temp(path: Path) -> Path:
    """Create an empty, exclusively named temporary file next to ``path`` (umask applies)."""
    for _ in range(100):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync(path: Path, *, directory: bool = False) -> None:
    # Directories cannot be fsync-ed on every platform (Windows); files always can.
    flags = os.O_RDONLY if directory or os.name != "nt" else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        if directory:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


#: A full, read-only or failing disk: reported naming the file that could not be written.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def _disk_error(err: BaseException, path: Path) -> OSError | None:
    """``err`` as an ``OSError`` naming ``path`` when it says the disk failed, else None.

    The OS error of a full disk names no file ("[Errno 28] No space left on device"), and
    libraries that write through their own I/O (safetensors) raise their own exception types
    with the OS error in the message ("... (os error 28)").
    """
    if not isinstance(err, Exception):
        return None
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code not in _DISK_ERRNOS:
        return None
    return OSError(code, f"could not write {path}: {os.strerror(code)}")


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` atomically when the block exits cleanly.

    The temporary file already exists (empty) in the same directory and keeps ``path``'s
    suffix, so ``savefig(tmp)`` or ``save_file(tensors, tmp)`` pick the right format. On a
    clean exit it is fsync-ed and ``os.replace``-d onto ``path``; on any exception (including
    one from ``os.replace``) it is deleted and ``path`` keeps its previous content; a full or
    failing disk is re-raised as an ``OSError`` that names ``path``.
    """
    path = Path(path)
    try:
        tmp = _create_temp(path)
    except OSError as err:
        if (named := _disk_error(err, path)) is not None:
            raise named from err
        raise
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if (named := _disk_error(err, path)) is not None:
            raise named from err
        raise
    _fsync(path.parent, directory=True)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``."""
    write_bytes(path, text.encode(encoding))


def _nonfinite_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {key: _nonfinite_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nonfinite_to_none(value) for value in obj]
    return obj


def write_json(
    path: PathLike, obj: Any, *, nonfinite: Literal["null", "raise"] = "null"
) -> None:
    """Write ``obj`` as strict JSON (sorted keys, indent 2, trailing newline) atomically.

    JSON has no NaN/Infinity. With ``nonfinite="null"`` (default) non-finite floats are written
    as ``null``, so a diverged run still records its results (readers see "no value"); with
    ``nonfinite="raise"`` they raise ``ValueError`` and nothing is written.
    """
    if nonfinite == "null":
        obj = _nonfinite_to_none(obj)
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err} (NaN/Infinity cannot be written as JSON)") from err
    write_text(path, text + "\n")


def remove_stale_temps(directory: PathLike, pattern: str = ".*.tmp*") -> list[Path]:
    """Delete the temporary files that killed processes left in ``directory`` (the files they
    were to replace are intact); return them. Files of live writers are left alone."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for tmp in directory.glob(pattern):
            if is_stale(tmp):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def sha256_file(path: PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
