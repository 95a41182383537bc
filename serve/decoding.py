"""Per-request decoding inside a batched `generate`: incremental text, stop strings, max_tokens.

transformers' TextIteratorStreamer follows one sequence; a server batches several requests into
one `generate`, each with its own limits and its own listener, so this is written here. The
incremental detokenisation is the usual one (TGI, vLLM): decode a short window twice and send
what the newer token added, holding back while the text ends in an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria

Emit = Callable[[str], None]


class Detokenizer:
    """Token ids -> text deltas whose concatenation equals decoding all ids at once. A `lazy` one
    decodes only at `flush` (nobody reads the text before the end)."""

    def __init__(self, tokenizer, lazy: bool = False):
        self.tokenizer, self.lazy = tokenizer, lazy
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decoded last time; ids[read:] not sent yet

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.lazy:
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class Row:
    """One request's share of a batch: its text so far and why it ended."""

    def __init__(self, tokenizer, max_new_tokens: int, stop: Sequence[str] = (), eos_ids: Sequence[int] = (),
                 emit: Emit | None = None):
        self.max_new_tokens, self.stop, self.eos_ids = max_new_tokens, [s for s in stop if s], set(eos_ids)
        # decoding twice per token costs the generating thread ~5% on a small model: only when read
        self.detok = Detokenizer(tokenizer, lazy=emit is None and not self.stop)
        self.emit = emit
        self.text = ""  # decoded so far, stop string cut off
        self.sent = 0  # characters of `text` handed to `emit`
        self.tokens = 0  # completion tokens, EOS included as OpenAI counts it
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled"
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def close(self) -> None:
        """`generate` ended without this row ending (its own length limit, say)."""
        if not self.done:
            self._end("length", self.detok.flush())

    def feed(self, token_id: int) -> None:
        if self.done:
            return
        self.tokens += 1
        if token_id in self.eos_ids:
            return self._end("stop", self.detok.flush())
        delta = self.detok.push(token_id)
        if self.tokens >= self.max_new_tokens:
            return self._end("length", delta + self.detok.flush())
        self.text += delta
        if self._cut_at_stop():
            return self._end("stop", "")
        self._send(len(self.text) - self._hold)

    def _cut_at_stop(self) -> bool:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i != -1]  # sent text held no stop
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _end(self, reason: str, tail: str) -> None:
        self.text += tail
        if self._cut_at_stop():
            reason = "stop"
        self.finish_reason = reason
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent : upto])
            self.sent = upto


class RowFeed(StoppingCriteria):
    """Hands each generated token to its row and tells `generate` which rows are done (EOS,
    max_tokens, a stop string, a client gone). A stopping criterion because `generate` calls it
    exactly once per step, right after the new tokens are appended, and acts on its answer in the
    same step (a streamer's `put` comes a step late in some transformers versions)."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            row.feed(token)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)
