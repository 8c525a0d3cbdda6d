"""The coordinator's durable state: runs, their metric rows, checkpoints and log lines, in one SQLite file.

Schema (``PRAGMA user_version`` = ``SCHEMA_VERSION``):

- ``runs``: one row per submitted run (``seq`` keeps insertion order; ``id`` is the run's name), its TOML
  config, state, reason, requested and completed rounds, timestamps and output folder.
- ``rows``: a run's per-round metric rows as JSON text, with the round number in its own column.
- ``checkpoints``: a run's newest ``KEEP_CHECKPOINTS`` checkpoints, each blob with its SHA-256 hex digest.
- ``logs``: a run's newest ``MAX_LOG_LINES`` log lines; ``seq`` increases across the whole store.

Every other table refers to ``runs`` by foreign key. The file uses WAL with ``synchronous=FULL`` and each
write is a committed transaction by the time its method returns, so it survives the process being killed
between calls. The methods are blocking and serialised by a lock: call them from worker threads.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUN_STATES = ("pending", "running", "completed", "failed", "stopped")
FINISHED_STATES = frozenset({"completed", "failed", "stopped"})
KEEP_CHECKPOINTS = 2
MAX_LOG_LINES = 10_000  # per run; older lines are deleted when a run exceeds it
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    rounds INTEGER NOT NULL,
    completed_rounds INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    out TEXT NOT NULL
);
CREATE TABLE rows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX rows_by_run ON rows(run_id, seq);
CREATE TABLE checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    data BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    line TEXT NOT NULL
);
CREATE INDEX logs_by_run ON logs(run_id, seq);
"""

_RUN_COLUMNS = "id, config, state, reason, rounds, completed_rounds, created, started, finished, out"


class StoreError(RuntimeError):
    """The store refuses a request: unknown run, bad state, corrupt checkpoint, unreadable file."""


@dataclass(frozen=True)
class RunRecord:
    id: str
    config: str  # the run's TOML text as submitted
    state: str  # one of RUN_STATES
    reason: str  # why it failed/stopped, "" otherwise
    rounds: int  # rounds the run asks for
    completed_rounds: int  # the latest checkpointed round (0 before any)
    created: float  # time.time() values
    started: float | None
    finished: float | None
    out: str  # the run's output folder

    def to_json(self) -> dict[str, Any]:
        """The record without its config, for status replies."""
        record = asdict(self)
        del record["config"]
        return record


@dataclass(frozen=True)
class StoredCheckpoint:
    round: int
    data: bytes


class Store:
    """A coordinator's SQLite store; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._open(path)
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{path} is not a usable coordinator store: {error}") from error
        except StoreError:
            self._db.close()
            raise

    def _open(self, path: Path) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} has schema version {version}; this coordinator reads up to {SCHEMA_VERSION}"
                )
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, committed (durably) on success and rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _run_write(self, run_id: str) -> Iterator[None]:
        """A write transaction adding rows that refer to `run_id`; an unknown run is a StoreError."""
        try:
            with self._transaction():
                yield
        except sqlite3.IntegrityError as error:
            raise StoreError(f"unknown run {run_id!r}") from error

    def _run(self, run_id: str) -> RunRecord:
        row = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown run {run_id!r}")
        return RunRecord(*row)

    def _runs(self, where: str = "") -> list[RunRecord]:
        query = f"SELECT {_RUN_COLUMNS} FROM runs {where} ORDER BY created, seq"
        return [RunRecord(*row) for row in self._db.execute(query)]

    def create_run(self, run_id: str, config: str, rounds: int, out: str) -> RunRecord:
        with self._lock:
            try:
                with self._transaction():
                    self._db.execute(
                        "INSERT INTO runs (id, config, state, rounds, created, out) "
                        "VALUES (?, ?, 'pending', ?, ?, ?)",
                        (run_id, config, rounds, time.time(), out),
                    )
            except sqlite3.IntegrityError as error:
                raise StoreError(f"run {run_id!r} already exists") from error
            return self._run(run_id)

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            try:
                return self._run(run_id)
            except StoreError:
                return None

    def list_runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        with self._lock:
            return self._runs()

    def unfinished(self) -> list[RunRecord]:
        """Pending and running runs, oldest first (to resume after a restart)."""
        with self._lock:
            return self._runs("WHERE state IN ('pending', 'running')")

    def set_state(self, run_id: str, state: str, reason: str = "") -> RunRecord:
        """Move a run to `state`; `started` is set on first running, `finished` on a finished state."""
        if state not in RUN_STATES:
            raise StoreError(f"unknown run state {state!r}; expected one of {', '.join(RUN_STATES)}")
        with self._lock:
            with self._transaction():
                current = self._run(run_id)
                if current.state in FINISHED_STATES:
                    raise StoreError(f"run {run_id!r} is already {current.state}; it cannot become {state}")
                now = time.time()
                started = now if state == "running" and current.started is None else current.started
                finished = now if state in FINISHED_STATES else None
                self._db.execute(
                    "UPDATE runs SET state = ?, reason = ?, started = ?, finished = ? WHERE id = ?",
                    (state, reason, started, finished, run_id),
                )
            return self._run(run_id)

    def append_row(self, run_id: str, row: Mapping[str, Any]) -> None:
        """Store one metric row; it must carry an int "round" and be JSON without NaN or infinities."""
        round_ = row.get("round")
        if not isinstance(round_, int) or isinstance(round_, bool):
            raise StoreError(f"a row needs an int 'round', got {round_!r}")
        try:
            data = json.dumps(dict(row), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise StoreError(f"row for run {run_id!r} is not storable as JSON: {error}") from error
        with self._lock, self._run_write(run_id):
            self._db.execute(
                "INSERT INTO rows (run_id, round, data) VALUES (?, ?, ?)", (run_id, round_, data)
            )

    def rows(self, run_id: str) -> list[dict[str, Any]]:
        """A run's rows in insertion order."""
        with self._lock:
            self._run(run_id)
            query = "SELECT data FROM rows WHERE run_id = ? ORDER BY seq"
            return [json.loads(data) for (data,) in self._db.execute(query, (run_id,))]

    def truncate_rows(self, run_id: str, last_round: int) -> None:
        """Delete a run's rows after `last_round` (those a resumed run will produce again)."""
        with self._lock, self._transaction():
            self._run(run_id)
            self._db.execute("DELETE FROM rows WHERE run_id = ? AND round > ?", (run_id, last_round))

    def save_checkpoint(self, run_id: str, round_: int, data: bytes) -> None:
        """Keep `data` as the run's newest checkpoint and its completed round, in one transaction.

        Checkpoints of later rounds (from before a resume) are dropped, so the newest checkpoint is
        always the one for `completed_rounds`; only the newest KEEP_CHECKPOINTS are kept.
        """
        digest = hashlib.sha256(data).hexdigest()
        with self._lock, self._transaction():
            self._run(run_id)
            self._db.execute("DELETE FROM checkpoints WHERE run_id = ? AND round >= ?", (run_id, round_))
            self._db.execute(
                "INSERT INTO checkpoints (run_id, round, data, sha256) VALUES (?, ?, ?, ?)",
                (run_id, round_, data, digest),
            )
            self._db.execute(
                "DELETE FROM checkpoints WHERE run_id = ? AND round NOT IN "
                "(SELECT round FROM checkpoints WHERE run_id = ? ORDER BY round DESC LIMIT ?)",
                (run_id, run_id, KEEP_CHECKPOINTS),
            )
            self._db.execute("UPDATE runs SET completed_rounds = ? WHERE id = ?", (round_, run_id))

    def latest_checkpoint(self, run_id: str) -> StoredCheckpoint | None:
        """The run's newest checkpoint, checked against its digest; None before the first."""
        with self._lock:
            self._run(run_id)
            found = self._db.execute(
                "SELECT round, data, sha256 FROM checkpoints WHERE run_id = ? ORDER BY round DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        if found is None:
            return None
        round_, data, digest = found
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"checkpoint of run {run_id!r} at round {round_} does not match its checksum")
        return StoredCheckpoint(round=round_, data=bytes(data))

    def append_log(self, run_id: str, line: str) -> int:
        """Store one log line and return its sequence number; keeps the run's newest MAX_LOG_LINES."""
        with self._lock, self._run_write(run_id):
            seq = self._db.execute("INSERT INTO logs (run_id, line) VALUES (?, ?)", (run_id, line)).lastrowid
            self._db.execute(
                "DELETE FROM logs WHERE run_id = ? AND seq <= "
                "(SELECT seq FROM logs WHERE run_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (run_id, run_id, MAX_LOG_LINES),
            )
        return int(seq)

    def logs(self, run_id: str, after: int = 0) -> list[tuple[int, str]]:
        """A run's log lines with a sequence number above `after`, oldest first."""
        with self._lock:
            self._run(run_id)
            query = "SELECT seq, line FROM logs WHERE run_id = ? AND seq > ? ORDER BY seq"
            return [(seq, line) for seq, line in self._db.execute(query, (run_id, after))]
