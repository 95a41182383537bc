"""The world written to disk in the formats the real tools read:

- pool/: the curation input, a folder of PNGs (+ a few broken files for the filter to reject) and
  pool_captions.jsonl keyed by the uid eve-curate gives each file (the stand-in for alt-text or
  a captioner's output).
- sft/: LLaVA-style conversations (three questions about one image) and their images.
- eval/<split>/: VQAv2's own files: questions.json, annotations.json (ten answers per
  question) and images/<image_id>.jpg. `heldout` uses the training aspect ratios, `unseen`
  only 1:4 and 4:1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_curation.sources import make_uid
from demo.world import TRAIN_ASPECTS, UNSEEN_ASPECTS, aspect_name, render, sample_scene
from eval.tasks.base import SHORT_ANSWER

POOL_SOURCE = "shapes"  # the source name given to eve-curate scan
QUESTION_TYPES = ("colour", "kind", "count")
SPLITS = {"pool": 1, "sft": 2, "heldout": 3, "unseen": 4}


def _scenes(seed: int, split: str, n: int, aspects):
    rng = np.random.default_rng([seed, SPLITS[split]])
    return [sample_scene(rng, aspects, seed=int(np.random.SeedSequence([seed, SPLITS[split], i]).generate_state(1)[0]))
            for i in range(n)], rng


def write_pool(out: Path, n: int, n_bad: int, seed: int, long_side: int) -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes, rng = _scenes(seed, "pool", n, TRAIN_ASPECTS)
    with open(out / "pool_captions.jsonl", "w") as captions:
        for i, scene in enumerate(tqdm(scenes, desc="world: curation pool", unit="image")):
            key = f"{i:06d}.png"
            render(scene, long_side).save(images / key)
            captions.write(json.dumps({"uid": make_uid(POOL_SOURCE, key), "caption": scene.caption(rng), "model": "world"}) + "\n")
    for j in range(n_bad):  # what a real crawl holds: thumbnails, banners and broken downloads
        kind = ("tiny", "banner", "truncated", "empty")[j % 4]
        path = images / f"bad-{j:03d}-{kind}.png"
        if kind == "tiny":
            render(scenes[j], 24).save(path)
        elif kind == "banner":
            render(scenes[j], long_side).resize((long_side, long_side // 8)).save(path)
        elif kind == "truncated":
            render(scenes[j], long_side).save(path)
            path.write_bytes(path.read_bytes()[:200])
        else:
            path.write_bytes(b"")
    return out


def write_sft(out: Path, n: int, seed: int, long_side: int) -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes, rng = _scenes(seed, "sft", n, TRAIN_ASPECTS)
    samples = []
    for i, scene in enumerate(tqdm(scenes, desc="world: SFT conversations", unit="image")):
        name = f"{i:06d}.png"
        render(scene, long_side).save(images / name)
        turns = []
        for k, (_, question, answer) in enumerate(scene.questions(rng)):
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + f"{question}\n{SHORT_ANSWER}"},
                      {"from": "gpt", "value": answer}]
        samples.append({"id": f"sft-{i}", "image": f"images/{name}", "conversations": turns})
    (out / "conversations.json").write_text(json.dumps(samples))
    return out / "conversations.json"


def write_eval(out: Path, split: str, n: int, seed: int, long_side: int) -> Path:
    """VQAv2-format files; question_id = image_id * 10 + question type (0 colour, 1 kind, 2 count)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes, rng = _scenes(seed, split, n, TRAIN_ASPECTS if split == "heldout" else UNSEEN_ASPECTS)
    questions, annotations = [], []
    for image_id, scene in enumerate(tqdm(scenes, desc=f"world: {split} split", unit="image"), start=1):
        render(scene, long_side).save(images / f"{image_id}.jpg", quality=95)
        for qtype, question, answer in scene.questions(rng):
            qid = image_id * 10 + QUESTION_TYPES.index(qtype)
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": "other",
                "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
                "aspect": aspect_name(scene.aspect),
            })
    (out / "questions.json").write_text(json.dumps({"data_subtype": split, "questions": questions}))
    (out / "annotations.json").write_text(json.dumps({"data_subtype": split, "annotations": annotations}))
    return out
