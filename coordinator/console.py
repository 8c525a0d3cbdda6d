"""A run's progress drawn in place on a terminal: the round and phase, then one line per site asked.

The display redraws from the event loop a few times a second and reads `RunProgress` there, so it
needs no lock; lines printed meanwhile (the report's, log records, stray prints) go above it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from coordinator.progress import RunProgress, SiteActivity

REFRESH_SECONDS = 0.25
STATE_STYLES = {
    "training": "cyan",
    "evaluating": "cyan",
    "answered": "green",
    "failed": "red",
    "rejected": "red",
}


def can_draw(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that can redraw lines in place."""
    return stream.isatty() and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")


def duration(seconds: float) -> str:
    """`0:45`, `12:03`, `1:02:03`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def round_label(round_: int, total: int) -> str:
    return "initial evaluation" if round_ == 0 else f"round {round_}/{total}"


def headline(progress: RunProgress) -> str:
    """`round 3/8 · train · 2/3 sites answered · 0:45 elapsed · about 2:10 left`."""
    if progress.phase == "finished":
        parts = ["finished"]
    elif progress.round < 0:
        parts = ["waiting for trainers"]
    else:
        parts = [round_label(progress.round, progress.total_rounds)]
        if progress.asked:
            parts += [progress.phase, f"{progress.answered()}/{len(progress.asked)} sites answered"]
        elif progress.phase == "aggregate":
            parts.append("aggregating the updates")
    parts.append(f"{duration(progress.elapsed())} elapsed")
    if (eta := progress.eta_seconds()) is not None:
        parts.append(f"about {duration(eta)} left")
    return " · ".join(parts)


def site_state(site: SiteActivity) -> Text:
    label = f"{site.state}: {site.last_failure}" if site.state in ("failed", "rejected") else site.state
    return Text(label, style=STATE_STYLES.get(site.state, ""), no_wrap=True, overflow="ellipsis")


def render(progress: RunProgress) -> RenderableType:
    """The headline, then a row per site asked: in training its steps as a bar and a count, and its loss."""
    training = progress.phase == "train"
    sites = Table.grid(padding=(0, 2))
    sites.add_column(no_wrap=True)
    if training:
        sites.add_column(no_wrap=True)
        sites.add_column(justify="right", no_wrap=True)
        sites.add_column(no_wrap=True)
    sites.add_column()  # the state: the column that gives way on a narrow terminal
    for name in progress.asked:
        site = progress.sites[name]
        cells: list[RenderableType] = [name]
        if training:
            bar = ProgressBar(
                site.steps, site.step, width=20, complete_style="magenta", finished_style="green"
            )
            loss = f"loss {site.loss:.4f}" if site.loss is not None else ""
            cells += [bar, f"{site.step}/{site.steps}", loss]
        sites.add_row(*cells, site_state(site))
    return Group(Text(headline(progress), style="bold"), sites)


class LiveDisplay:
    """`progress` redrawn on the terminal `stream` until stop(); print() puts a line above it.

    Start and stop it on the event loop that updates `progress`.
    """

    def __init__(self, stream: TextIO, progress: RunProgress) -> None:
        self.console = Console(file=stream, force_terminal=True)
        self._live = Live(
            console=self.console, auto_refresh=False, transient=True, get_renderable=lambda: render(progress)
        )
        self._timer: asyncio.TimerHandle | None = None
        self._log_streams: dict[logging.StreamHandler, TextIO] = {}

    def start(self) -> None:
        self._live.start(refresh=True)
        self._route_logs()
        self._timer = asyncio.get_running_loop().call_later(REFRESH_SECONDS, self._tick)

    def print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for handler, stream in self._log_streams.items():
            handler.setStream(stream)
        self._log_streams.clear()
        self._live.stop()

    def _tick(self) -> None:
        self._live.refresh()
        self._timer = asyncio.get_running_loop().call_later(REFRESH_SECONDS, self._tick)

    def _route_logs(self) -> None:
        """Log records that would go straight to a terminal print above the display instead."""
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "isatty", lambda: False)():
                self._log_streams[handler] = handler.setStream(FileProxy(self.console, stream))
