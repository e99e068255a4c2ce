"""Text of a generating row, a few tokens at a time, and stop strings over it.

Decoding each new token alone breaks multi-byte characters and word-initial spaces; decoding everything at
every step costs O(n) per token. As transformers' `TextStreamer` and vLLM do, a window of recent tokens is
decoded twice (without and with the new ones) and the difference is the new text; a window that ends in an
incomplete character (U+FFFD) waits for the next token.

Stop strings: the text is searched from where the previous search ended (minus the longest stop string),
the text from the first stop string on is dropped, and the tail that could still grow into a stop string
is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"


class IncrementalText:
    def __init__(self, detokenize: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.detokenize = detokenize
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._prefix = 0  # token offsets of the decoding window
        self._read = 0
        self.text = ""  # all text decoded so far (up to a stop string, once one is found)
        self._sent = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, tokens: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """`tokens` is every generated token so far (the new ones last). Returns (text safe to send now,
        whether a stop string was found)."""
        if self.stopped:
            return "", True
        before = self.detokenize(tokens[self._prefix : self._read])
        after = self.detokenize(tokens[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith(_INCOMPLETE)):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(tokens)
        if self.stop and self._find_stop():
            self.stopped = True
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held()), False

    def flush(self, tokens: Sequence[int]) -> str:
        """The row finished: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        out = ""
        if not self.stopped and self._read < len(tokens):
            out, _ = self.add(tokens, final=True)
        return out + self._release(len(self.text))

    def _find_stop(self) -> bool:
        start = max(0, self._sent - self._longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        for n in range(min(self._longest - 1, len(self.text) - self._sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        out = self.text[self._sent : end]
        self._sent = end
        return out
