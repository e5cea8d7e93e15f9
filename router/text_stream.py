"""Token ids to text deltas, with stop strings, for streaming.

Byte-level tokens can end mid-character, and a stop string can arrive split over several tokens, so
text is released only once it can no longer change: never a trailing replacement character, never
a tail that might still grow into a stop string. The concatenated deltas therefore equal the final
text exactly, which is what makes streamed and non-streamed responses identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stop: Sequence[str] = (),
        previous: Sequence[int] = (),
        sent: int = 0,
    ) -> None:
        """`previous` / `sent`: tokens already generated and characters already released, on resumption."""
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = list(previous)
        self.text = decode(self.token_ids) if self.token_ids else ""  # final text so far
        self._sent = sent
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that became final. Sets `stopped` when a stop string appeared."""
        self.token_ids.append(token_id)
        text = self._decode(self.token_ids)
        search_from = max(0, len(self.text) - self._hold)
        cuts = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self._release(len(self.text))
        self.text = text
        safe = len(text) - self._hold
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._release(safe)

    def finish(self) -> str:
        """The held-back tail, once the sequence has ended."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta = self.text[self._sent : upto]
        self._sent = upto
        return delta
