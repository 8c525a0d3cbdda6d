"""The coordinator's progress: drawn in place on a terminal (sites' steps moving), plain lines without one."""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from coordinator.progress import RunProgress
from coordinator.report import Report

ROOT = Path(__file__).resolve().parent.parent
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ROUND_LINE = re.compile(r"round 1/1  loss \d")


def open_pty() -> tuple[int, int]:
    """A pseudo-terminal of 40 rows by 120 columns: its master and slave file descriptors."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    os.set_blocking(master, False)
    return master, slave


def text_stream(fd: int) -> TextIO:
    """A text stream that writes to `fd` (and leaves it open)."""
    return open(fd, "w", encoding="utf-8", closefd=False)


def read_available(master: int) -> bytes:
    """What the terminal has received since the last read; b"" when the writers have all closed."""
    chunks = []
    while select.select([master], [], [], 0)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the slave side is closed everywhere
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def screen_text(raw: bytes) -> str:
    """The characters written, without the escape sequences that move the cursor and set colours."""
    return ESCAPE.sub("", raw.decode("utf-8", "replace"))


def row(round_: int, seconds: float) -> dict:
    return {
        "round": round_, "loss": 0.9, "accuracy": 0.5, "trainers_accepted": 2 if round_ else 0,
        "trainers_sampled": 2 if round_ else 0, "seconds": seconds, "bytes_sent": 1000, "bytes_received": 2000,
        "status": "ok",
    }  # fmt: skip


async def test_a_terminal_shows_the_round_phase_answers_and_steps_moving(monkeypatch) -> None:
    # Rich takes its size from the process's standard streams (pytest's here): tell it the pty's.
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("LINES", "40")
    monkeypatch.setenv("TERM", "xterm-256color")
    master, slave = open_pty()
    stream = text_stream(slave)
    log_handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(log_handler)
    now = [100.0]
    progress = RunProgress("run", 3, clock=lambda: now[0])
    report = Report(3, stream)
    seen = ""

    async def shows(text: str, timeout: float = 5.0) -> int:
        """Wait until the terminal shows `text`; where it starts in the output so far."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            seen += screen_text(read_available(master))
        assert text in seen, seen
        return seen.index(text)

    try:
        report.watch(progress)
        await shows("waiting for trainers · 0:00 elapsed")
        progress.begin_round(0)
        progress.begin_phase("evaluate", ["site-a", "site-b"])
        await shows("initial evaluation · evaluate · 0/2 sites answered · 0:00 elapsed")
        await shows("site-b  evaluating")
        progress.round_done(row(0, 0.5))
        progress.begin_round(1)
        now[0] += 45
        progress.begin_phase("train", ["site-a", "site-b"], 10)
        progress.site_step("site-a", 3, 0.9)
        await shows("round 1/3 · train · 0/2 sites answered · 0:45 elapsed")
        early = await shows("3/10  loss 0.9000  training")
        progress.site_step("site-a", 7, 0.7)
        later = await shows("7/10  loss 0.7000  training")
        progress.site_answered("site-b", "train", "failed", "UNAVAILABLE: gone", 0, 0.0)
        await shows("1/2 sites answered")
        await shows("failed: round 1 train: UNAVAILABLE: gone")
        logging.getLogger("coordinator").warning("a log record")
        await shows("a log record\r\n")
        progress.begin_phase("aggregate")
        await shows("round 1/3 · aggregating the updates")
        report.round_done(row(1, 10.0))
        progress.round_done(row(1, 10.0))
        round_line = await shows("round 1/3  loss 0.9000  accuracy 0.500  trainers 2/2  10.0 s")
        progress.begin_round(2)
        progress.begin_phase("train", ["site-a", "site-b"], 10)
        await shows("round 2/3 · train · 0/2 sites answered · 0:45 elapsed · about 0:20 left")
        assert early < later < round_line
        report.say("[not markup]")
        await shows("[not markup]\r\n")
    finally:
        report.close()
        logging.getLogger().removeHandler(log_handler)
        stream.close()
        os.close(slave)
        os.close(master)
    assert log_handler.stream is stream


def test_without_a_terminal_the_report_is_plain_lines() -> None:
    out = io.StringIO()
    report = Report(2, out)
    progress = RunProgress("run", 2)
    report.watch(progress)
    progress.begin_round(0)
    progress.begin_phase("evaluate", ["site-a", "site-b"])
    progress.site_answered("site-a", "evaluate", "accepted", "", 100, 0.1)
    progress.site_answered("site-b", "evaluate", "accepted", "", 100, 0.1)
    report.round_done(row(0, 0.5))
    progress.round_done(row(0, 0.5))
    progress.begin_round(1)
    progress.begin_phase("train", ["site-a", "site-b"], 120)
    for step in range(1, 120):
        progress.site_step("site-a", step, 1.0 / step)
    progress.site_answered("site-a", "train", "accepted", "", 100, 1.0)
    progress.site_answered("site-b", "train", "rejected", "the adapter's shapes differ", 0, 0.0)
    progress.begin_phase("aggregate")
    report.round_done(row(1, 2.0))
    progress.round_done(row(1, 2.0))
    progress.finish()
    report.close()
    progress.begin_phase("train", ["site-a"], 1)  # after close(): nothing more
    assert out.getvalue().splitlines() == [
        "       initial  evaluate: 2 sites",
        "       initial  site-a evaluate accepted",
        "       initial  site-b evaluate accepted",
        "       initial  loss 0.9000  accuracy 0.500  evaluation  0.5 s  sent 0.00 MB  received 0.00 MB",
        "     round 1/2  train: 2 sites, 120 local steps each",
        "     round 1/2  site-a trained 120/120 steps, loss 0.0084 (accepted)",
        "     round 1/2  site-b train rejected: the adapter's shapes differ",
        "     round 1/2  loss 0.9000  accuracy 0.500  trainers 2/2  2.0 s  sent 0.00 MB  received 0.00 MB",
    ]


def coordinator(out: Path, common_flags: list[str], local_steps: int, **streams) -> subprocess.Popen:
    """`python -m coordinator` with two spawned trainers, one round of `local_steps` steps of 4 examples."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TERM="xterm-256color")
    command = [
        sys.executable, "-m", "coordinator", "--spawn-trainers", "2", "--listen", "127.0.0.1:0", "--out", str(out),
        "--rounds", "1", "--local-steps", str(local_steps), "--batch-size", "4", "--eval-max-examples", "20",
        *common_flags,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, start_new_session=True, **streams
    )


def read_until_exit(process: subprocess.Popen, master: int, timeout: float) -> bytes:
    """Everything `process` writes to the terminal `master`, until it exits; killed after `timeout` seconds."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([master], [], [], 0.5)
        chunk = read_available(master)
        chunks.append(chunk)
        if not chunk and process.poll() is not None:
            return b"".join(chunks)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise AssertionError(f"still running after {timeout} s:\n{screen_text(b''.join(chunks))}")


def steps_shown(text: str, local_steps: int, before: Callable[[str], bool]) -> dict[str, set[int]]:
    """For each site, the step counts its row showed in the lines before the first line where `before` holds."""
    shown: dict[str, set[int]] = {}
    site_row = re.compile(rf"^(\S+)\s.*\s(\d+)/{local_steps}  ")
    for line in re.split(r"[\r\n]+", text):
        if before(line):
            break
        if match := site_row.match(line):
            shown.setdefault(match[1], set()).add(int(match[2]))
    return shown


def test_a_coordinator_on_a_terminal_shows_each_sites_steps_moving(
    tmp_path: Path, common_flags: list[str]
) -> None:
    local_steps = 400
    master, slave = open_pty()
    try:
        process = coordinator(tmp_path / "out", common_flags, local_steps, stdout=slave, stderr=slave)
        os.close(slave)
        text = screen_text(read_until_exit(process, master, timeout=180))
    finally:
        os.close(master)
    assert process.returncode == 0, text
    assert "Finished 1 rounds" in text
    assert "round 1/1 · train · 0/2 sites answered" in text
    shown = steps_shown(text, local_steps, before=ROUND_LINE.search)
    moving = {site: sorted(s for s in steps if 0 < s < local_steps) for site, steps in shown.items()}
    assert any(len(steps) >= 2 for steps in moving.values()), text


def test_a_coordinator_writing_to_a_pipe_prints_plain_lines(tmp_path: Path, common_flags: list[str]) -> None:
    process = coordinator(
        tmp_path / "out", common_flags, 5, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stdout + stderr
    assert "\x1b" not in stdout
    lines = stdout.splitlines()
    for line in [
        "       initial  evaluate: 2 sites",
        "     round 1/1  train: 2 sites, 5 local steps each",
        "     round 1/1  partition-0 trained 5/5 steps",
        "     round 1/1  partition-1 trained 5/5 steps",
        "     round 1/1  evaluate: 2 sites",
    ]:
        assert any(text.startswith(line) for text in lines), (line, stdout)
    assert lines.index("     round 1/1  train: 2 sites, 5 local steps each") < next(
        i for i, text in enumerate(lines) if ROUND_LINE.search(text)
    )
