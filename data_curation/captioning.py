"""Stage 6, caption: re-caption the kept images with a captioner given by path, recording the
model, prompt and decoding settings with every caption; or merge captions from a file."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import torch
from tqdm import tqdm

from data_curation.decisions import final_decisions
from data_curation.shards import read_jsonl, write_jsonl_atomic
from data_curation.sources import read_bytes
from eve.image_io import load_image

DEFAULT_PROMPT = "Describe the image in detail."


def read_caption_file(path: Path) -> dict[str, str]:
    """uid -> caption from JSONL ({"uid", "caption"}) or CSV/TSV with uid and caption columns."""
    if path.suffix == ".jsonl":
        return {str(r["uid"]): r["caption"] for r in read_jsonl(path)}
    with open(path, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        return {str(r["uid"]): r["caption"] for r in rows}


class Captioner:
    """Any transformers image-to-text model; EVE checkpoints go through eve's Auto classes."""

    def __init__(self, model_path: str, prompt: str, max_new_tokens: int, device: torch.device):
        import eve  # noqa: F401  (registers model_type "eve")
        from eve.templates import get_template
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(model_path)
        cls = AutoModelForCausalLM if config.model_type == "eve" else AutoModelForImageTextToText
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model = cls.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.is_eve = config.model_type == "eve"
        self.prompt = get_template("vicuna_v1").prompt(f"<image>\n{prompt}") if self.is_eve else prompt
        self.settings = {"model": model_path, "prompt": self.prompt, "max_new_tokens": max_new_tokens, "do_sample": False}
        self.max_new_tokens, self.device = max_new_tokens, device

    def __call__(self, images) -> list[str]:
        if self.is_eve:
            inputs = self.processor(text=[self.prompt] * len(images), images=images).to(self.device)
        else:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def caption_stage(out: Path, model: str | None = None, captions_file: str | None = None, prompt: str = DEFAULT_PROMPT,
                  max_new_tokens: int = 64, batch_size: int = 8, shard_size: int = 1000) -> None:
    if (model is None) == (captions_file is None):
        raise ValueError("caption needs exactly one of --model or --captions-file")
    kept = (item for item in final_decisions(out) if item["status"] == "kept")  # streamed: memory is one shard
    dst = out / "caption"
    merged = read_caption_file(Path(captions_file)) if captions_file else None
    captioner = None
    for index in tqdm(itertools.count(), desc="caption", unit="shard"):
        chunk = list(itertools.islice(kept, shard_size))
        if not chunk:
            break
        target = dst / f"shard-{index:05d}.jsonl"
        if target.exists():
            continue
        rows = []
        if merged is not None:
            rows = [{"uid": it["uid"], "caption": merged[it["uid"]], "model": f"file:{captions_file}"}
                    for it in chunk if it["uid"] in merged]
        else:
            captioner = captioner or Captioner(model, prompt, max_new_tokens, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b : b + batch_size]
                texts = captioner([load_image(read_bytes(it["ref"])) for it in batch])
                rows += [{"uid": it["uid"], "caption": t, **captioner.settings} for it, t in zip(batch, texts)]
        write_jsonl_atomic(target, rows)
    (dst / "settings.json").write_text(json.dumps({"model": model, "captions_file": captions_file, "prompt": prompt,
                                                   "max_new_tokens": max_new_tokens}, indent=2))
