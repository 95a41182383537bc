"""`eve-serve`'s engine in a process of its own; the HTTP front (this process) reads, parses and
prepares requests and hands them over a pipe.

Why two processes: generating with a small model, or on CPU, is bound by Python (a decode step of
the demo-sized model is ~10 ms, mostly interpreter), and in one process every request the front
reads, decodes and tokenizes takes the GIL from the generating thread. With the engine in one
process, `bench/serve.py` measured 0.81-0.88 of direct `generate`'s throughput. vLLM splits its
API server from its engine core for the same reason.

The pipe carries, front -> engine: `arrive` (+1/-1 around reading and preparing a request, for
the engine's batching wait), `submit` (a prepared request), `cancel`, `close`; engine -> front:
`ready` (or `failed`, with why), `text` (a streamed delta), `done` (the answer or the error) and
`stats` after each batch. The engine process ends when the front closes it or goes away (the
pipe's end: a front killed with -9 leaves no engine behind); the front fails every open request
and calls `on_exit` when the engine goes away.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from serve.errors import QueueFull, RequestError, as_request_error

if TYPE_CHECKING:  # torch and transformers come later: the engine process starts before they load here
    from PIL import Image

    from serve.engine import Engine, Job, Prepared


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches."""

    model: str  # checkpoint folder or hub id
    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    max_batch_size: int = 8
    max_delay_s: float = 0.05


@dataclass(frozen=True)
class Answer:
    """A finished request, as the front hears it (the fields of `serve.decoding.Row` it reads)."""

    text: str
    finish_reason: str
    tokens: int


class EngineProcess:
    """The engine as the HTTP front sees it: `prepare` here, `submit` there; a job's callbacks
    are called from this object's reader thread."""

    def __init__(self, spec: EngineSpec, max_waiting: int = 256, on_exit: Callable[[], None] | None = None):
        """Start the engine process (it loads the model meanwhile); then `wait_ready`."""
        self.spec, self.max_waiting, self.on_exit = spec, max_waiting, on_exit
        self.max_batch_size = spec.max_batch_size
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_main, args=(child, spec), name="eve-serve-engine", daemon=True)
        self._proc.start()
        child.close()
        self._send_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids: dict[Job, int] = {}
        self._next = itertools.count()
        self._closed = False  # no more requests: closing, or the engine is gone
        self.died = False  # the engine went away without being closed
        self.stats = {"batches": 0, "requests": 0, "busy_s": 0.0, "waiting": 0}
        self.processor = self.preparer = None
        self._reader: threading.Thread | None = None

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def wait_ready(self, processor) -> dict:
        """Block until the engine has loaded its model: its facts (context length, device), or a
        RuntimeError saying why it could not. `processor` (the model's) prepares requests here."""
        try:
            kind, info = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading {self.spec.model} (exit code {self._proc.exitcode})")
        if kind == "failed":
            self._proc.join(30)
            raise RuntimeError(f"the engine could not load {self.spec.model}: {info}")
        from serve.engine import Preparer

        self.processor, self.preparer = processor, Preparer(processor, info["context_length"])
        self._reader = threading.Thread(target=self._read, name="eve-serve-engine-reader", daemon=True)
        self._reader.start()
        return info

    # ------------------------------------------------------------------ the front's threads
    def prepare(self, prompt: str, images: Sequence[Image.Image] = ()) -> Prepared:
        return self.preparer.prepare(prompt, images)

    def room(self, prepared: Prepared) -> int:
        return self.preparer.room(prepared)

    @contextlib.contextmanager
    def arriving(self):
        """`Engine.arrive` around reading and preparing a request up to its `submit` (or refusal)."""
        self._send(("arrive", 1))
        try:
            yield
        finally:
            self._send(("arrive", -1))

    def submit(self, job: Job) -> None:
        """Queue a job; refused here when the server is closing or `max_waiting` requests wait
        beyond a running batch."""
        with self._send_lock:
            if self._closed:
                raise RequestError("the server is shutting down", status=503, code="shutting_down")
            if len(self._jobs) >= self.max_waiting + self.max_batch_size:
                raise QueueFull(self.max_waiting)
            ident = next(self._next)
            self._jobs[ident], self._ids[job] = job, ident
            p = job.prepared
            self._conn.send(("submit", ident, p, job.max_new_tokens, job.sampling, tuple(job.stop), job.on_text is not None))

    def cancel(self, job: Job) -> None:
        """The client is gone: stop spending tokens on it (a no-op once it ended)."""
        job.cancelled = True
        ident = self._ids.get(job)
        if ident is not None and ident in self._jobs:
            self._send(("cancel", ident))

    def close(self, timeout: float = 60) -> None:
        """Finish the running batch, refuse the waiting ones, and end the engine process (at once
        if it is still loading: nothing waits on it, and a large model takes minutes to load)."""
        if self._reader is None:
            self._proc.kill()
        with self._send_lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(OSError):
                    self._conn.send(("close",))
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if not self._closed:
                self._conn.send(message)

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "text":
                job = self._jobs.get(message[1])
                if job is not None and job.on_text is not None:
                    job.on_text(message[2])
            elif kind == "done":
                job = self._jobs.pop(message[1], None)
                if job is not None:
                    self._ids.pop(job, None)
                    job.on_done and job.on_done(message[2], message[3])
            elif kind == "stats":
                self.stats = message[1]
        # The engine is gone: closed by us, or died. Either way nothing more will be answered.
        with self._send_lock:
            self.died, self._closed = not self._closed, True
            jobs, self._jobs = list(self._jobs.values()), {}
            self._ids.clear()
        for job in jobs:
            job.on_done and job.on_done(None, RequestError("the engine process stopped", status=503, code="engine_stopped"))
        self.on_exit and self.on_exit()


# ---------------------------------------------------------------------- the engine process
def _engine_main(conn, spec: EngineSpec) -> None:
    """Load the model, then generate in this process's main thread (see `Engine.serve_forever`)
    while a second thread reads the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the front decides
    try:
        import torch

        from eve.pretrained import load_pretrained
        from serve.engine import Engine

        if spec.threads:
            torch.set_num_threads(spec.threads)
        model, processor = load_pretrained(spec.model, spec.device, spec.dtype)
        # No queue limit here: the front enforces it, seeing every request first.
        engine = Engine(model, processor, spec.max_batch_size, max_waiting=None, max_delay_s=spec.max_delay_s)
    except Exception as e:  # noqa: BLE001  (told to the front, which exits with it)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock, contextlib.suppress(OSError):  # the front is gone: the reader closes the engine
            conn.send(message)

    send(("ready", {"context_length": engine.context_length, "device": str(model.device)}))
    threading.Thread(target=_read_requests, args=(conn, engine, send), name="eve-serve-requests", daemon=True).start()
    engine.serve_forever(after_batch=lambda: send(("stats", {
        "batches": engine.batches, "requests": engine.rows, "busy_s": engine.busy_s, "waiting": engine.waiting})))


def _read_requests(conn, engine: Engine, send: Callable[[tuple], None]) -> None:
    from serve.engine import Job

    jobs: dict[int, Job] = {}

    def done(ident: int):
        def on_done(row, err):
            jobs.pop(ident, None)
            answer = None if row is None else Answer(row.text, row.finish_reason, row.tokens)
            send(("done", ident, answer, None if err is None else as_request_error(err)))
        return on_done

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the front went away without closing: so does the engine
            break
        kind = message[0]
        if kind == "arrive":
            engine.arrive(message[1])
        elif kind == "submit":
            _, ident, prepared, max_new, sampling, stop, stream = message
            on_text = (lambda text, i=ident: send(("text", i, text))) if stream else None
            job = jobs[ident] = Job(prepared, max_new, sampling, stop, on_text=on_text, on_done=done(ident))
            try:
                engine.submit(job)
            except RequestError as e:
                job.on_done(None, e)
        elif kind == "cancel":
            job = jobs.get(message[1])
            if job is not None:
                job.cancel()
        elif kind == "close":
            break
    engine.close()
