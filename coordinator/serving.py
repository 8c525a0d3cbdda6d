"""A coordinator that serves many runs over one federation: `python -m coordinator --serve`.

Runs are submitted as TOML (`coordinator.run_config`), kept in the store (`coordinator.store`)
with their state, rows, checkpoints and log, and executed as `Run`s hosted by one `Federation`:
at most `max_runs` at once, the rest pending in the order they came. A run's log is what the
coordinator logs inside the run's task and its worker threads, told apart by a context variable.

Restarted on the same state directory, the coordinator lists the same runs and resumes the
unfinished ones after their last checkpoint; sites register again by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import FederationConfig
from coordinator.federation import Federation
from coordinator.outputs import Checkpoint, checkpoint_bytes, checkpoint_of
from coordinator.plots import plot_run
from coordinator.registry import TrainerEntry
from coordinator.run import RoundFailed, Run
from coordinator.run_config import RunConfigError, parse_run_toml, run_config
from coordinator.store import FINISHED_STATES, RunRecord, Store, StoreError
from phalanx.cli import data_config, label_names
from phalanx.data import DataError
from phalanx.identity import escaped
from phalanx.model import ModelError
from phalanx.telemetry import Telemetry
from phalanx.v1 import coordinator_pb2, run_pb2

log = logging.getLogger(__name__)

RUN_SERVICE_NAME = run_pb2.DESCRIPTOR.services_by_name["RunService"].full_name
DEFAULT_MAX_RUNS = 4
SUBSCRIBER_BACKLOG = 10_000
"""Events a StreamRun reader may fall behind by before its stream is ended."""
STOPPED_BY_ADMIN = "stopped by an admin"

current_run: ContextVar[str | None] = ContextVar("phalanx_current_run", default=None)


class RunNotFound(KeyError):
    """No run has this id."""


class RunFinished(RuntimeError):
    """The run has already finished: it cannot be stopped."""


@dataclass(frozen=True)
class Event:
    """Something that happened in a run: a row (`index` in its rows), a log line (`index`: its
    sequence number in the store), or its new state."""

    kind: str  # "row", "log", "state" or "overflow" (the reader fell behind)
    index: int = 0
    row: Mapping[str, Any] | None = None
    line: str = ""
    record: RunRecord | None = None


class RunEvents:
    """Readers of runs' events (StreamRun), each with a bounded queue."""

    def __init__(self) -> None:
        self._readers: dict[str, set[asyncio.Queue[Event]]] = {}

    def subscribe(self, run_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self._readers.setdefault(run_id, set()).add(queue)
        return queue

    def unsubscribe(self, run_id: str, queue: asyncio.Queue[Event]) -> None:
        readers = self._readers.get(run_id, set())
        readers.discard(queue)
        if not readers:
            self._readers.pop(run_id, None)

    def publish(self, run_id: str, event: Event) -> None:
        for queue in list(self._readers.get(run_id, ())):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a reader that fell this far behind is told so and dropped
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(Event("overflow"))
                self.unsubscribe(run_id, queue)


class RunLogHandler(logging.Handler):
    """Hands the log records made within a run (its task, or a worker thread it started) to `sink`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Callable[[str, str], None]) -> None:
        super().__init__()
        self._loop = loop
        self._sink = sink
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        run_id = current_run.get()
        if run_id is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self._loop.call_soon_threadsafe(self._sink, run_id, self.format(record))


class StoredOutputs:
    """A served run's rows and checkpoints in the store; its metrics.jsonl and run.log mirrored in its folder."""

    def __init__(self, store: Store, run_id: str, out: Path, on_row: Callable[[int, Mapping[str, Any]], None]) -> None:
        self._store = store
        self._run_id = run_id
        self.out = out
        self._on_row = on_row
        self._rows = 0
        out.mkdir(parents=True, exist_ok=True)

    def resume(self) -> Checkpoint | None:
        """The latest checkpoint, with the rows written after it dropped (a crash between the two)."""
        stored = self._store.latest_checkpoint(self._run_id)
        checkpoint = checkpoint_of(stored.data) if stored is not None else None
        self._store.truncate_rows(self._run_id, checkpoint.round if checkpoint is not None else -1)
        rows = self._store.rows(self._run_id)
        self._rows = len(rows)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (self.out / "metrics.jsonl").write_text(text, encoding="utf-8")
        return checkpoint

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        self._store.append_row(self._run_id, row)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self._on_row(self._rows, row)
        self._rows += 1

    def save_checkpoint(self, round_: int, adapter: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        self._store.save_checkpoint(self._run_id, round_, checkpoint_bytes(round_, adapter, metadata))


class ServingCoordinator:
    def __init__(
        self,
        config: FederationConfig,
        telemetry: Telemetry,
        state_dir: Path,
        *,
        max_runs: int = DEFAULT_MAX_RUNS,
        can_sign: bool = False,
    ) -> None:
        """`can_sign`: the sites have certificates, so runs may use secure aggregation."""
        self.store = Store(state_dir / "state.sqlite")
        self.runs_dir = state_dir / "runs"
        self.events = RunEvents()
        self.federation = Federation(
            config, telemetry, state=lambda: coordinator_pb2.RUN_STATE_RUNNING, services=[RUN_SERVICE_NAME]
        )
        self.hosted: dict[str, Run] = {}
        """The runs executing now."""
        self._can_sign = can_sign
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._turns = asyncio.Semaphore(max_runs)
        self._stopping: set[str] = set()
        self._lines: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._handler: RunLogHandler | None = None
        self.started = time.time()

    async def start(self) -> str:
        """Serve, and resume the runs the store holds unfinished; return the federation's address."""
        address = await self.federation.start()
        loop = asyncio.get_running_loop()
        self._handler = RunLogHandler(loop, lambda run_id, line: self._lines.put_nowait((run_id, line)))
        logging.getLogger().addHandler(self._handler)
        self._writer = loop.create_task(self._write_logs())
        for record in await asyncio.to_thread(self.store.unfinished):
            log.info("resuming run %s (%s, %d of %d rounds done)", record.id, record.state, record.completed_rounds, record.rounds)
            self._launch(record)
        return address

    async def submit(self, config_text: str) -> RunRecord:
        """Add a run; raise RunConfigError if its configuration cannot be used."""
        args = parse_run_toml(config_text, can_sign=self._can_sign)
        run_id = uuid.uuid4().hex
        record = await asyncio.to_thread(
            self.store.create_run, run_id, config_text, args.rounds, str(self.runs_dir / run_id)
        )
        log.info("run %s submitted (%d rounds)", run_id, args.rounds)
        self._launch(record)
        return record

    async def stop(self, run_id: str) -> RunRecord:
        """Stop a pending or running run; the round in flight is abandoned."""
        record = await self.get(run_id)
        task = self._tasks.get(run_id)
        if record.state in FINISHED_STATES or task is None:
            raise RunFinished(f"run {run_id} has already finished ({record.state})")
        self._stopping.add(run_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return await self.get(run_id)

    async def get(self, run_id: str) -> RunRecord:
        record = await asyncio.to_thread(self.store.get_run, run_id)
        if record is None:
            raise RunNotFound(run_id)
        return record

    async def list(self) -> list[RunRecord]:
        return await asyncio.to_thread(self.store.list_runs)

    def sites(self) -> list[dict[str, Any]]:
        live = {e.name for e in self.federation.registry.live()}
        now = time.monotonic()
        return [_site_json(e, e.name in live, now) for e in self.federation.registry.all()]

    async def flush_logs(self) -> None:
        """Wait until every log line made so far is stored."""
        await self._lines.join()

    async def close(self) -> None:
        """Stop serving; runs in flight stay unfinished in the store, to resume at the next start."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        if self._writer is not None:
            await self._lines.join()
            self._writer.cancel()
        await self.federation.close()
        self.store.close()

    def _launch(self, record: RunRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._host(record))
        self._tasks[record.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(record.id, None))

    async def _host(self, record: RunRecord) -> None:
        """Wait for a turn, execute the run, and record how it ended."""
        current_run.set(record.id)
        try:
            async with self._turns:
                await self._set_state(record.id, "running")
                stop_reason = await self._execute(record)
            await self._set_state(record.id, "completed", stop_reason)
        except asyncio.CancelledError:
            if record.id not in self._stopping:
                raise  # the coordinator is stopping: the run stays unfinished, to resume
            log.info("run %s stopped by an admin", record.id)
            await self._set_state(record.id, "stopped", STOPPED_BY_ADMIN)
        except (RoundFailed, RunConfigError, DataError, ModelError, StoreError, ValueError) as exc:
            log.warning("run %s failed: %s", record.id, exc)
            await self._set_state(record.id, "failed", escaped(exc, 1000))
        except TimeoutError:
            reason = "too few sites registered within register-timeout"
            log.warning("run %s failed: %s", record.id, reason)
            await self._set_state(record.id, "failed", reason)
        except Exception as exc:  # a bug must not take the other runs down
            log.exception("run %s failed", record.id)
            await self._set_state(record.id, "failed", f"internal error: {type(exc).__name__}: {escaped(exc, 500)}")
        finally:
            self.hosted.pop(record.id, None)
            self._stopping.discard(record.id)

    async def _execute(self, record: RunRecord) -> str:
        """Run `record` from its last checkpoint to its end; return why it ended early, or ""."""
        from phalanx.model import adapter_state, build_model, save_adapter
        from phalanx.sites import load_source

        args = parse_run_toml(record.config, can_sign=self._can_sign)
        labels = label_names(args) or (await asyncio.to_thread(load_source, data_config(args))).label_names
        config = run_config(args, labels, register_timeout=args.register_timeout)
        model = await asyncio.to_thread(build_model, config.model)
        adapter = await asyncio.to_thread(adapter_state, model)
        outputs = StoredOutputs(
            self.store, record.id, Path(record.out), lambda i, row: self.events.publish(record.id, Event("row", i, row))
        )
        checkpoint = await asyncio.to_thread(outputs.resume)
        start_round, resumed = 1, None
        if checkpoint is not None:
            start_round, adapter, resumed = checkpoint.round + 1, checkpoint.adapter, checkpoint.metadata
            log.info("run %s resumes after round %d", record.id, checkpoint.round)
        run = Run(config, self.federation, outputs, adapter, run_id=record.id, start_round=start_round, resumed=resumed)
        if checkpoint is not None:
            run.replay(await asyncio.to_thread(self.store.rows, record.id))
        self.hosted[record.id] = run
        await run.execute()
        await asyncio.to_thread(
            save_adapter, model, run.adapter, Path(record.out) / "adapter", model_name=args.model, label_names=labels
        )
        rows = await asyncio.to_thread(self.store.rows, record.id)
        await asyncio.to_thread(plot_run, rows, Path(record.out) / "plot.png", f"run {record.id}")
        return run.stop_reason

    async def _set_state(self, run_id: str, state: str, reason: str = "") -> None:
        record = await asyncio.to_thread(self.store.set_state, run_id, state, reason)
        self.events.publish(run_id, Event("state", record=record))

    async def _write_logs(self) -> None:
        """Store each run's log lines in order, mirror them to its run.log, and tell its readers."""
        while True:
            run_id, line = await self._lines.get()
            try:
                seq = await asyncio.to_thread(self._store_line, run_id, line)
                self.events.publish(run_id, Event("log", seq, line=line))
            except (StoreError, OSError) as exc:
                print(f"cannot keep a log line of run {run_id}: {exc}", file=sys.stderr)
            finally:
                self._lines.task_done()

    def _store_line(self, run_id: str, line: str) -> int:
        seq = self.store.append_log(run_id, line)
        folder = self.runs_dir / run_id
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "run.log", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return seq


def _site_json(entry: TrainerEntry, live: bool, now: float) -> dict[str, Any]:
    return {
        "name": entry.name,
        "address": entry.address,
        "partition": entry.partition,
        "num_train_examples": entry.num_train_examples,
        "num_test_examples": entry.num_test_examples,
        "live": live,
        "seconds_since_heard": round(now - entry.last_seen, 3),
    }
