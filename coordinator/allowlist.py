"""`--allow-sites FILE`: which sites may join, and optionally the most weight each may carry.

One site a line, `#` starts a comment:

    site-a
    site-b 5000     # site-b's FedAvg weight is capped at 5000 examples

The file is read again whenever its modification time or size changes, so an operator can
remove a site while a run goes on: it is no longer sampled from the next round. A file that
cannot be read or parsed keeps the last good list and logs why (a half-written edit must not
open the federation to everyone).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phalanx.identity import check_site_name, printable

log = logging.getLogger(__name__)

MAX_SITES = 100_000


class AllowlistError(ValueError):
    """The allowlist file is malformed."""


@dataclass(frozen=True)
class Entry:
    name: str
    max_weight: float = math.inf


def parse(text: str) -> dict[str, Entry]:
    """Site name -> entry; raises AllowlistError naming the first bad line."""
    entries: dict[str, Entry] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or len(entries) >= MAX_SITES:
            raise AllowlistError(f"line {number}: expected `NAME [MAX_WEIGHT]`, got {printable(line)}")
        try:
            name = check_site_name(fields[0])
            weight = float(fields[1]) if len(fields) == 2 else math.inf
        except ValueError as exc:
            raise AllowlistError(f"line {number}: {exc}") from None
        if not weight > 0:
            raise AllowlistError(f"line {number}: the weight cap must be positive, got {printable(fields[1])}")
        entries[name] = Entry(name, weight)
    return entries


class Allowlist:
    """The sites in a file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, Entry] = {}
        self._reload(initial=True)

    def sites(self) -> Mapping[str, Entry]:
        """The listed sites by name, as the file says now."""
        self._reload()
        return self._entries

    def allows(self, name: str) -> bool:
        return name in self.sites()

    def _reload(self, initial: bool = False) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = (-1, -1)  # gone: reported once, until it changes again
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            entries = parse(self.path.read_text())
        except (OSError, UnicodeDecodeError, AllowlistError) as exc:
            if initial:
                raise AllowlistError(f"cannot use --allow-sites {self.path}: {exc}") from exc
            log.error("keeping the previous allowlist: cannot use %s: %s", self.path, exc)
            return
        if not initial:
            log.info("allowlist %s changed: %d sites", self.path, len(entries))
        self._entries = entries
