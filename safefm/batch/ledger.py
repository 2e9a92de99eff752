"""The job ledger: one SQLite file beside the output folder (``OUTPUT.ledger.sqlite`` by default).

Table ``items``, one row per input (keyed by its output path relative to the output folder):
``state`` (pending, running, done, failed), ``attempts``, ``error`` (one line, the last failure),
``worker`` (host:pid of the last attempt), and for a finished file its output's ``sha256`` and
``bytes``, ``frames``, ``audio``, the privacy-check figures ``faces`` / ``anonymized`` /
``held`` / ``placeholder`` / ``frames_without_faces`` (faces covered by the fail-closed policy
instead of anonymized, and frames where no face was found), and ``seconds`` (the worker's wall
time for the file; frames / seconds is the engine's FPS). Table ``events``: every transition
(attempt, state, worker, error, time), so retries after a dead worker stay visible.

Only the driver writes the ledger (workers return their figures); one job at a time holds it
(an exclusive lock, released when the job ends or its process dies).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from ..errors import InputError

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
FIGURES = ("sha256", "bytes", "frames", "audio", "faces", "anonymized", "held", "placeholder",
           "frames_without_faces", "seconds")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY, src TEXT NOT NULL, identity TEXT,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, worker TEXT,
    sha256 TEXT, bytes INTEGER, frames INTEGER, audio INTEGER, faces INTEGER, anonymized INTEGER,
    held INTEGER, placeholder INTEGER, frames_without_faces INTEGER, seconds REAL, updated REAL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, attempt INTEGER, state TEXT NOT NULL,
    worker TEXT, error TEXT, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""


def default_ledger_path(output) -> Path:
    """``OUTPUT.ledger.sqlite`` beside the output folder (the output holds only the videos)."""
    output = Path(output).resolve()
    return output.with_name(output.name + ".ledger.sqlite")


class Ledger:
    """Open (and create) a ledger. ``lock=True`` (a job): fails with one line if another job holds it."""

    def __init__(self, path, lock: bool = False, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"ledger not found: {self.path}")
        self._lock_fd = None
        if lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(f"another safefm-batch job is using {self.path}") from None
            self._lock_fd = fd
        try:
            # check_same_thread=False: a job may run in another thread than the one that opened it
            # (one thread uses it at a time).
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            if create:
                self.db.executescript(_SCHEMA)
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "items" not in tables:
                raise sqlite3.DatabaseError("no items table")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise InputError(f"{self.path} is not a safefm-batch ledger ({exc})") from None

    # -- setup -------------------------------------------------------------------------
    def set_meta(self, **values) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, str(v)) for k, v in values.items()])

    def meta(self) -> dict[str, str]:
        return {r["name"]: r["value"] for r in self.db.execute("SELECT * FROM meta")}

    def add(self, items) -> int:
        """Insert the items not in the ledger yet (as pending); returns how many were new."""
        now = time.time()
        cur = self.db.executemany(
            "INSERT OR IGNORE INTO items (key, src, identity, state, updated) VALUES (?, ?, ?, ?, ?)",
            [(it.key, str(it.src), it.identity, PENDING, now) for it in items])
        return cur.rowcount

    # -- transitions ---------------------------------------------------------------------
    def _event(self, key: str, state: str, worker=None, error=None) -> None:
        attempt = self.row(key)["attempts"]
        self.db.execute("INSERT INTO events (key, attempt, state, worker, error, time) VALUES (?, ?, ?, ?, ?, ?)",
                        (key, attempt, state, worker, error, time.time()))

    def _set(self, key: str, **cols) -> None:
        cols["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in cols)
        self.db.execute(f"UPDATE items SET {sets} WHERE key = ?", (*cols.values(), key))

    def start(self, key: str, worker: str | None = None) -> int:
        """An attempt begins: state running, attempts + 1; returns the attempt number."""
        self.db.execute("UPDATE items SET state = ?, attempts = attempts + 1, worker = ?, updated = ? "
                        "WHERE key = ?", (RUNNING, worker, time.time(), key))
        self._event(key, RUNNING, worker)
        return self.row(key)["attempts"]

    def done(self, key: str, figures: dict, worker: str | None = None) -> None:
        self._set(key, state=DONE, error=None, worker=worker,
                  **{k: figures.get(k) for k in FIGURES})
        self._event(key, DONE, worker)

    def fail(self, key: str, error: str, worker: str | None = None, retry: bool = False) -> None:
        """The attempt failed: ``retry`` puts the row back to pending (a worker died), else failed."""
        self._set(key, state=PENDING if retry else FAILED, error=error, worker=worker)
        self._event(key, PENDING if retry else FAILED, worker, error)

    def release(self, key: str) -> None:
        """An attempt that never finished for reasons not of the file (the job was stopped):
        back to pending, the attempt not counted."""
        self.db.execute("UPDATE items SET state = ?, attempts = MAX(attempts - 1, 0), updated = ? "
                        "WHERE key = ?", (PENDING, time.time(), key))
        self._event(key, PENDING, None, "job stopped")

    # -- queries -------------------------------------------------------------------------
    def row(self, key: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM items WHERE key = ?", (key,)).fetchone()

    def rows(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM items ORDER BY key").fetchall()

    def events(self, key: str | None = None) -> list[sqlite3.Row]:
        if key is None:
            return self.db.execute("SELECT * FROM events ORDER BY id").fetchall()
        return self.db.execute("SELECT * FROM events WHERE key = ? ORDER BY id", (key,)).fetchall()

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the lock
            self._lock_fd = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_status(ledger: Ledger, events: bool = False) -> list[str]:
    """``safefm-batch status``: a totals line, one line per input, and optionally every event."""
    rows = ledger.rows()
    meta = ledger.meta()
    counts = {s: sum(r["state"] == s for r in rows) for s in (DONE, FAILED, RUNNING, PENDING)}
    retried = sum(r["attempts"] > 1 for r in rows)
    lines = [f"{ledger.path}: {len(rows)} inputs -> {meta.get('output', '?')}: "
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({retried} retried)"]
    for r in rows:
        what = f"{r['state']:<7} {r['attempts']}x  {r['key']}"
        if r["state"] == DONE:
            fps = r["frames"] / r["seconds"] if r["seconds"] else 0.0
            what += (f"  frames {r['frames']}{' +audio' if r['audio'] else ''}, faces {r['faces']} "
                     f"(held {r['held']}, placeholder {r['placeholder']}), no face in "
                     f"{r['frames_without_faces']} frames, {fps:.1f} FPS, sha256 {r['sha256'][:12]}")
        elif r["error"]:
            what += f"  {r['error']}"
        lines.append(what)
    if events:
        lines.append("events:")
        for e in ledger.events():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
            lines.append(f"  {stamp}  {e['key']}  attempt {e['attempt']}  {e['state']}"
                         + (f"  on {e['worker']}" if e["worker"] else "")
                         + (f"  {e['error']}" if e["error"] else ""))
    return lines
