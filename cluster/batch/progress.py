"""Progress of a batch job: a redrawn bar on a terminal, a plain log line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
TTY_REDRAW_S = 0.2


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts records done (ok or failed) and generated tokens against `total` records.

    `done_before` records were finished by an earlier run (a resumed job): they count as done, but the
    rates and the ETA come from this run's work only, from `begin()` (engines ready) on.
    """

    def __init__(
        self,
        total: int,
        done_before: int = 0,
        stream: TextIO | None = None,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.done_before = total, done_before
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = TTY_REDRAW_S if self.tty else interval_s
        self.clock = clock
        self.ok = self.failed = self.tokens = 0
        self.started = self.generating_since = clock()
        self.ended: float | None = None
        self._last_render = -float("inf")

    @property
    def done(self) -> int:
        return self.done_before + self.ok + self.failed

    def now(self) -> float:
        return self.clock() if self.ended is None else self.ended

    def begin(self) -> None:
        """Marks the end of start-up: rates count from here."""
        self.generating_since = self.clock()
        self.render()

    def tokens_per_s(self) -> float:
        seconds = self.now() - self.generating_since
        return self.tokens / seconds if seconds > 0 else 0.0

    def update(self, ok: int = 0, failed: int = 0, tokens: int = 0) -> None:
        self.ok, self.failed, self.tokens = self.ok + ok, self.failed + failed, self.tokens + tokens
        self.tick()

    def tick(self) -> None:
        """Renders if the last rendering is older than the interval."""
        if self.clock() - self._last_render >= self.interval_s:
            self.render()

    def render(self) -> None:
        self._last_render = self.clock()
        if self.tty:
            self.stream.write(f"\r{self.line()}\033[K")
        else:
            self.stream.write(f"batch: {self.line()}\n")
        self.stream.flush()

    def close(self) -> None:
        """Stops the clock and renders the final counts (ending the bar's line on a terminal)."""
        self.ended = self.clock()
        self.render()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        records_now = self.ok + self.failed
        seconds = self.now() - self.generating_since
        remaining = self.total - self.done
        eta = 0.0 if remaining <= 0 else remaining * seconds / records_now if records_now else None
        fraction = self.done / self.total if self.total else 1.0
        counts = f"{self.done}/{self.total} records"
        if self.tty:
            filled = round(fraction * BAR_WIDTH)
            counts = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {counts}"
        return (
            f"{counts} ({fraction:.0%}), {self.failed} failed, {self.tokens} tokens, "
            f"{self.tokens_per_s():.1f} tokens/s, ETA {_clock(eta)}"
        )

    def summary(self) -> str:
        now = self.now()
        before = f" ({self.done_before} done by an earlier run)" if self.done_before else ""
        return (
            f"batch done: {self.ok} ok, {self.failed} failed{before}; {self.tokens} tokens generated; "
            f"wall time {now - self.started:.1f} s ({self.generating_since - self.started:.1f} s start-up); "
            f"{self.tokens_per_s():.1f} tokens/s after start-up"
        )
