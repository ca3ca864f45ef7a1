"""A completion's text while its tokens arrive, for `stream: true`: what may be sent now, and the rest at the end.

Token ids are decoded in a sliding window (the text of the tokens since the previous window's start, minus the text
that window already gave: the way TGI and vLLM detokenize incrementally), so a token costs a decode of a few tokens
and a tokenizer that drops a leading space when a piece is decoded alone still gives the whole text. Text is held
back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could be the start of a stop string, and nothing at or
after a stop string is ever sent: the deltas add up to the final, stop-cut text (`finish` sends what is left of it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class TextStream:
    """One choice's text: `push(ids)` -> the new text that is safe to send (maybe ""), `finish(text)` -> the rest
    of the final `text` (the completion cut at its first stop string, as `serve.generate` cuts it)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may have started this far back
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window's first token
        self.read_offset = 0  # tokens before this are in `text`
        self.text = ""  # decoded so far (complete characters only)
        self.sent = ""  # sent so far: a prefix of `text` before any stop string
        self.stopped = False  # a stop string was seen: nothing more is sent

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) <= len(before) or window.endswith(_REPLACEMENT) or not window.startswith(before):
            return ""  # nothing new yet, or the new token ends mid-character
        self.text += window[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            safe = self.text[: min(cuts)]
        else:
            safe = self.text[: max(len(self.sent), len(self.text) - self.hold)]
        return self._send(safe)

    def _send(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final: str) -> str:
        """The part of `final` not sent yet. Should the sent text not begin `final` (a tokenizer whose pieces do
        not decode to the whole), the mismatch is logged and nothing more is sent."""
        if final.startswith(self.sent):
            delta, self.sent = final[len(self.sent):], final
            return delta
        log.warning("streamed text %r is not a prefix of the final text %r: the stream ends short",
                    self.sent[-40:], final[:40])
        return ""
