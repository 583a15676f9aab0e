"""Finding, verifying and downloading dataset files.

Search order (the first directory holding a complete set of files wins):

1. the explicit ``data_dir`` argument (``--data-dir``): when given, it is the only place
   searched, and downloads land there; a named directory is never silently replaced by another,
2. each directory in ``$FISHPRUNE_DATA`` (``os.pathsep``-separated),
3. :data:`SYSTEM_DATA_ROOTS` (Debian's ``dataset-*`` packages install under
   ``/usr/share/datasets/<name>``, e.g. ``apt-get install dataset-fashion-mnist``),
4. the user cache :func:`cache_root` (``$XDG_CACHE_HOME/fishprune`` or ``~/.cache/fishprune``).

Each root is searched both directly and in its ``<root>/<dataset-name>/`` subfolder. Downloads
land in ``<cache_root>/<dataset-name>/``: each file is streamed into a hidden temporary file in
that directory, its MD5 is checked against the published value, and only then is it moved into
place with ``os.replace`` (atomic), so a killed or corrupted download never leaves a file that
looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fishprune import atomic
from fishprune._version import __version__

logger = logging.getLogger(__name__)

#: Roots searched after ``data_dir`` and ``$FISHPRUNE_DATA``; Debian's dataset packages install
#: into ``/usr/share/datasets/<name>``.
SYSTEM_DATA_ROOTS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
#: Environment variable naming extra data directories.
DATA_ENV_VAR = "FISHPRUNE_DATA"
#: Seconds a download may stall (per socket operation, not in total) before it is abandoned.
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are nowhere to be found and could not be downloaded."""


class DatasetFileError(ValueError):
    """A dataset file is corrupt, truncated, of the wrong format, or fails its checksum."""


class ChecksumError(DatasetFileError):
    """A file's checksum differs from the published one."""


# Alternatives for one required file: the first existing name is used (e.g. "x.gz" or "x").
FileAlternatives = Sequence[str]
# One way a dataset can lie in a directory: a list of required files.
Layout = Sequence[FileAlternatives]


def cache_root() -> Path:
    """The user cache directory, ``$XDG_CACHE_HOME/fishprune`` or ``~/.cache/fishprune``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fishprune"


def cache_dir(name: str) -> Path:
    """Where downloads of dataset ``name`` land: ``cache_root() / name``."""
    return cache_root() / name


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Candidate directories for dataset ``name``, in search order, without duplicates."""
    roots: list[Path] = []
    if data_dir is not None:  # the user's choice: only there
        roots.append(Path(data_dir))
    else:
        env = os.environ.get(DATA_ENV_VAR, "")
        roots.extend(Path(part) for part in env.split(os.pathsep) if part)
        roots.extend(SYSTEM_DATA_ROOTS)
        roots.append(cache_root())
    dirs: list[Path] = []
    for root in roots:
        for candidate in (root.expanduser(), root.expanduser() / name):
            if candidate not in dirs:
                dirs.append(candidate)
    return dirs


def find_layout(directory: Path, layouts: Sequence[Layout]) -> list[Path] | None:
    """The files of the first layout complete in ``directory``, or None."""
    for layout in layouts:
        paths = []
        for alternatives in layout:
            path = next((directory / a for a in alternatives if (directory / a).is_file()), None)
            if path is None:
                break
            paths.append(path)
        else:
            return paths
    return None


def locate(
    name: str, layouts: Sequence[Layout], data_dir: str | os.PathLike[str] | None = None
) -> tuple[list[Path] | None, list[Path]]:
    """Search :func:`search_dirs` for a complete layout; returns (paths or None, dirs searched)."""
    dirs = search_dirs(name, data_dir)
    for directory in dirs:
        paths = find_layout(directory, layouts)
        if paths is not None:
            logger.debug("%s: using %s", name, directory)
            return paths, dirs
    return None, dirs


def file_md5(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# (resolved path, size, mtime_ns, md5) of files already verified in this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _stat_key(path: Path, md5: str) -> tuple[str, int, int, str]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, md5)


def verify_file(path: Path, md5: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has MD5 ``md5`` (cached per process)."""
    key = _stat_key(path, md5)
    if key in _VERIFIED:
        return
    actual = file_md5(path)
    if actual != md5:
        raise ChecksumError(
            f"{path}: MD5 {actual} differs from the published {md5}; the file is corrupt or "
            "not the official release; delete it and fetch it again"
        )
    _VERIFIED.add(key)


def verify_bytes(path: Path, data: bytes, md5: str, what: str = "content") -> None:
    """Raise :class:`ChecksumError` unless ``data`` (read from ``path``) has MD5 ``md5``.

    The result is cached per process under ``path``'s size and mtime, so loading the same file
    twice in one process hashes it once.
    """
    key = _stat_key(path, md5)
    if key in _VERIFIED:
        return
    actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if actual != md5:
        raise ChecksumError(
            f"{path}: MD5 of the {what} is {actual}, not the published {md5}; the file is "
            "corrupt or not the official release; delete it and fetch it again"
        )
    _VERIFIED.add(key)


def download_file(url: str, dest: Path, md5: str, *, size: int | None = None,
                  timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``url`` to ``dest`` atomically, verifying its MD5 (and, while streaming, that
    it is no larger than the published ``size``, so a bogus download stops early).

    Raises:
        ChecksumError: the downloaded bytes do not have MD5 ``md5`` (nothing is left behind).
        OSError, http.client.HTTPException: network or file-system failure
            (``urllib.error.URLError`` and ``HTTPError`` are subclasses of ``OSError``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(dest.parent, f".{dest.name}~*.part*")  # killed downloads
    request = urllib.request.Request(url, headers={"User-Agent": f"fishprune/{__version__}"})
    tmp = atomic.temp_name(dest, "part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        written = 0
        with open(tmp, "xb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            while chunk := resp.read(_CHUNK):
                written += len(chunk)
                if size is not None and written > size:
                    raise ChecksumError(f"{url}: more than the published {size} bytes; stopped")
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ChecksumError(
                f"{url}: downloaded MD5 {digest.hexdigest()} differs from the published {md5}"
            )
        os.replace(tmp, dest)
        _VERIFIED.add(_stat_key(dest, md5))
    finally:
        tmp.unlink(missing_ok=True)


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return str(getattr(error, "reason", None) or error)


def download_any(mirrors: Sequence[str], filename: str, dest: Path, md5: str,
                 size: int | None = None) -> list[str]:
    """Try ``mirror + filename`` for each mirror until one downloads and verifies.

    Returns an empty list on success, else one ``"url: reason"`` line per failed mirror.
    If any mirror served bytes with the wrong checksum and none succeeded, a
    :class:`ChecksumError` listing every failure is raised instead.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache raises here, once
    failures: list[str] = []
    bad_checksum = False
    for mirror in mirrors:
        url = mirror + filename
        logger.info("downloading %s to %s", url, dest)
        try:
            download_file(url, dest, md5, size=size)
            return []
        except ChecksumError as error:
            bad_checksum = True
            failures.append(str(error))
        except (OSError, http.client.HTTPException) as error:
            failures.append(f"{url}: {_describe(error)}")
    if bad_checksum:
        raise ChecksumError("; ".join(failures))
    return failures


def not_found_message(
    name: str, searched: Sequence[Path], how: str, failures: Sequence[str]
) -> str:
    """One line: what is missing, where it was looked for, why downloading failed, how to fix."""
    where = ", ".join(str(d) for d in searched)
    if failures:
        tried = f"downloading into {cache_dir(name)} failed ({'; '.join(failures)})"
    else:
        tried = "downloading is disabled"
    return (
        f"dataset {name!r} not found (searched {where}) and {tried}. To get it: {how}; or put "
        f"the files in a directory and pass --data-dir DIR or set {DATA_ENV_VAR}=DIR"
    )
