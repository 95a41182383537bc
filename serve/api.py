"""The OpenAI-compatible HTTP API of `eve-serve` (FastAPI): `/v1/chat/completions` (streaming and
not), `/v1/models`, `/health`, the browser page at `/` and its `/v1/eve/preview`.

transformers' own `transformers serve` cannot host EVE: it resolves a checkpoint's class by name
in the `transformers` namespace (`getattr(transformers, "EveForCausalLM")`) and its modality
from transformers' built-in model lists, neither of which `AutoModel*.register` reaches; making
it work would mean patching transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from serve.engine import Job, Prepared, Sampling
from serve.errors import RequestError, as_request_error
from serve.messages import Limits, decode_data_url, from_openai, render
from serve.preview import describe
from serve.process import EngineProcess

# Fields whose OpenAI meaning EVE-kit cannot honour: refused rather than silently ignored.
UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls", "function_call": "function calls",
    "logprobs": "log-probabilities", "top_logprobs": "log-probabilities", "logit_bias": "logit biases",
    "seed": "seeded sampling (sampled requests share a batch)", "audio": "audio output",
    "prediction": "predicted outputs", "n": "several choices per request",
}


@dataclass
class ChatRequest:
    messages: list[dict]
    images: list
    max_tokens: int | None
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, body, limits: Limits) -> "ChatRequest":
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        for key, what in UNSUPPORTED.items():
            value = body.get(key)
            unset = value is None or value is False or value == [] or (key == "n" and value == 1 and value is not True)
            if not unset:
                raise RequestError(f"{key}: {what} are not supported by eve-serve", param=key, code="unsupported_parameter")
        for key in ("presence_penalty", "frequency_penalty"):
            if body.get(key) not in (None, 0, 0.0):
                raise RequestError(f"{key}: only 0 is supported", param=key, code="unsupported_parameter")
        fmt = body.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise RequestError("response_format: only {'type': 'text'} is supported", param="response_format")
        messages, images = from_openai(body.get("messages"), limits)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # greedy unless asked: answers are reproducible
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError("top_p must be in (0, 1]", param="top_p")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of at most 4 strings", param="stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        return cls(messages, images, max_tokens, Sampling(temperature, top_p if temperature else 1.0), stop, stream,
                   bool(options.get("include_usage")))


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"{key} must be a number in [{lo}, {hi}], got {value!r}", param=key)
    return float(value)


def _error_body(e: RequestError) -> dict:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(_error_body(e), status_code=e.status)


def build_app(engine: EngineProcess, model_name: str, limits: Limits = Limits(), template: str | None = None,
              default_max_tokens: int = 512, prepare_threads: int = 1) -> FastAPI:
    """The app around a running engine. `template` names the processor's chat template to use
    (None: its default). Requests are parsed, decoded and prepared in `prepare_threads` threads of
    their own rather than in the event loop's pool of 40: the model's processor takes one request
    at a time anyway, and fewer threads waking and handing the GIL around leave more CPU to the
    engine. On a CPU host the engine shares the cores with this process, and every millisecond
    the front spends there slows generation by more than a millisecond (OpenMP's threads wait for
    the one that was preempted): bench/serve.py prints the front's CPU per request."""
    preparing = ThreadPoolExecutor(prepare_threads, thread_name_prefix="eve-serve-prepare")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        preparing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="eve-serve", description="OpenAI-compatible chat completions for an EVE model", lifespan=lifespan)

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(preparing, fn, *args)

    created = int(time.time())
    page = resources.files("serve").joinpath("page/index.html").read_text()

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return _error(e)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page.replace("{{MODEL}}", model_name)

    @app.get("/health")
    async def health():
        stats = engine.stats
        return {"status": "ok", "batches": stats["batches"], "requests": stats["requests"],
                "busy_s": round(stats["busy_s"], 3), "waiting": stats["waiting"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "eve-kit"}]}

    @app.post("/v1/eve/preview")
    async def preview(request: Request):
        """The image as the model sees it: its processed size, visual tokens and pixels."""
        return await in_thread(preview_of, await request.body())

    def preview_of(raw: bytes) -> dict:
        body = _parse_json(raw)
        url = body.get("image") if isinstance(body, dict) else None
        return describe(engine.processor, decode_data_url(url, limits, "image"))

    def prepare(raw: bytes) -> tuple[ChatRequest, Prepared]:
        body = _parse_json(raw)
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise RequestError(f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                               param="model", status=404, code="model_not_found")
        req = ChatRequest.parse(body, limits)
        return req, engine.prepare(render(engine.processor, req.messages, template), req.images)

    async def chat_completions(request: Request):
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(*event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopping)
                pass

        with engine.arriving():
            # one hop for the CPU work (JSON, images, template, tokens), which for a large image
            # would otherwise hold up every other connection in this event loop
            req, prepared = await in_thread(prepare, await request.body())
            max_new = min(req.max_tokens or default_max_tokens, engine.room(prepared))
            # A non-streaming request hears only its end: waking the event loop for every token of
            # every row takes the GIL from the generating thread (measured: bench/serve.py).
            job = Job(prepared, max_new, req.sampling, req.stop, on_text=(lambda text: put("text", text)) if req.stream else None,
                      on_done=lambda row, err: put("done", row, err))
            engine.submit(job)
        ident, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": stamp, "model": model_name}
        if req.stream:
            return StreamingResponse(_sse(engine, job, events, head, len(prepared.input_ids), req.include_usage),
                                     media_type="text/event-stream")
        try:
            _, row, err = await events.get()  # its only event: the job hears no text
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        if err is not None:
            raise as_request_error(err)
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": row.text},
                                          "finish_reason": row.finish_reason}],
                             "usage": _usage(len(prepared.input_ids), row.tokens)})

    # A plain Starlette route: the endpoint reads its body and builds its response itself, so
    # FastAPI's per-request machinery (dependencies, jsonable_encoder) would only spend the
    # front's CPU, which a CPU host's engine feels (see above).
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from e


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(head: dict, delta: dict, finish_reason: str | None = None) -> str:
    data = {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(data)}\n\n"


async def _sse(engine: EngineProcess, job: Job, events: asyncio.Queue, head: dict, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: the role, content deltas, the finish reason,
    optionally the usage, then [DONE]. A client that goes away cancels its row."""
    try:
        yield _chunk(head, {"role": "assistant", "content": ""})
        while (event := await events.get())[0] == "text":
            yield _chunk(head, {"content": event[1]})
        _, row, err = event
        if err is not None:
            yield f"data: {json.dumps(_error_body(as_request_error(err)))}\n\n"
            return
        yield _chunk(head, {}, row.finish_reason)
        if include_usage:
            usage = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(prompt_tokens, row.tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)  # no-op once the row ended
