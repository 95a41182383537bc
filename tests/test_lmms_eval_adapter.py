"""The lmms-eval adapter (eval/lmms_eval_adapter.py) on a tiny EVE checkpoint saved to disk.

The request -> prompt -> generation / log-likelihood logic needs no lmms-eval and is always
tested; the registered `lmms` class is tested when lmms-eval is importable.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import random_image
from eve.templates import get_template
from eval import lmms_eval_adapter as adapter

SIZES = [(40, 40), (90, 30), (24, 96)]


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return adapter.load_eve(str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def docs():
    """A task dict as lmms-eval keeps it: task -> split -> doc_id -> doc."""
    rows = [{"image": random_image(*SIZES[i % 3], seed=i), "question": f"What is shown? {i}", "answer": "yes"} for i in range(3)]
    rows.append({"image": None, "question": "Say something.", "answer": "no"})
    return {"toy": {"test": rows}}


def _visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def _gen_args(docs, gen_kwargs):
    return [(d["question"], dict(gen_kwargs), _visual, i, "toy", "test") for i, d in enumerate(docs["toy"]["test"])]


def _get_doc(docs):
    return lambda task, split, doc_id: docs[task][split][doc_id]


def test_prompt_matches_eve_eval():
    tpl = get_template("vicuna_v1")
    assert adapter.build_prompt("What?", 1) == tpl.prompt("<image>\nWhat?")  # as eval/runner.py builds it
    assert adapter.build_prompt("What?", 0) == tpl.prompt("What?")
    assert adapter.build_prompt("<image>\nA <image> B", 2) == tpl.prompt("<image>\nA <image> B")  # placed by the task
    assert adapter.build_prompt("Q", 2).count("<image>") == 2
    assert adapter.build_prompt("Q", 1, template="plain") == "<image>\nQ"


def test_gen_kwargs_and_stops():
    until, kw = adapter.split_gen_kwargs({"until": "\n\n", "max_new_tokens": 7, "temperature": 0, "image_aspect_ratio": "pad"})
    assert until == ["\n\n"] and kw == {"max_new_tokens": 7, "num_beams": 1, "do_sample": False}
    until, kw = adapter.split_gen_kwargs({"until": ["", "ASSISTANT:"], "temperature": 0.5, "top_p": 0.9}, 33)
    assert until == ["ASSISTANT:"] and kw["do_sample"] and kw["temperature"] == 0.5 and kw["max_new_tokens"] == 33
    with pytest.raises(ValueError, match="until"):
        adapter.split_gen_kwargs({"until": 3})
    assert adapter.truncate_at_stop("abc.\n\nUSER: x", ["USER:", "\n\n"]) == "abc."
    assert adapter.truncate_at_stop("abc", []) == "abc"


def test_flatten_visuals():
    img = random_image(10, 10)
    assert adapter.flatten_visuals(None) == []
    assert adapter.flatten_visuals(img) == [img]
    assert adapter.flatten_visuals([[img, None], [img]]) == [img, img]
    with pytest.raises(NotImplementedError, match="images only"):
        adapter.flatten_visuals(["clip.mp4"])
    with pytest.raises(NotImplementedError, match="images only"):
        adapter.flatten_visuals([{"array": [0.0], "sampling_rate": 16000}])


def test_generate_until_batched_equals_alone_and_eve_eval(loaded, docs):
    model, processor = loaded
    args = _gen_args(docs, {"max_new_tokens": 5, "until": []})
    batched = adapter.run_generate_until(model, processor, args, _get_doc(docs), batch_size=3)
    alone = adapter.run_generate_until(model, processor, args, _get_doc(docs), batch_size=1)
    assert batched == alone and len(batched) == 4
    # The same answer eve-eval's runner gets: template prompt, greedy, decoded after the prompt.
    row = docs["toy"]["test"][1]
    prompt = get_template("vicuna_v1").prompt("<image>\n" + row["question"])
    inputs = processor(text=[prompt], images=[row["image"]], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert batched[1] == processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    shorter = adapter.run_generate_until(model, processor, _gen_args(docs, {"max_new_tokens": 2}), _get_doc(docs), batch_size=3)
    assert all(b.startswith(s) for s, b in zip(shorter, batched))  # max_new_tokens honoured


def test_generate_until_stops_at_until(loaded, docs):
    model, processor = loaded
    raw = adapter.generate_batch(model, processor, ["What is shown?"], [[docs["toy"]["test"][0]["image"]]],
                                 {"max_new_tokens": 12}, default_max_new_tokens=12)[0]
    if len(raw) < 4:
        pytest.skip(f"the random tiny model answered too little to cut: {raw!r}")
    stop = raw[len(raw) // 2 : len(raw) // 2 + 2]
    cut = adapter.generate_batch(model, processor, ["What is shown?"], [[docs["toy"]["test"][0]["image"]]],
                                 {"max_new_tokens": 12, "until": [stop]})[0]
    assert cut == raw[: raw.index(stop)].strip()
    assert stop not in cut


def _manual_loglik(model, processor, prompt: str, full: str, image) -> tuple[float, list[int], list[int]]:
    tok = processor.tokenizer
    n = len(tok(full)["input_ids"]) - len(tok(prompt)["input_ids"])
    inputs = processor(text=[full], images=[image] if image is not None else None, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    target = inputs["input_ids"][0, -n:]
    lp = torch.log_softmax(logits[-n - 1 : -1], -1)
    return lp.gather(-1, target[:, None]).sum().item(), lp.argmax(-1).tolist(), target.tolist()


def test_loglikelihood_matches_a_manual_forward(loaded, docs):
    model, processor = loaded
    rows = docs["toy"]["test"]
    args = [(r["question"], (lambda d: d["answer"]) if i % 2 else " maybe so", _visual, i, "toy", "test") for i, r in enumerate(rows)]
    batched = adapter.run_loglikelihood(model, processor, args, _get_doc(docs), batch_size=4)
    alone = adapter.run_loglikelihood(model, processor, args, _get_doc(docs), batch_size=1)
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    for i, r in enumerate(rows):
        cont = r["answer"] if i % 2 else " maybe so"
        prompt = get_template("vicuna_v1").prompt(("<image>\n" if r["image"] is not None else "") + r["question"])
        full = prompt + (cont if cont.startswith(" ") else " " + cont)  # the answer after "ASSISTANT: ", as in training
        want, greedy_ids, target = _manual_loglik(model, processor, prompt, full, r["image"])
        assert alone[i][0] == pytest.approx(want, abs=1e-4) and alone[i][0] < 0
        assert alone[i][1] == (greedy_ids == target)


def test_loglikelihood_greedy_flag(loaded, docs):
    """A continuation made of the model's own greedy tokens is flagged greedy and beats another one."""
    model, processor = loaded
    image = docs["toy"]["test"][0]["image"]
    prompt = adapter.build_prompt("What is shown?", 1)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    greedy = processor.tokenizer.decode(out, skip_special_tokens=True)  # raw: keeps its leading space
    if processor.tokenizer(prompt + greedy)["input_ids"][-len(out) :] != out.tolist():
        pytest.skip("greedy tokens do not survive a decode/encode round trip with this tokenizer")
    (lp_g, is_g), (lp_o, is_o) = adapter.loglikelihood_batch(
        model, processor, ["What is shown?"] * 2, [greedy, "zzzz"], [[image], [image]])
    assert is_g and not is_o and lp_g > lp_o


def test_missing_lmms_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    monkeypatch.setattr(adapter, "_CLASS", None)
    with pytest.raises(ImportError, match=r"pip install \.\[lmms_eval\]"):
        from eval.lmms_eval_adapter import EveLmms  # noqa: F401
    with pytest.raises(AttributeError):
        adapter.NoSuchThing  # noqa: B018


def test_registered_lmms_class_end_to_end(checkpoint, docs):
    pytest.importorskip("lmms_eval.api.model", reason="lmms-eval not installed (pip install .[lmms_eval])")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms

    EveLmms = adapter.EveLmms
    assert issubclass(EveLmms, lmms) and EveLmms.is_simple
    try:  # lmms-eval >= 0.6 finds models through the `lmms_eval.models` entry point's manifest
        from lmms_eval.models.registry_v2 import ModelRegistryV2
    except ImportError:
        ModelRegistryV2 = None
    if ModelRegistryV2 is not None:
        registry = ModelRegistryV2()
        registry.register_manifest(adapter.lmms_eval_models())
        assert registry.get_model_class("eve") is EveLmms

    lm = EveLmms.create_from_arg_string(f"pretrained={checkpoint},max_new_tokens=4", {"batch_size": "2", "device": "cpu"})
    assert lm.batch_size == 2 and lm.device.type == "cpu"
    lm.task_dict = docs
    meta = lambda i: {"task": "toy", "doc_id": i, "repeats": 1}  # noqa: E731
    gen = [Instance("generate_until", a, i, meta(i)) for i, a in enumerate(_gen_args(docs, {"until": ["\n\n"]}))]
    answers = lm.generate_until(gen)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert answers == adapter.run_generate_until(lm.model, lm.processor, [r.args for r in gen], _get_doc(docs), 1,
                                                 default_max_new_tokens=4)
    ll = [Instance("loglikelihood", (r["question"], " yes", _visual, i, "toy", "test"), i, meta(i))
          for i, r in enumerate(docs["toy"]["test"])]
    scores = lm.loglikelihood(ll)
    assert len(scores) == 4 and all(s < 0 and isinstance(g, bool) for s, g in scores)
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(gen)
