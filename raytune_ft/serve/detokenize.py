"""Incremental detokenisation for streamed answers: the text of generated ids as it grows, emitted only once it
can no longer change, and cut at stop strings.

Two things make the text of a prefix of the ids unsafe to send yet:
  * a character spelt by several tokens (byte-level tokenizers split UTF-8 sequences): until its last byte arrives,
    decoding gives U+FFFD for it, which must not reach the client;
  * a stop string spelt by several tokens: its first pieces must be held back until it is clear whether the stop
    string follows (then nothing of it is sent) or not (then the held text is sent).
It assumes the text of a prefix of the ids, up to such a held tail, does not change when more ids come: true of
byte-level BPE and SentencePiece decoding. Not of the WordPiece "tokenization spaces" cleanup (" ." becoming ".");
transformers 5 ignores that setting for BPE tokenizers, the generative ones.
"""

from __future__ import annotations

from typing import Any

from raytune_ft.generation import END_OF_TURN

REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


def end_of_turn_markers(tokenizer: Any) -> list[str]:
    """The markers `generation.answer_text` cuts an answer at, when they are spelt in the text: ChatML's and Llama
    3's end of turn, and the tokenizer's end of sequence."""
    markers = [*END_OF_TURN[:2], getattr(tokenizer, "eos_token", None)]
    return [m for m in dict.fromkeys(markers) if isinstance(m, str) and m]


class TextStream:
    """Incremental text of generated token ids for streaming: push() returns the new text that is safe to emit.

    Every push decodes all ids so far (skip_special_tokens=True, as the non-streamed answer is decoded) and emits
    the part of that text past what was emitted before, minus a held-back tail: an incomplete UTF-8 sequence, or
    the start of a stop string. The concatenation of every push() and the final flush() is the non-streamed text
    cut before the first stop string (end-of-turn markers included).
    """

    def __init__(self, tokenizer: Any, stop: list[str] | tuple = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._stops = [s for s in dict.fromkeys([*stop, *end_of_turn_markers(tokenizer)]) if s]
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        full = self._decode()
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full, cut)
        return self._emit(full, self._safe_end(full))

    def flush(self) -> str:
        """Whatever was held back: a stop string's start that no stop string followed, or bytes that never
        completed a character (sent as U+FFFD, as the non-streamed text has them)."""
        if self.stopped:
            return ""
        full = self._decode()
        return self._emit(full, len(full))

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def _emit(self, full: str, end: int) -> str:
        piece = full[len(self.text) : max(end, len(self.text))]
        self.text += piece
        return piece

    def _first_stop(self, full: str) -> int | None:
        """Where the first stop string starts in FULL, if one does. The search starts a stop's length before the
        unsent text: a stop string cannot start inside sent text (its start would have been held back)."""
        start = max(0, len(self.text) - max((len(s) for s in self._stops), default=0))
        found = [i for i in (full.find(s, start) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _safe_end(self, full: str) -> int:
        """The end of the text that can be sent now: before any trailing U+FFFD (a character still missing bytes),
        and before the longest tail that a stop string starts with."""
        end = len(full)
        while end > len(self.text) and full[end - 1] == REPLACEMENT:
            end -= 1
        longest = min(max((len(s) for s in self._stops), default=1) - 1, end - len(self.text))
        for k in range(longest, 0, -1):
            tail = full[end - k : end]
            if any(s.startswith(tail) for s in self._stops):
                return end - k
        return end
