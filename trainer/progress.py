"""A training job's step reports, from the worker thread to the Train call's reply stream.

The learner calls the reporter after every step; the reporter passes one on at most every
`interval` seconds, and the reply stream sends only the latest: a report costs the job a clock
read, and the wire a dozen bytes a few times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import SupportsFloat

from phalanx.v1 import trainer_pb2

PROGRESS_SECONDS = 0.25


class StepReporter:
    """Thread-safe: called from the worker thread, it hands reports to the event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float = PROGRESS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._clock = clock
        self._last = clock()
        self._latest: trainer_pb2.TrainProgress | None = None
        self._ready = asyncio.Event()

    def __call__(self, step: int, loss: SupportsFloat) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        report = trainer_pb2.TrainProgress(step=step, loss=float(loss))
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self._loop.call_soon_threadsafe(self._post, report)

    def _post(self, report: trainer_pb2.TrainProgress) -> None:
        self._latest = report
        self._ready.set()

    async def reports_until(self, done: asyncio.Future) -> AsyncIterator[trainer_pb2.TrainProgress]:
        """The latest report each time one comes, until the job `done` finishes (await it for its result)."""
        while not done.done():
            waiter = asyncio.ensure_future(self._ready.wait())
            await asyncio.wait({done, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._latest is not None and not done.done():
                report, self._latest = self._latest, None
                self._ready.clear()
                yield report
