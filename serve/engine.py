"""Many concurrent requests, one model: a queue and one thread that runs what is waiting as one
batched `generate` call.

Requests are prepared (images decoded, resized, tokenized) before they reach the engine
(`Preparer`, in the HTTP front's threads), so the generating thread only collates and generates.
A batch that is not full waits a moment (`max_delay_s`) for requests already being read and
prepared (`arrive`), and never otherwise: a lone request starts at once, and a burst of clients
fills whole batches instead of starting with the first request alone. A batch takes the oldest
waiting request and up to `max_batch_size - 1` more with the same sampling settings (`generate`
takes one setting per call); each row stops on its own EOS, max_tokens or stop string
(`serve.decoding.Row`). The batch is built exactly as `EveProcessor` builds one from the same
prompts and images (left padding, images padded to the largest), so a request's answer is what
`generate` gives on it. `eve-serve` runs the engine in a process of its own (`serve.process`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteriaList

from eve.attention_backends import varying_shape_attention
from eve.processing_eve import pad_images
from serve.decoding import Row, RowFeed
from serve.errors import QueueFull, RequestError


@dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0, else nucleus sampling."""

    temperature: float = 0.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Prepared:
    """One request after the processor: its ids (visual tokens spliced in) and its images."""

    input_ids: list[int]
    images: list[np.ndarray]  # [3, h, w] uint8 each, at model geometry, un-padded (the engine normalises)


@dataclass(eq=False)
class Job:
    prepared: Prepared
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None  # called from the engine's thread
    on_done: Callable[[Row | None, BaseException | None], None] | None = None
    row: Row | None = field(default=None, init=False)
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """The client is gone: stop spending tokens on it."""
        self.cancelled = True
        if self.row is not None:
            self.row.cancel()


class Preparer:
    """Chat prompt and images -> `Prepared`, with this model's processor, refusing a prompt the
    context cannot hold. Thread-safe: one request at a time, as a Rust tokenizer must not be used
    from two threads while one changes its settings."""

    def __init__(self, processor, context_length: int):
        self.processor, self.context_length = processor, context_length
        self._lock = threading.Lock()

    def prepare(self, prompt: str, images: Sequence[Image.Image] = ()) -> Prepared:
        # 8-bit pixels: the engine normalises (`Engine.collate`). A quarter of the bytes to pickle
        # and pipe, which a server's front spends once per request on the cores the engine
        # generates on (bench/serve.py).
        with self._lock:
            enc = self.processor(text=[prompt], images=list(images) or None, return_tensors=None,
                                 do_rescale=False, do_normalize=False)
        ids = list(enc["input_ids"][0])
        arrays = [px[:, :h, :w].astype(np.uint8) for px, (h, w) in zip(enc["pixel_values"], enc["image_sizes"])] if images else []
        visual = ids.count(self.processor.image_token_id)
        if len(ids) >= self.context_length:
            raise RequestError(
                f"the prompt is {len(ids)} tokens ({visual} of them visual, from {len(arrays)} image(s)); this model reads "
                f"at most {self.context_length}, answer included: shorten the conversation or send fewer or smaller images",
                param="messages", code="context_length_exceeded")
        return Prepared(ids, arrays)

    def room(self, prepared: Prepared) -> int:
        """Tokens the answer may still have."""
        return self.context_length - len(prepared.input_ids)


class Engine:
    def __init__(self, model, processor, max_batch_size: int = 8, max_waiting: int | None = None, max_delay_s: float = 0.05):
        """`max_waiting`: queued requests beyond which `submit` refuses (None: no limit, as in
        eve-serve's engine process, whose front enforces it)."""
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer  # the generating thread's (padding, decoding)
        self.max_batch_size, self.max_waiting, self.max_delay_s = max_batch_size, max_waiting, max_delay_s
        self._arriving = 0  # requests being read and prepared, not yet submitted
        self.context_length = model.config.text_config.max_position_embeddings
        eos = model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_ids[0]
        self._waiting: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self.batches = 0  # generate calls so far
        self.rows = 0
        self.busy_s = 0.0  # time spent in generate

    # ------------------------------------------------------------------ callers' threads
    def arrive(self, delta: int) -> None:
        """A request started (+1) or ended (-1) being read and prepared; a batch that is not full
        waits for those under way, at most `max_delay_s`. End it after its `submit` or refusal."""
        with self._cv:
            self._arriving += delta
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RequestError("the server is shutting down", status=503, code="shutting_down")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(self.max_waiting)
            self._waiting.append(job)
            self._cv.notify()

    def close(self) -> None:
        """Stop after the running batch; waiting requests are refused."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    # ------------------------------------------------------------------ the generating thread
    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                for job in self._waiting:
                    job.on_done and job.on_done(None, RequestError("the server is shutting down", status=503))
                self._waiting.clear()
                return None
            deadline = time.monotonic() + self.max_delay_s
            while len(self._waiting) < self.max_batch_size and self._arriving and not self._closed:
                if (left := deadline - time.monotonic()) <= 0:
                    break
                self._cv.wait(left)
            key = self._waiting[0].sampling
            batch = [j for j in self._waiting if j.sampling == key and not j.cancelled][: self.max_batch_size]
            self._waiting = [j for j in self._waiting if j not in batch and not j.cancelled]
            return batch

    def serve_forever(self, after_batch: Callable[[], None] | None = None) -> None:
        """Run batches in this thread until `close`. Call it from the main thread: on CPU, torch's
        OpenMP kernels ran this model less than half as fast from a second thread (the same 48
        requests: 4.1 s against 1.8 s from the main thread, on this project's 2-core machine)."""
        while (batch := self._take()) is not None:
            if batch:
                self.run(batch)
                after_batch and after_batch()

    def collate(self, prepared: Sequence[Prepared]) -> dict:
        """The batch `EveProcessor` would make of the same requests: left-padded ids, images
        padded to the largest height and width."""
        enc = self.tokenizer.pad({"input_ids": [p.input_ids for p in prepared]}, padding=True, padding_side="left",
                                 return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        arrays = [self.processor.image_processor.normalise(a) for p in prepared for a in p.images]
        if arrays:
            inputs["pixel_values"] = torch.from_numpy(pad_images(arrays)).to(self.model.dtype)
            inputs["image_sizes"] = torch.tensor([a.shape[1:] for a in arrays], dtype=torch.long)
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def run(self, batch: Sequence[Job]) -> None:
        """One batched `generate`; each job hears its text and its end through its callbacks."""
        rows = []
        for job in batch:
            job.row = Row(self.tokenizer, job.max_new_tokens, job.stop, self.eos_ids, job.on_text)
            if job.cancelled:
                job.row.cancel()
            rows.append(job.row)
        self.batches += 1
        self.rows += len(batch)
        start = time.perf_counter()
        try:
            inputs = self.collate([j.prepared for j in batch])
            with torch.inference_mode(), varying_shape_attention(self.model.device):
                self.model.generate(**inputs, max_new_tokens=max(r.max_new_tokens for r in rows),
                                    stopping_criteria=StoppingCriteriaList([RowFeed(rows)]),
                                    pad_token_id=self.pad_token_id, **batch[0].sampling.generate_kwargs())
        except Exception as e:  # noqa: BLE001  (the batch's requests fail; the server goes on)
            for job in batch:
                job.on_done and job.on_done(None, e)
        else:
            for job, row in zip(batch, rows):
                row.close()
                job.on_done and job.on_done(row, None)
        self.busy_s += time.perf_counter() - start

