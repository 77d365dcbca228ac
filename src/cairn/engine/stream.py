"""Turning a stream of token ids into a stream of text that is safe to show.

Two rules: text is never cut inside a UTF-8 character (tokens are decoded from their raw bytes with an
incremental decoder), and text that might be the start of a stop sequence is held back until it is known not to
be one, so a stop string that straddles token boundaries is neither shown nor lost.
"""

from __future__ import annotations

import codecs


class StopMatcher:
    """Finds the earliest stop string in a growing text; releases only text that cannot begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add ``text``; return ``(text safe to emit, the stop string matched or None)``.

        After a match, the emitted text ends right before the stop string and nothing more should be pushed.
        The stop that *completes* first wins (ties: the one that starts first), as it would token by token, so
        the result does not depend on how the text was split into pieces.
        """
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, None
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            out = self.pending[: best[1]]
            self.pending = ""
            return out, best[2]
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Token ids in, displayable text out (special tokens are not shown)."""

    def __init__(self, token_bytes: list[bytes], stops: list[str] | None = None):
        self.token_bytes = token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = StopMatcher(stops or [])
        self.text = ""  # everything emitted so far

    def push(self, token: int) -> tuple[str, str | None]:
        raw = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else b""
        out, matched = self.stop.push(self.decoder.decode(raw))
        self.text += out
        return out, matched

    def finish(self) -> str:
        """Release what was held back (the text ended without a stop string). Bytes of a character that the
        last token left incomplete (a cut by ``max_tokens`` inside a multi-byte character) are dropped, never
        shown as U+FFFD: the text ends at the last whole character."""
        self.decoder.reset()
        out, matched = self.stop.push("")
        if matched is None:
            out += self.stop.flush()
        self.text += out
        return out
