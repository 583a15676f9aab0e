"""The results database: an SQLite index of run directories (``<dir>/results.sqlite``).

The run directories are the source of truth; the database is an index that
:func:`index_dir` can always rebuild from them. One row per run in ``runs``:

* identity: ``run_id`` (primary key), ``label``, ``method`` (the criterion, or ``dense`` at
  sparsity 0), ``status`` (``finished``, ``failed``, ``incomplete`` or ``corrupt``: its
  artifacts fail :meth:`~fishprune.rundir.RunDir.verify`, named in ``error``), ``error``,
  ``run_dir``;
* every flat setting of :class:`~fishprune.config.RunConfig` under its own name (lists as JSON
  text, booleans as 0/1);
* metrics from ``result.json``: ``test_acc``, ``test_loss``, ``best_val_acc``, ``best_epoch``,
  ``epochs_trained``, ``density``, ``kept``, ``prunable``, ``parameters``,
  ``collapsed_layers``/``disconnected_layers`` (counts) and ``collapsed_names`` (JSON);
* timings ``warmup_seconds``, ``score_seconds``, ``train_seconds``;
* provenance: ``fishprune_version``, ``git_commit``, ``torch_version``, ``python_version``,
  ``platform``, ``device_used``, ``device_name``, ``threads``;
* timestamps (UTC, ISO 8601): ``started_at``, ``finished_at``, ``indexed_at``.

``layers`` holds ``layers.json`` (one row per prunable tensor: ``run_id``, ``position``,
``name``, ``numel``, ``kept``, ``density``, ``effective``). A failed run leaves ``error.json``
in its directory so that the failure, too, survives a rebuild. New settings become new columns
on the next open (``ALTER TABLE``), so old databases keep working.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import typing
from pathlib import Path
from typing import Any

from fishprune import config as C
from fishprune import settings as S
from fishprune.rundir import RunDir

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 1

IDENTITY = {"run_id": "TEXT PRIMARY KEY", "label": "TEXT", "method": "TEXT",
            "status": "TEXT NOT NULL", "error": "TEXT", "run_dir": "TEXT"}
METRICS = {"test_acc": "REAL", "test_loss": "REAL", "best_val_acc": "REAL",
           "best_epoch": "INTEGER", "epochs_trained": "INTEGER", "density": "REAL",
           "kept": "INTEGER", "prunable": "INTEGER", "parameters": "INTEGER",
           "collapsed_layers": "INTEGER", "disconnected_layers": "INTEGER",
           "collapsed_names": "TEXT"}
TIMINGS = {"warmup_seconds": "REAL", "score_seconds": "REAL", "train_seconds": "REAL"}
PROVENANCE = {"fishprune_version": "fishprune", "git_commit": "git_commit",
              "torch_version": "torch", "python_version": "python", "platform": "platform",
              "device_used": "device", "device_name": "device_name", "threads": "threads"}
TIMES = ("started_at", "finished_at", "indexed_at")


def setting_columns() -> dict[str, str]:
    """Every flat setting → its SQLite column type."""
    sql = {int: "INTEGER", bool: "INTEGER", float: "REAL"}
    return {name: sql.get(kind, "TEXT") for name, kind in setting_kinds().items()}


def columns() -> dict[str, str]:
    """All columns of ``runs`` in table order."""
    prov = {k: ("INTEGER" if k == "threads" else "TEXT") for k in PROVENANCE}
    return {**IDENTITY, **setting_columns(), **METRICS, **TIMINGS, **prov,
            **{t: "TEXT" for t in TIMES}}


class CorruptDatabase(sqlite3.DatabaseError):
    """The file is not a readable SQLite database."""


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating or upgrading) a results database in WAL mode; rows come as dicts.

    A file SQLite cannot read (``file is not a database``, a malformed image) is moved aside to
    ``<name>.corrupt-<UTC time>`` with a warning naming both files, and a new one is created: the
    run directories are the source of truth and :func:`index_dir` rebuilds it from them.
    """
    try:
        return _connect(path)
    except sqlite3.DatabaseError as err:
        if str(path) == ":memory:" or (isinstance(err, sqlite3.OperationalError) and (
            "unable to open" in str(err)
        )):
            raise
        import warnings

        path = Path(path)
        stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        warnings.warn(f"{path} could not be read ({err}); moved to {aside}, rebuilding it from "
                      "the run directories", stacklevel=2)
        return _connect(path)


def _connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=60)
    conn.row_factory = lambda cur, row: {d[0]: v for d, v in zip(cur.description, row)}
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    with conn:
        cols = columns()
        spec = ", ".join(f"{k} {t}" for k, t in cols.items())
        conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({spec})")
        have = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
        for name, kind in cols.items():
            if name not in have:  # a setting added since the database was made
                conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind.split()[0]}")
        conn.execute("CREATE TABLE IF NOT EXISTS layers (run_id TEXT NOT NULL, position INTEGER, "
                     "name TEXT NOT NULL, numel INTEGER, kept INTEGER, density REAL, "
                     "effective INTEGER, PRIMARY KEY (run_id, name))")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))
    if conn.execute("PRAGMA quick_check").fetchone()["quick_check"] != "ok":
        conn.close()
        raise sqlite3.DatabaseError("database disk image is malformed (quick_check)")
    return conn


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sql(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return int(value) if isinstance(value, bool) else value


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """Every flat setting of a stored ``config.json`` (defaults of settings added since)."""
    try:
        return C.flat_values(S.from_dict(config))
    except (C.ConfigError, TypeError):
        names = set(S.setting_names())
        flat: dict[str, Any] = {}
        for key, value in config.items():
            if key in C.SECTIONS and isinstance(value, dict):
                flat.update({k: v for k, v in value.items() if k in names})
            elif key in names:
                flat[key] = value
        return flat


def row_from_dir(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The ``runs`` row and ``layers`` rows of a run directory (None: not a run directory)."""
    rd = RunDir(Path(run_dir))
    run_dir = rd.path
    config = _read_json(rd.config)
    if not isinstance(config, dict):
        return None
    settings = _settings(config)
    result = _read_json(rd.result)
    error = _read_json(rd.error)
    prov = _read_json(rd.provenance) or {}
    sparsity = settings.get("sparsity")
    problems = rd.verify()
    status = ("corrupt" if problems else "finished" if result else
              "failed" if error else "incomplete")
    row: dict[str, Any] = {
        "run_id": config.get("run_id", run_dir.name), "label": config.get("label"),
        "method": "dense" if sparsity == 0 else settings.get("criterion"),
        "status": status,
        "error": "; ".join(problems) if problems else (
            None if result or not isinstance(error, dict) else error.get("error")),
        "run_dir": run_dir.name, **settings,
        "started_at": prov.get("started"), "indexed_at": _now(),
    }
    row.update({col: prov.get(key) for col, key in PROVENANCE.items()})
    if result and not problems:
        row.update({k: result.get(k) for k in METRICS if k in result})
        row.update({k: result.get(k) for k in TIMINGS})
        row["epochs_trained"] = result.get("epochs")
        row["collapsed_layers"] = len(result.get("collapsed_layers") or [])
        row["disconnected_layers"] = len(result.get("disconnected_layers") or [])
        row["collapsed_names"] = result.get("collapsed_layers") or []
        mtime = rd.result.stat().st_mtime
        row["finished_at"] = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).isoformat(
            timespec="seconds")
    report = _read_json(rd.layers) or {}
    layers = [{"run_id": row["run_id"], "position": i, **{k: lay.get(k) for k in
              ("name", "numel", "kept", "density", "effective")}}
              for i, lay in enumerate(report.get("layers", []))]
    return row, layers


def upsert(conn: sqlite3.Connection, row: dict[str, Any], layers: list[dict[str, Any]], *,
           still: typing.Callable[[], bool] | None = None) -> bool:
    """Insert or replace one run and its layers, in one transaction.

    ``still``, when given, is asked under the database's write lock whether the row is still
    what the directory holds; if not, nothing is written and False is returned.
    """
    known = columns()
    row = {k: _sql(v) for k, v in row.items() if k in known}
    with conn:
        conn.execute("BEGIN IMMEDIATE")  # the write lock, before the check
        if still is not None and not still():
            return False
        conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(row)}) "
                     f"VALUES ({', '.join('?' * len(row))})", list(row.values()))
        conn.execute("DELETE FROM layers WHERE run_id = ?", (row["run_id"],))
        conn.executemany("INSERT INTO layers VALUES (:run_id, :position, :name, :numel, :kept, "
                         ":density, :effective)", layers)
    return True


def _state(run_dir: Path) -> list[tuple[str, int, int]]:
    """What a run directory holds now: (name, size, mtime) of each file; any write changes it."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:  # removed meanwhile (an atomic write's temporary file)
            continue
        out.append((entry.name, st.st_size, st.st_mtime_ns))
    return sorted(out)


def index_run(conn: sqlite3.Connection, run_dir: str | Path) -> dict[str, Any] | None:
    """(Re)index one run directory; return its row.

    Race-free against other indexers (a ``fishprune report`` while the sweep runs): the
    directory's state is taken before it is read, and the row is written only if, under the
    database's write lock, the directory still holds that state; otherwise it is read again.
    Without this, a reader that saw a run unfinished could write its stale row after the
    sweep had indexed the run as finished.
    """
    run_dir = Path(run_dir)
    while True:
        before = _state(run_dir)
        found = row_from_dir(run_dir)
        if found is None:
            return None
        if upsert(conn, *found, still=lambda seen=before: _state(run_dir) == seen):
            return found[0]


def run_dirs(root: str | Path) -> list[Path]:
    """Run directories under ``root``: sub-directories holding a ``config.json``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name[0] not in "._" and RunDir(p).is_run())


def index_dir(conn: sqlite3.Connection, root: str | Path) -> int:
    """Rebuild the index of every run directory under ``root``; drop rows whose directory is
    gone. Returns the number of runs indexed."""
    dirs = run_dirs(root)
    rows = [r for r in (index_run(conn, d) for d in dirs) if r is not None]
    names = {d.name for d in dirs}
    with conn:
        for r in conn.execute("SELECT run_id, run_dir FROM runs").fetchall():
            if r["run_dir"] not in names:
                conn.execute("DELETE FROM runs WHERE run_id = ?", (r["run_id"],))
                conn.execute("DELETE FROM layers WHERE run_id = ?", (r["run_id"],))
    return len(rows)


def open_index(root: str | Path, *, refresh: bool = False) -> sqlite3.Connection:
    """The database of ``root``: its ``results.sqlite``, or an in-memory index when ``root`` is
    not writable. It is rebuilt first with ``refresh``, when missing, or when the finished run
    directories on disk are not exactly the finished rows (runs added or removed since)."""
    root = Path(root)
    try:
        conn = connect(root / DB_NAME)
    except sqlite3.OperationalError:
        conn, refresh = connect(":memory:"), True
    dirs = run_dirs(root)
    if not dirs:  # a database without its run directories (a copy): read it as it is
        return conn
    on_disk = {d.name for d in dirs if RunDir(d).is_finished()}
    indexed = {r["run_dir"] for r in conn.execute(
        "SELECT run_dir FROM runs WHERE status = 'finished'")}
    if refresh or on_disk != indexed:
        index_dir(conn, root)
    return conn


def record_failure(run_dir: str | Path, cfg: C.RunConfig, error: str,
                   traceback: str | None = None) -> None:
    """Leave ``error.json`` in a run directory (see :meth:`RunDir.record_error`)."""
    RunDir(Path(run_dir)).record_error(cfg, error, traceback)


def fetch(conn: sqlite3.Connection, status: str | None = "finished") -> list[dict[str, Any]]:
    """Rows of ``runs`` (all statuses with ``status=None``), lists decoded, by run id."""
    query = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY run_id"
    rows = conn.execute(query, (status,) if status else ()).fetchall()
    kinds = setting_kinds()
    listy = [k for k, kind in kinds.items() if kind is tuple] + ["collapsed_names"]
    flags = [k for k, kind in kinds.items() if kind is bool]
    for row in rows:
        for key in listy:
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
        for key in flags:
            if row.get(key) is not None:
                row[key] = bool(row[key])
    return rows


def setting_kinds() -> dict[str, type]:
    """Every flat setting and criterion option → its Python type (``tuple`` for lists)."""
    out = {}
    for name in S.setting_names():
        kind = C.setting_kind(name)
        out[name] = tuple if typing.get_origin(kind) is tuple or kind is tuple else kind
    return out


def fetch_layers(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    """``run_id → [layer rows in model order]``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute("SELECT * FROM layers ORDER BY run_id, position"):
        out.setdefault(row["run_id"], []).append(row)
    return out
