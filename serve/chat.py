"""eve-chat: talk to an EVE model in the terminal, with images.

    eve-chat runs/demo/final
    you> /image photo.jpg            attach an image (several: /image a.jpg "b c.png"; the next question gets them)
    you> What colour are the shapes?
    eve> red

Commands: /image PATH..., /reset (forget the conversation), /help, /quit (or Ctrl-D). The answer
streams as it is generated; the conversation is rendered with the model's chat template.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from eve.attention_backends import varying_shape_attention
from eve.image_io import InvalidImageError, load_image
from serve.messages import render

HELP = "commands: /image PATH... (attach to the next question), /reset, /help, /quit"


class Chat:
    """A conversation: messages and their images, and the model that answers them."""

    def __init__(self, model, processor, template: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0):
        self.model, self.processor, self.template = model, processor, template
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.messages: list[dict] = []
        self.images: list = []  # every image of the conversation, in prompt order
        self.attached: list = []  # images for the next question
        self._error: BaseException | None = None  # raised by generate in its thread

    def attach(self, path: str) -> str:
        """Attach an image (raises InvalidImageError naming the file and the problem)."""
        image = load_image(path)
        self.attached.append(image)
        return f"attached {path} ({image.width}x{image.height})"

    def reset(self) -> None:
        self.messages, self.images, self.attached = [], [], []

    def ask(self, question: str):
        """Yield the answer's text as it is generated; the turn joins the conversation at the end."""
        content = [{"type": "image"} for _ in self.attached] + [{"type": "text", "text": question}]
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + self.attached
        prompt = render(self.processor, messages, self.template)
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(self.model.device)
        limit = self.model.config.text_config.max_position_embeddings
        prompt_len = inputs["input_ids"].shape[1]
        if prompt_len >= limit:
            raise ValueError(f"the conversation is {prompt_len} tokens, the model reads at most {limit}: /reset to start over")
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        tok = self.processor.tokenizer
        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=min(self.max_new_tokens, limit - prompt_len),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **sampling)
        worker = Thread(target=self._generate, args=(kwargs, streamer), daemon=True)
        worker.start()
        answer = ""
        for text in streamer:
            answer += text
            yield text
        worker.join()
        if self._error is not None:
            raise self._error
        self.messages = messages + [{"role": "assistant", "content": answer.strip()}]
        self.images, self.attached = images, []

    def _generate(self, kwargs: dict, streamer: TextIteratorStreamer) -> None:
        self._error = None
        try:
            with torch.inference_mode(), varying_shape_attention(self.model.device):
                self.model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001  (reported by ask(), in the caller's thread)
            self._error = e
            streamer.end()


def attach_or_report(chat: Chat, path: str) -> str:
    """Attach an image; what to tell the user either way (the chat goes on after a bad image)."""
    try:
        return chat.attach(path)
    except InvalidImageError as e:
        return f"cannot use image {e.source}: {e.reason}: {e.detail}"


def repl(chat: Chat, stdin=sys.stdin, out=sys.stdout) -> None:
    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    say(f"eve-chat: {HELP}")
    while True:
        say("you> ", end="")
        line = stdin.readline()
        if not line:  # Ctrl-D / end of input
            say()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                chat.reset()
                say("(conversation cleared)")
            elif command == "/image":
                try:
                    paths = shlex.split(rest)
                except ValueError as e:
                    say(f"cannot parse {rest!r}: {e}")
                    continue
                if not paths:
                    say("usage: /image PATH [PATH...]")
                for path in paths:
                    say(attach_or_report(chat, path))
            else:
                say(HELP)
            continue
        say("eve> ", end="")
        started = False
        try:
            for text in chat.ask(line):
                text = text if started else text.lstrip()
                started = started or bool(text)
                say(text, end="")
            say()
        except (ValueError, RuntimeError) as e:
            say(f"\nerror: {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="EVE checkpoint folder (e.g. runs/demo/final) or hub id")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image to the first question")
    parser.add_argument("--template", default=None, help="chat template: vicuna_v1, eve_v1 or plain (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    from eve.pretrained import load_pretrained

    model, processor = load_pretrained(args.model, args.device, args.dtype)
    chat = Chat(model, processor, args.template, args.max_new_tokens, args.temperature)
    for path in args.image:
        print(attach_or_report(chat, path))
    try:
        repl(chat)
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
