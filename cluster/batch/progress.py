"""The closing line of a batch job (Ray Data draws the progress while it runs)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Summary:
    """Rows this run wrote (ok: answered, failed: an error row) and their completion tokens.

    `done_before` rows were in the output already (a resumed job).
    """

    done_before: int = 0
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def finish(self, ok: int, failed: int, tokens: int, ended: float) -> None:
        self.ok, self.failed, self.tokens, self.ended = ok, failed, tokens, ended

    @property
    def wall_s(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def rows_per_s(self) -> float:
        return (self.ok + self.failed) / self.wall_s if self.wall_s > 0 else 0.0

    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        before = f" ({self.done_before} done by an earlier run)" if self.done_before else ""
        return (
            f"batch done: {self.ok} ok, {self.failed} failed{before}; {self.tokens} tokens generated; "
            f"wall time {self.wall_s:.1f} s; {self.rows_per_s():.1f} rows/s, "
            f"{self.tokens_per_s():.1f} tokens/s"
        )
