"""The coordinator's SQLite store: runs and their states, rows, checkpoints, logs, and durability."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import store as store_module
from coordinator.store import KEEP_CHECKPOINTS, RunRecord, Store, StoredCheckpoint, StoreError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "state" / "coordinator.db")
    yield opened
    opened.close()


def test_create_get_and_list_in_order(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([100.0, 101.0, 50.0, 50.0])  # c and d were created "earlier" (a clock step), at one time
    monkeypatch.setattr(store_module.time, "time", lambda: next(times))
    a = store.create_run("a", 'model = "m"\n', rounds=3, out="/runs/a")
    for run_id in "bcd":
        store.create_run(run_id, "", rounds=1, out=f"/runs/{run_id}")
    monkeypatch.undo()

    assert a == RunRecord(
        id="a", config='model = "m"\n', state="pending", reason="", rounds=3, completed_rounds=0,
        created=100.0, started=None, finished=None, out="/runs/a",
    )  # fmt: skip
    assert store.get_run("a") == a
    assert store.get_run("missing") is None
    assert [run.id for run in store.list_runs()] == ["c", "d", "a", "b"]
    assert a.to_json() == {
        "id": "a", "state": "pending", "reason": "", "rounds": 3, "completed_rounds": 0,
        "created": 100.0, "started": None, "finished": None, "out": "/runs/a",
    }  # fmt: skip
    with pytest.raises(StoreError, match="already exists"):
        store.create_run("a", "", rounds=1, out="/elsewhere")
    assert store.get_run("a") == a


def test_set_state_timestamps_and_unfinished(store: Store) -> None:
    for run_id in ("a", "b", "c"):
        store.create_run(run_id, "", rounds=2, out=run_id)

    running = store.set_state("a", "running")
    assert running.state == "running" and running.started is not None and running.finished is None
    store.set_state("a", "pending")
    again = store.set_state("a", "running")
    assert again.started == running.started  # set only the first time the run starts
    store.set_state("b", "running")
    failed = store.set_state("b", "failed", "trainer lost")
    assert (failed.state, failed.reason) == ("failed", "trainer lost")
    assert failed.finished is not None and failed.finished >= failed.started
    assert [run.id for run in store.unfinished()] == ["a", "c"]

    done = store.set_state("a", "completed")
    assert done.finished is not None and done.reason == ""
    assert [run.id for run in store.unfinished()] == ["c"]
    stopped = store.set_state("c", "stopped", "stopped by operator")
    assert stopped.started is None and stopped.finished is not None
    assert store.unfinished() == []


def test_set_state_refusals(store: Store) -> None:
    store.create_run("a", "", rounds=1, out="a")
    with pytest.raises(StoreError, match="paused"):
        store.set_state("a", "paused")
    with pytest.raises(StoreError, match="unknown run"):
        store.set_state("missing", "running")
    finished = store.set_state("a", "completed")
    for state in ("running", "pending", "failed", "completed"):
        with pytest.raises(StoreError, match=f"already completed.*{state}"):
            store.set_state("a", state)
    assert store.get_run("a") == finished


def test_rows_round_trip_and_truncate(store: Store) -> None:
    store.create_run("a", "", rounds=3, out="a")
    store.create_run("b", "", rounds=3, out="b")
    rows = [
        {"round": 1, "loss": 0.5, "sites": ["x", "y"], "metrics": {"f1": {"macro": 0.25}, "n": None}},
        {"round": 2, "loss": 0.25, "sites": [], "note": "ünïcode"},
        {"round": 3, "loss": 0.125},
    ]
    for row in rows:
        store.append_row("a", row)
    store.append_row("b", {"round": 1})
    assert store.rows("a") == rows
    assert store.rows("b") == [{"round": 1}]

    store.truncate_rows("a", 1)
    assert store.rows("a") == rows[:1]
    store.append_row("a", rows[1])
    assert store.rows("a") == rows[:2]
    store.truncate_rows("a", 0)
    assert store.rows("a") == []
    assert store.rows("b") == [{"round": 1}]


def test_rows_refusals(store: Store) -> None:
    store.create_run("a", "", rounds=1, out="a")
    for bad in ({"loss": 1.0}, {"round": "1"}, {"round": True}):
        with pytest.raises(StoreError, match="round"):
            store.append_row("a", bad)
    with pytest.raises(StoreError, match="JSON"):
        store.append_row("a", {"round": 1, "loss": float("nan")})
    with pytest.raises(StoreError, match="JSON"):
        store.append_row("a", {"round": 1, "blob": b"\x00"})
    for call in (
        lambda: store.append_row("missing", {"round": 1}),
        lambda: store.rows("missing"),
        lambda: store.truncate_rows("missing", 0),
    ):
        with pytest.raises(StoreError, match="unknown run 'missing'"):
            call()
    assert store.rows("a") == []


def _checkpoint_rounds(path: Path, run_id: str) -> list[int]:
    with sqlite3.connect(path) as raw:
        query = "SELECT round FROM checkpoints WHERE run_id = ? ORDER BY round"
        return [round_ for (round_,) in raw.execute(query, (run_id,))]


def test_checkpoints_keep_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    store = Store(path)
    store.create_run("a", "", rounds=5, out="a")
    store.create_run("b", "", rounds=5, out="b")
    assert store.latest_checkpoint("a") is None
    for round_ in range(1, 5):
        store.save_checkpoint("a", round_, f"adapter {round_}".encode())
    store.save_checkpoint("b", 1, b"other")

    assert store.latest_checkpoint("a") == StoredCheckpoint(round=4, data=b"adapter 4")
    assert store.get_run("a").completed_rounds == 4
    assert _checkpoint_rounds(path, "a") == list(range(5 - KEEP_CHECKPOINTS, 5))
    assert store.latest_checkpoint("b") == StoredCheckpoint(round=1, data=b"other")

    # A run resumed from round 3 that checkpoints round 3 again supersedes the later round.
    store.save_checkpoint("a", 3, b"adapter 3 again")
    assert store.latest_checkpoint("a") == StoredCheckpoint(round=3, data=b"adapter 3 again")
    assert store.get_run("a").completed_rounds == 3
    assert _checkpoint_rounds(path, "a") == [3]

    for call in (
        lambda: store.save_checkpoint("missing", 1, b""),
        lambda: store.latest_checkpoint("missing"),
    ):
        with pytest.raises(StoreError, match="unknown run 'missing'"):
            call()
    store.close()


def test_corrupted_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    store = Store(path)
    store.create_run("a", "", rounds=2, out="a")
    store.save_checkpoint("a", 1, b"adapter 1")
    store.save_checkpoint("a", 2, b"adapter 2")
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE checkpoints SET data = ? WHERE run_id = 'a' AND round = 2", (b"adapter X",))
    with pytest.raises(StoreError, match="round 2 does not match its checksum"):
        store.latest_checkpoint("a")
    store.close()


def test_logs_after_and_trim(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_LOG_LINES", 3)
    store.create_run("a", "", rounds=1, out="a")
    store.create_run("b", "", rounds=1, out="b")
    assert store.logs("a") == []
    seqs = [store.append_log(run_id, f"{run_id} {i}") for i in range(5) for run_id in ("a", "b")]
    assert seqs == sorted(set(seqs))  # increasing across the whole store

    a_lines = store.logs("a")
    assert [line for _, line in a_lines] == ["a 2", "a 3", "a 4"]
    assert [line for _, line in store.logs("b")] == ["b 2", "b 3", "b 4"]
    assert store.logs("a", after=a_lines[0][0]) == a_lines[1:]
    assert store.logs("a", after=a_lines[-1][0]) == []
    for call in (lambda: store.append_log("missing", "x"), lambda: store.logs("missing")):
        with pytest.raises(StoreError, match="unknown run 'missing'"):
            call()


def test_concurrent_writers_from_threads(store: Store) -> None:
    store.create_run("a", "", rounds=1, out="a")
    seqs: list[int] = []

    def write(worker: int) -> None:
        for i in range(10):
            seqs.append(store.append_log("a", f"{worker}:{i}"))
            store.append_row("a", {"round": i, "worker": worker})

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seqs)) == 40 and len(store.logs("a")) == 40 and len(store.rows("a")) == 40


def test_reopen_sees_everything(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    first = Store(path)
    first.create_run("a", "rounds = 2\n", rounds=2, out="a")
    first.create_run("b", "", rounds=1, out="b")
    first.set_state("a", "running")
    first.append_row("a", {"round": 1, "loss": 0.5})
    first.save_checkpoint("a", 1, b"adapter 1")
    seq = first.append_log("a", "round 1 done")
    first.set_state("b", "failed", "bad config")
    runs = first.list_runs()
    first.close()

    second = Store(path)
    assert second.list_runs() == runs
    assert [run.id for run in second.unfinished()] == ["a"]
    assert second.rows("a") == [{"round": 1, "loss": 0.5}]
    assert second.latest_checkpoint("a") == StoredCheckpoint(round=1, data=b"adapter 1")
    assert second.logs("a") == [(seq, "round 1 done")]
    assert second.append_log("a", "resumed") > seq
    second.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION


CHILD = """
import os, signal, sys
from pathlib import Path
from coordinator.store import Store

store = Store(Path(sys.argv[1]))
store.create_run("a", "rounds = 3\\n", rounds=3, out="a")
store.set_state("a", "running")
for round_ in (1, 2):
    store.append_row("a", {"round": round_, "loss": 1.0 / round_})
    store.save_checkpoint("a", round_, b"adapter %d" % round_)
    store.append_log("a", "round %d done" % round_)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_committed_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    command = [sys.executable, "-c", textwrap.dedent(CHILD), str(path)]
    child = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=30, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()

    store = Store(path)
    run = store.get_run("a")
    assert run is not None and (run.state, run.completed_rounds) == ("running", 2) and run.started is not None
    assert store.rows("a") == [{"round": 1, "loss": 1.0}, {"round": 2, "loss": 0.5}]
    assert store.latest_checkpoint("a") == StoredCheckpoint(round=2, data=b"adapter 2")
    assert [line for _, line in store.logs("a")] == ["round 1 done", "round 2 done"]
    store.close()


def test_refuses_newer_schema_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {store_module.SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version 2"):
        Store(path)

    garbage = tmp_path / "not-a-database.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable coordinator store"):
        Store(garbage)
