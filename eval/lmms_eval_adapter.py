"""Evaluate EVE checkpoints with lmms-eval (EvolvingLMMs-Lab/lmms-eval >= 0.6), as model `eve`.

lmms-eval is an optional extra (it pulls datasets, wandb, openai, sentence-transformers ...):

    pip install -e .[lmms_eval]        # registers `eve` through the `lmms_eval.models` entry point
    lmms-eval --model eve --model_args pretrained=runs/debug/stage3/final --tasks pope --batch_size 8

or from Python (any lmms-eval version): `lmms_eval.evaluator.simple_evaluate(model=EveLmms(pretrained=...),
tasks=[...])`.

The request -> prompt -> generation / log-likelihood logic lives in plain functions below that
need no lmms-eval (tested on tiny checkpoints); `EveLmms`, the `lmms` subclass, is built on first
access (`from eval.lmms_eval_adapter import EveLmms`) and raises an ImportError naming the extra
when lmms-eval is missing.

Prompts follow the `vicuna_v1` template (`eve.templates`) as in `eve-eval`: a context without
`<image>` gets one `<image>\\n` per image in front (the LLaVA convention lmms-eval's tasks assume).
Decoding is greedy unless the task asks for temperature > 0; `until` strings stop generation and
are cut from the answer. Images only: video and audio visuals raise NotImplementedError.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch

from eve.attention_backends import varying_shape_attention
from eve.pretrained import load_pretrained
from eve.processing_eve import IMAGE_TOKEN
from eve.templates import get_template

EXTRA_HINT = "lmms-eval is not installed: install the optional extra with `pip install .[lmms_eval]` (or `pip install 'eve-kit[lmms_eval]'`)"
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's LLaVA default; tasks usually set their own

# --------------------------------------------------------------------------- core (no lmms-eval)


def flatten_visuals(visuals: Any) -> list:
    """What a task's doc_to_visual returned -> a flat list of images (PIL images, paths or bytes).
    Videos (paths to .mp4 ...) and audio (dicts) are not something EVE reads."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    flat = []
    for v in visuals:
        if isinstance(v, (list, tuple)):
            flat.extend(flatten_visuals(v))
        elif isinstance(v, dict):
            raise NotImplementedError(f"EVE reads images only; got a {sorted(v)} visual (audio?)")
        elif isinstance(v, str) and os.path.splitext(v)[1].lower() in {".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wav", ".mp3"}:
            raise NotImplementedError(f"EVE reads images only; got {v!r} (video/audio tasks are not supported)")
        elif v is not None:
            flat.append(v)
    return flat


def build_prompt(context: str, n_images: int, template: str = "vicuna_v1") -> str:
    """The generation prompt for one lmms-eval context: `<image>\\n` per image in front unless the
    context places its own `<image>` placeholders, then the chat template's user turn."""
    if n_images and IMAGE_TOKEN not in context:
        context = f"{IMAGE_TOKEN}\n" * n_images + context
    return get_template(template).prompt(context)


def split_gen_kwargs(gen_kwargs: dict | None, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list[str], dict]:
    """lmms-eval generation kwargs -> (stop strings, kwargs for `model.generate`). Greedy unless
    temperature > 0; keys EVE has no use for (image_aspect_ratio ...) are dropped."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    out = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
           "num_beams": int(gen_kwargs.get("num_beams") or 1), "do_sample": temperature > 0}
    if temperature > 0:
        out["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            out["top_p"] = float(gen_kwargs["top_p"])
    return [u for u in until if u], out


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any stop string (generate(stop_strings=...) stops
    after it and keeps it)."""
    cut = len(text)
    for stop in until:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate_batch(model, processor, contexts: Sequence[str], visuals: Sequence[list], gen_kwargs: dict | None = None,
                   template: str = "vicuna_v1", default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """One batch of lmms-eval `generate_until` requests sharing gen_kwargs: answers, stripped
    and cut at the first stop string."""
    until, kwargs = split_gen_kwargs(gen_kwargs, default_max_new_tokens)
    prompts = [build_prompt(c, len(v), template) for c, v in zip(contexts, visuals)]
    images = [list(v) for v in visuals] if any(visuals) else None
    device = _device(model)
    inputs = processor(text=prompts, images=images, return_tensors="pt").to(device)
    prompt_len = inputs["input_ids"].shape[1]
    tok = processor.tokenizer
    if until:  # generate stops each row after a stop string; the text is cut before it below
        kwargs.update(stop_strings=list(until), tokenizer=tok)
    with torch.no_grad(), varying_shape_attention(device):
        out = model.generate(**inputs, **kwargs, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    texts = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return [truncate_at_stop(t, until).strip() for t in texts]


def loglikelihood_batch(model, processor, contexts: Sequence[str], continuations: Sequence[str], visuals: Sequence[list],
                        template: str = "vicuna_v1") -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation, whether greedy decoding would produce it) for each
    request. The continuation is the assistant's answer: it follows the template's assistant
    prefix, exactly as in training (`Template.render`)."""
    tpl = get_template(template)
    prompts = [build_prompt(c, len(v), template) for c, v in zip(contexts, visuals)]
    sep = tpl.assistant[len(tpl.assistant.rstrip()) :]  # the space `prompt()` strips after "ASSISTANT:"
    fulls = [p + (cont if cont[:1].isspace() or not cont else sep + cont) for p, cont in zip(prompts, continuations)]
    tok = processor.tokenizer
    n_cont = []
    for prompt, full in zip(prompts, fulls):  # continuation tokens: those past the common prefix
        a, b = tok(prompt)["input_ids"], tok(full)["input_ids"]
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        n_cont.append(len(b) - common)
    images = [list(v) for v in visuals] if any(visuals) else None
    inputs = processor(text=fulls, images=images, return_tensors="pt").to(_device(model))  # left-padded
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    ids = inputs["input_ids"]
    results = []
    for row, n in enumerate(n_cont):
        if n == 0:
            results.append((0.0, True))
            continue
        target = ids[row, -n:]
        logprobs = torch.log_softmax(logits[row, -n - 1 : -1], dim=-1)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        results.append((total, bool((logprobs.argmax(-1) == target).all())))
    return results


def _batches(args: Sequence[tuple], batch_size: int, key: Callable[[tuple], Any]) -> Iterable[list[int]]:
    """Indices of requests grouped by `key` (same gen_kwargs / task), longest contexts first, in
    chunks of batch_size."""
    groups: dict = {}
    for i, a in enumerate(args):
        groups.setdefault(key(a), []).append(i)
    for idx in groups.values():
        idx.sort(key=lambda i: -len(args[i][0]))
        for start in range(0, len(idx), batch_size):
            yield idx[start : start + batch_size]


def _gen_key(a: tuple) -> str:
    return json.dumps(a[1], sort_keys=True, default=str)


def run_generate_until(model, processor, args: Sequence[tuple], get_doc: Callable[[str, str, Any], Any], batch_size: int = 1,
                       template: str = "vicuna_v1", default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       progress: Callable[[int], None] | None = None) -> list[str]:
    """lmms-eval `generate_until` requests, given as their `.args`
    (context, gen_kwargs, doc_to_visual, doc_id, task, split); `get_doc(task, split, doc_id)`
    returns the document. Answers in request order."""
    out: list[str | None] = [None] * len(args)
    for idx in _batches(args, batch_size, _gen_key):
        contexts, visuals = [], []
        for i in idx:
            context, _, doc_to_visual, doc_id, task, split = args[i][:6]
            contexts.append(context if isinstance(context, str) else context[0])
            visuals.append(flatten_visuals(doc_to_visual(get_doc(task, split, doc_id)) if doc_to_visual else None))
        answers = generate_batch(model, processor, contexts, visuals, args[idx[0]][1], template, default_max_new_tokens)
        for i, answer in zip(idx, answers):
            out[i] = answer
        if progress:
            progress(len(idx))
    return out


def run_loglikelihood(model, processor, args: Sequence[tuple], get_doc: Callable[[str, str, Any], Any], batch_size: int = 1,
                      template: str = "vicuna_v1", progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """lmms-eval `loglikelihood` requests, given as their `.args`
    (context, doc_to_target, doc_to_visual, doc_id, task, split); doc_to_target is the
    continuation string or a function of the document."""
    out: list[tuple[float, bool] | None] = [None] * len(args)
    for idx in _batches(args, batch_size, lambda a: 0):
        contexts, conts, visuals = [], [], []
        for i in idx:
            context, target, doc_to_visual, doc_id, task, split = args[i][:6]
            doc = get_doc(task, split, doc_id) if (callable(target) or doc_to_visual) else None
            contexts.append(context if isinstance(context, str) else context[0])
            conts.append(target if isinstance(target, str) else target(doc))
            visuals.append(flatten_visuals(doc_to_visual(doc) if doc_to_visual else None))
        for i, result in zip(idx, loglikelihood_batch(model, processor, contexts, conts, visuals, template)):
            out[i] = result
        if progress:
            progress(len(idx))
    return out


load_eve = load_pretrained  # model and processor, as `eve-eval run` loads them (bf16 on CUDA)


# --------------------------------------------------------------------------- the lmms-eval model


def _batch_size(value) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        warnings.warn("eve: batch_size 'auto' is not supported; using 1 (pass --batch_size N)", stacklevel=3)
        return 1
    return max(1, int(value))


def _build_class():
    try:
        from lmms_eval.api.model import lmms
    except ImportError as e:
        raise ImportError(EXTRA_HINT) from e
    from tqdm import tqdm

    class EveLmms(lmms):
        """EVE for lmms-eval: `--model eve --model_args pretrained=DIR[,template=vicuna_v1,max_new_tokens=N,dtype=bfloat16,attn_implementation=sdpa]`."""

        is_simple = True

        def __init__(self, pretrained: str, device: str | None = None, batch_size=1, template: str = "vicuna_v1",
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, dtype: str | None = None,
                     attn_implementation: str | None = None, **kwargs) -> None:
            super().__init__()
            kwargs.pop("max_batch_size", None)
            if kwargs:
                warnings.warn(f"eve: ignoring unknown model_args {sorted(kwargs)}", stacklevel=2)
            get_template(template)  # fail early on a typo
            self.model, self.processor = load_eve(str(pretrained), device, dtype, attn_implementation)
            self.batch_size_per_gpu = _batch_size(batch_size)
            self.template, self.max_new_tokens = template, int(max_new_tokens)

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        @property
        def device(self) -> torch.device:
            return _device(self.model)

        def _get_doc(self, task, split, doc_id):
            return self.task_dict[task][split][doc_id]

        def generate_until(self, requests) -> list[str]:
            with tqdm(total=len(requests), disable=self.rank != 0, desc="eve generate_until") as bar:
                return run_generate_until(self.model, self.processor, [r.args for r in requests], self._get_doc,
                                          self.batch_size, self.template, self.max_new_tokens, bar.update)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            with tqdm(total=len(requests), disable=self.rank != 0, desc="eve loglikelihood") as bar:
                return run_loglikelihood(self.model, self.processor, [r.args for r in requests], self._get_doc,
                                         self.batch_size, self.template, bar.update)

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("eve: multi-round generation (generate_until_multi_round) is not supported")

    EveLmms.__module__ = __name__
    EveLmms.__qualname__ = "EveLmms"
    try:  # the legacy registry (lmms-eval < 0.6 looked models up there); needs lmms-eval's full install
        from lmms_eval.api.registry import register_model

        register_model("eve")(EveLmms)
    except ImportError:
        pass
    return EveLmms


_CLASS = None


def __getattr__(name: str):
    global _CLASS
    if name == "EveLmms":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lmms_eval_models():
    """Entry point (group `lmms_eval.models`, lmms-eval >= 0.6): the manifest naming `eve`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="eve", simple_class_path=f"{__name__}.EveLmms")
