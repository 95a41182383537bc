"""eve-serve, talked to as users do (the `openai` package on 127.0.0.1): answers equal `generate`
on the same input, streamed or not; 20 concurrent requests are all answered, in batches; bad
requests get a 4xx naming the problem and the server goes on. Also the per-row decoding that
lets one `generate` serve several requests."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from transformers import AutoModelForCausalLM, AutoProcessor

from conftest import random_image
from serving import Server, data_url, generate_directly, to_openai

MAX_NEW = 12


@pytest.fixture(scope="module")
def direct(lively):
    return AutoModelForCausalLM.from_pretrained(lively).eval(), AutoProcessor.from_pretrained(lively)


@pytest.fixture(scope="module")
def server(lively, tmp_path_factory):
    srv = Server(lively, tmp_path_factory.mktemp("serve") / "server.log", "--served-model-name", "lively", "--max-batch-size", "4", "--max-images", "3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


CONVERSATIONS = [
    ([user("What is in the picture?", 1)], [random_image(60, 30, 1)]),
    ([user("Compare the two pictures.", 2)], [random_image(20, 80, 2), random_image(48, 48, 3)]),
    ([user("Describe it.", 1), {"role": "assistant", "content": "A square."}, user("And the colour?")],
     [random_image(90, 30, 4)]),
    ([{"role": "system", "content": "You answer briefly."}, user("Say hello.")], []),
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_answers_equal_generate_streamed_or_not(client, direct, index):
    messages, images = CONVERSATIONS[index]
    expected, prompt_tokens = generate_directly(*direct, messages, images, MAX_NEW)
    body = to_openai(messages, images)
    reply = client.chat.completions.create(model="lively", messages=body, max_tokens=MAX_NEW)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == prompt_tokens  # visual tokens included
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="lively", messages=body, max_tokens=MAX_NEW, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_twenty_concurrent_requests_are_all_answered_in_batches(client, direct, server):
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(20):
        w, h = (int(x) for x in rng.integers(12, 100, 2))
        jobs.append(([user(f"Question {i}: what do you see?", 1)], [random_image(w, h, 100 + i)]) if i % 5
                    else ([user(f"Question {i}, text only.")], []))
    before = server.get("/health")
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda job: client.chat.completions.create(
            model="lively", messages=to_openai(*job), max_tokens=MAX_NEW), jobs))
    after = server.get("/health")
    for (messages, images), reply in zip(jobs, replies):
        assert reply.choices[0].message.content == generate_directly(*direct, messages, images, MAX_NEW)[0]
    assert after["requests"] - before["requests"] == 20
    assert after["batches"] - before["batches"] < 20  # some of them shared a generate call


def test_stop_strings_cut_the_answer_streamed_or_not(client, direct):
    messages, images = CONVERSATIONS[0]
    full, _ = generate_directly(*direct, messages, images, MAX_NEW)
    stop = full[4:7]
    expected = full[: full.find(stop)]
    body = to_openai(messages, images)
    reply = client.chat.completions.create(model="lively", messages=body, max_tokens=MAX_NEW, stop=[stop, "never seen"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.chat.completions.create(model="lively", messages=body, max_tokens=MAX_NEW, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(model="lively", messages=[{"role": "user", "content": "Count."}], max_tokens=2)
    if reply.choices[0].finish_reason == "length":  # (an EOS among the first two tokens ends it with "stop")
        assert reply.usage.completion_tokens == 2


def _bad_requests():
    good = data_url(random_image(32, 32, 9))
    img = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    head, payload = good.split(",", 1)
    truncated = f"{head},{payload[: len(payload) // 8 * 4]}"  # the first half of a PNG
    return [
        ({"messages": [{"role": "user", "content": [img("data:image/png;base64,aGVsbG8="), {"type": "text", "text": "?"}]}]},
         400, "cannot use the image"),
        ({"messages": [{"role": "user", "content": [img(truncated)]}]}, 400, "cannot use the image"),
        ({"messages": [{"role": "user", "content": [img("data:image/png;base64,@@@")]}]}, 400, "not valid base64"),
        ({"messages": [{"role": "user", "content": [img("https://example.com/a.png")]}]}, 400, "base64 data URL"),
        ({"messages": [{"role": "user", "content": [img(good)] * 4}]}, 400, "at most 3"),
        ({"messages": [{"role": "user", "content": "word " * 1500}]}, 400, "reads at most 1024"),
        ({"messages": [{"role": "user", "content": [img(good)] * 3 + [{"type": "text", "text": "word " * 1000}]}]}, 400,
         "visual, from 3 image(s)"),
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}, 400, "only come first"),
        ({"messages": [{"role": "assistant", "content": [img(good)]}, {"role": "user", "content": "hi"}]}, 400,
         "only user messages"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "got type 'input_audio'"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "several choices"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature must be"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens must be"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tool calls"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "is not served here"),
    ]


def test_bad_requests_get_a_4xx_and_the_server_goes_on(server, client):
    for body, status, message in _bad_requests():
        code, reply = server.post_raw("/v1/chat/completions", json.dumps(body).encode())
        assert code == status and message in reply["error"]["message"], (body if len(str(body)) < 300 else message, reply)
    for raw in (b"{not json", b"[1, 2]", "\u00e9".encode("latin-1")):
        code, reply = server.post_raw("/v1/chat/completions", raw)
        assert code == 400 and reply["error"]["message"], reply
    with pytest.raises(openai.BadRequestError, match="cannot use the image"):  # as an openai user sees it
        client.chat.completions.create(model="lively", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AAAA"}}]}])
    assert server.proc.poll() is None
    reply = client.chat.completions.create(model="lively", messages=[{"role": "user", "content": "Still there?"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_models_page_and_preview(server, direct):
    assert [m["id"] for m in server.get("/v1/models")["data"]] == ["lively"]
    with __import__("urllib.request").request.urlopen(server.url + "/", timeout=10) as r:
        page = r.read().decode()
    assert "lively" in page and "/v1/chat/completions" in page
    _, processor = direct
    image = random_image(90, 30, 5)
    code, info = server.post_raw("/v1/eve/preview", json.dumps({"image": data_url(image)}).encode())
    h, w = processor.image_processor.resized_size(30, 90)
    assert code == 200 and info["processed_size"] == [w, h] and info["native_size"] == [90, 30]
    assert info["visual_tokens"] == processor.image_processor.num_visual_tokens(30, 90)
    code, reply = server.post_raw("/v1/eve/preview", json.dumps({"image": "data:image/png;base64,aGk="}).encode())
    assert code == 400 and "image" in reply["error"]["message"]


def test_binds_to_this_machine_only_by_default():
    out = subprocess.run([sys.executable, "-m", "serve.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "default 127.0.0.1" in out


def test_detokenizer_deltas_add_up_to_the_decoded_text(direct):
    from serve.decoding import Detokenizer, Row

    tok = direct[1].tokenizer
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(3, len(tok) - 1, int(rng.integers(1, 30))).tolist()  # bytes that often make no character
        d = Detokenizer(tok)
        assert "".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids, skip_special_tokens=True)
        sent = []
        row = Row(tok, max_new_tokens=len(ids), stop=["ab", "the"], emit=sent.append)
        for i in ids:
            row.feed(i)
        row.close()
        full = tok.decode(ids, skip_special_tokens=True)
        cut = min([j for j in (full.find("ab"), full.find("the")) if j != -1], default=len(full))
        assert "".join(sent) == row.text == full[:cut]
        assert row.finish_reason == ("stop" if cut < len(full) else "length")


def test_a_taken_port_is_an_error_not_a_silent_server(server, lively):
    proc = subprocess.run([sys.executable, "-m", "serve.cli", str(lively), "--port", str(server.port)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and f"could not serve on 127.0.0.1:{server.port}" in proc.stderr


def test_a_batch_waits_for_requests_being_prepared_and_only_for_them(direct):
    """A burst fills one batch instead of starting with its first request alone; a lone request
    (nothing arriving) starts at once; a refused one releases the wait."""
    import threading
    import time

    from serve.engine import Engine, Job, Preparer

    engine = Engine(*direct, max_batch_size=4, max_delay_s=30.0)
    prepared = Preparer(direct[1], engine.context_length).prepare("hello", [])
    engine.submit(Job(prepared, 2))
    start = time.monotonic()
    assert len(engine._take()) == 1 and time.monotonic() - start < 5

    def arrive(entered: threading.Event, refuse: bool):
        engine.arrive(1)  # as the server's front does around reading and preparing a request
        try:
            entered.set()
            time.sleep(0.3)
            if not refuse:
                engine.submit(Job(prepared, 2))
        finally:
            engine.arrive(-1)

    for refuse, want in ((False, 2), (True, 1)):
        entered = threading.Event()
        thread = threading.Thread(target=arrive, args=(entered, refuse))
        thread.start()
        entered.wait()
        engine.submit(Job(prepared, 2))
        start = time.monotonic()
        assert len(engine._take()) == want
        assert 0.2 < time.monotonic() - start < 5  # waited for the arriving one, not for max_delay_s
        thread.join()


def test_the_engine_batches_exactly_what_the_processor_batches(direct):
    """Requests are prepared in 8 bits and normalised by the engine; the batch it generates from
    is the processor's own, bit for bit (images of other sizes, several or none per request)."""
    import torch

    from serve.engine import Engine, Preparer
    from serve.messages import render

    model, processor = direct
    engine = Engine(model, processor, max_batch_size=4)
    preparer = Preparer(processor, engine.context_length)
    prompts = [render(processor, messages) for messages, _ in CONVERSATIONS]
    prepared = [preparer.prepare(prompt, images) for prompt, (_, images) in zip(prompts, CONVERSATIONS)]
    assert all(a.dtype == np.uint8 for p in prepared for a in p.images)
    want = processor(text=prompts, images=[im for _, images in CONVERSATIONS for im in images], return_tensors="pt")
    got = engine.collate(prepared)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _gone(pid: int, timeout: float) -> bool:
    import os
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped by its (dead) parent's init
            return True
        time.sleep(0.2)
    return False


def test_a_dead_engine_fails_open_requests_and_ends_the_server(lively, tmp_path):
    """The engine killed mid-answer: the open stream ends with an error instead of hanging, and
    eve-serve exits saying why rather than serving nothing."""
    import os
    import signal
    import threading

    srv = Server(lively, tmp_path / "server.log", "--served-model-name", "lively")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="lively", messages=[{"role": "user", "content": "Talk."}],
                                                max_tokens=100_000, stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        killer = threading.Timer(0.5, os.kill, (srv.engine_pid(), signal.SIGKILL))
        killer.start()
        with pytest.raises(openai.APIError, match="engine process stopped"):
            for _ in stream:
                pass
        killer.join()
        assert srv.proc.wait(timeout=60) != 0
        assert "the engine process stopped (exit code -9)" in srv.log.read_text()
    finally:
        srv.stop()


def test_the_engine_ends_with_a_killed_server(lively, tmp_path):
    """kill -9 of eve-serve leaves no engine process behind holding the model."""
    srv = Server(lively, tmp_path / "server.log")
    engine = srv.engine_pid()
    srv.proc.kill()
    srv.proc.wait()
    assert _gone(engine, 60), "the engine outlived eve-serve"


def test_a_model_that_cannot_load_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "serve.cli", str(missing), "--port", "0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and str(missing) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
