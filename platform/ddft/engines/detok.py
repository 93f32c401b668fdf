"""Incremental detokenization for streamed answers: new text as tokens arrive, never a stop string.

Each step decodes the row's tokens so far (the same decode as the final answer, so the deltas
add up to it) and emits only the part that can no longer change:
- text after the first stop string is cut (the stop string itself is never sent);
- a tail that could still grow into a stop string is held back until it can't;
- a trailing "\ufffd" is held back: it may be an incomplete UTF-8 character (byte-level tokens);
- leading and trailing whitespace is held back, since the final answer is stripped.
So the deltas joined equal the final `GenerateResult.text` exactly.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest of the stop strings starts in text (None: none occurs)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text in logprobs, the same on both engines: the token decoded alone, special
    tokens kept ("\ufffd" for a byte-level piece of a character). vLLM's own `decoded_token` isn't
    used: it also restores leading spaces and repairs split characters from the tokens around it."""
    return tokenizer.decode([int(token_id)])


def settled(raw: str, stops: list[str]) -> str:
    """The part of a row's decoded text so far that the final answer is sure to start with."""
    cut = first_stop(raw, stops)
    if cut is not None:
        raw = raw[:cut]
    else:  # hold back the longest tail that is the start of a stop string
        hold = max((k for s in stops for k in range(1, len(s)) if raw.endswith(s[:k])), default=0)
        raw = raw[: len(raw) - hold]
    return raw.rstrip("\ufffd").strip()


class TextStream:
    """One row's text: `add(token_ids)` -> the new text to send; `finish(final_text)` -> the rest."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        return self._advance(settled(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops))

    def finish(self, final: str) -> str:
        delta = self._advance(final)
        if self.sent != final:  # a decode that rewrote earlier text: what was sent can't be taken back
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent[:80], final[:80])
        return delta

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # not settled yet (a later decode changed earlier text): wait for more
        delta, self.sent = text[len(self.sent) :], text
        return delta
