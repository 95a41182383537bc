"""eve-chat: the streamed answers of a multi-turn conversation with images equal `generate` on
the same conversation; a missing or broken image is reported and the chat goes on."""

from __future__ import annotations

import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoProcessor

from conftest import random_image
from demo_run import clean_env
from serving import generate_directly


def test_streamed_turns_equal_generate(lively, tmp_path):
    from serve.chat import Chat

    model, processor = AutoModelForCausalLM.from_pretrained(lively).eval(), AutoProcessor.from_pretrained(lively)
    wide, tall = random_image(90, 30, 1), random_image(20, 80, 2)
    wide.save(tmp_path / "wide.png")
    tall.save(tmp_path / "tall picture.png")
    chat = Chat(model, processor, max_new_tokens=10)
    chat.attach(str(tmp_path / "wide.png"))
    pieces = list(chat.ask("What is this?"))
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    expected, _ = generate_directly(model, processor, first, [wide], 10)
    assert "".join(pieces) == expected and len(pieces) > 1
    chat.attach(str(tmp_path / "tall picture.png"))
    second = "".join(chat.ask("And this one?"))
    conversation = first + [{"role": "assistant", "content": expected.strip()},
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]}]
    assert second == generate_directly(model, processor, conversation, [wide, tall], 10)[0]
    chat.reset()
    assert chat.messages == [] and chat.images == []


def test_repl_reports_bad_images_and_goes_on(lively, tmp_path):
    random_image(40, 40, 3).save(tmp_path / "ok image.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    script = "\n".join([
        f'/image "{tmp_path / "ok image.png"}"', "What is it?",
        f"/image {tmp_path / 'missing.png'} {tmp_path / 'broken.jpg'}", "And now?",
        "/reset", "/help", "/quit"]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "serve.chat", str(lively), "--max-new-tokens", "4"], input=script,
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "attached" in out and "ok image.png (40x40)" in out
    assert f"cannot use image {tmp_path / 'missing.png'}: missing" in out
    assert f"cannot use image {tmp_path / 'broken.jpg'}: decode_error" in out
    assert out.count("eve> ") == 2  # both questions answered, the second without the bad images
    assert "(conversation cleared)" in out and "commands:" in out
