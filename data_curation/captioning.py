"""Stage 6, caption: re-caption the kept images (SPEC 3; the paper used Emu2-17B and
LLaVA-1.5-13B), recording the model, prompt and decoding settings with every caption; or merge
captions from a JSONL/CSV/TSV file keyed by uid.

The captioner is any transformers image-to-text model given by path or hub id (loaded with
AutoProcessor and the first of AutoModelForImageTextToText / AutoModelForVision2Seq /
AutoModelForCausalLM that knows its config), EVE checkpoints included (`import eve` registers
them; their prompt is the `--template` around "<image>\\n<prompt>"). A kept image that cannot
be decoded or captioned, or whose caption comes out empty or is absent from the file, is
rejected here (decode_error, caption_error, empty_caption, no_caption): export only ever sees
captioned images.
"""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Iterator

import torch

from data_curation.decisions import PipelineState, shard_items
from data_curation.failures import clean_detail, failure_of
from data_curation.progress import ShardBar, stage_log
from data_curation.shards import CurationError, Part, StageDir, atomic_path, pause_for_tests, read_jsonl, write_jsonl_atomic
from data_curation.reading import ItemReader
from eve.attention_backends import varying_shape_attention
from eve.image_io import load_image

DEFAULT_PROMPT = "Describe the image in detail."
log = stage_log("caption")


class Captioner:
    """One image-to-text model with a fixed prompt and greedy/beam decoding settings."""

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, template: str = "vicuna_v1", max_new_tokens: int = 64,
                 num_beams: int = 1, device: str | None = None):
        import transformers

        import eve  # noqa: F401  (registers model_type "eve" with the Auto classes)
        from eve.templates import get_template

        config = transformers.AutoConfig.from_pretrained(model)
        self.is_eve = config.model_type == "eve"
        cls = transformers.AutoModelForCausalLM if self.is_eve else _auto_class(config, model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = cls.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(model)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not getattr(config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # batched generation continues right after each prompt
        if self.is_eve:
            question = prompt if "<image>" in prompt else f"<image>\n{prompt}"
            self.prompt = get_template(template).prompt(question)
        elif getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            self.prompt = prompt
        self.generation = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}
        self.record = {"model": model, "prompt": self.prompt, "generation": self.generation}
        log.info("captioner %s (%s) on %s; prompt %r; %s", model, cls.__name__, self.device, self.prompt, self.generation)

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        prompts = [self.prompt] * len(images)
        if self.is_eve:
            inputs = self.processor(text=prompts, images=images)
        else:
            inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(device=self.device, dtype=self.dtype)
        with varying_shape_attention(self.device):
            out = self.model.generate(**inputs, **self.generation)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            out = out[:, inputs["input_ids"].shape[1] :]  # decoder-only: drop the prompt
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _auto_class(config, model: str):
    import transformers

    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, name, None)
        if cls is not None and type(config) in cls._model_mapping:
            return cls
    raise CurationError(f"{model}: model_type {config.model_type!r} is not an image-to-text model "
                        "that transformers' Auto classes know")


def _caption_items(captioner: Captioner, items: list[dict], batch_size: int) -> list[dict]:
    """One row per item, in order: {"uid", "status": "kept", "caption", "captioner"} or a rejection."""
    rows: dict[int, dict] = {}
    reader = ItemReader()
    for start in range(0, len(items), batch_size):
        batch, images = [], []
        for i in range(start, min(start + batch_size, len(items))):
            try:
                images.append(load_image(reader.read(items[i])))
                batch.append(i)
            except Exception as e:  # noqa: BLE001 - a bad item never ends the run
                rows[i] = _rejected(items[i], *failure_of(e))
        for i, text in zip(batch, _generate(captioner, images, [items[i]["uid"] for i in batch])):
            if isinstance(text, Exception):
                rows[i] = _rejected(items[i], "caption_error", f"{type(text).__name__}: {text}")
            elif not text:
                rows[i] = _rejected(items[i], "empty_caption", "the captioner produced no text")
            else:
                rows[i] = {"uid": items[i]["uid"], "status": "kept", "caption": text, "captioner": captioner.record}
    return [rows[i] for i in range(len(items))]


def _generate(captioner: Captioner, images: list, uids: list[str]) -> list:
    """Captions for a batch; when the batch fails, one image at a time so only the bad one fails."""
    if not images:
        return []
    try:
        return captioner(images)
    except Exception as e:  # noqa: BLE001
        if len(images) == 1:
            log.warning("caption failed for %s: %s", uids[0], e)
            return [e]
        return [r for img, uid in zip(images, uids) for r in _generate(captioner, [img], [uid])]


def _rejected(item: dict, reason: str, detail: str) -> dict:
    return {"uid": item["uid"], "status": "rejected", "reason": reason, "detail": clean_detail(detail)}


class CaptionFile:
    """Captions from a file, indexed once into SQLite beside the stage's shards so lookups cost a
    shard's worth of memory whatever the file size. JSONL rows: {"uid", "caption", ...}; CSV/TSV:
    columns uid and caption. Other fields are recorded with each caption (e.g. model, prompt)."""

    def __init__(self, path: Path, index_path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CurationError(f"--captions-file {path} does not exist")
        if not index_path.exists():
            with atomic_path(index_path) as tmp:
                self._build(tmp)
        self.db = sqlite3.connect(index_path)

    def _rows(self) -> Iterator[tuple[int, dict]]:
        if self.path.suffix == ".jsonl":
            with open(self.path, "rb") as f:  # decoded line by line, so an error names its line
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield line_no, _json_row(line.decode("utf-8"))
                        except ValueError as e:  # UnicodeDecodeError included
                            raise CurationError(f"{self.path}:{line_no}: not a JSON object: {e}") from e
        elif self.path.suffix in (".csv", ".tsv"):
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if self.path.suffix == ".tsv" else ",")
                try:
                    for row in reader:
                        yield reader.line_num, row
                except UnicodeDecodeError as e:
                    raise CurationError(f"{self.path}: not UTF-8 text after line {reader.line_num}: {e}") from None
        else:
            raise CurationError(f"--captions-file {self.path}: expected .jsonl, .csv or .tsv")

    def _build(self, tmp: Path) -> None:
        import json

        db = sqlite3.connect(tmp)
        db.execute("CREATE TABLE captions (uid TEXT PRIMARY KEY, caption TEXT, extra TEXT, line INTEGER)")
        n = 0
        for line_no, row in self._rows():
            uid, caption = row.get("uid"), row.get("caption")
            if not uid or not isinstance(caption, str):
                raise CurationError(f"{self.path}:{line_no}: needs a 'uid' and a string 'caption', got {sorted(row)}")
            extra = {k: v for k, v in row.items() if k not in ("uid", "caption") and v not in (None, "")}
            try:
                db.execute("INSERT INTO captions VALUES (?, ?, ?, ?)", (str(uid), caption, json.dumps(extra), line_no))
            except sqlite3.IntegrityError:
                first = db.execute("SELECT line FROM captions WHERE uid = ?", (str(uid),)).fetchone()[0]
                raise CurationError(f"{self.path}:{line_no}: uid {uid} already has a caption on line {first}") from None
            n += 1
        db.commit()
        db.close()
        log.info("indexed %d captions from %s", n, self.path)

    def lookup(self, uids: list[str]) -> dict[str, tuple[str, dict]]:
        import json

        found = {}
        for s in range(0, len(uids), 500):  # SQLite's limit on bound parameters
            chunk = uids[s : s + 500]
            q = f"SELECT uid, caption, extra FROM captions WHERE uid IN ({','.join('?' * len(chunk))})"
            found.update({u: (c, json.loads(e)) for u, c, e in self.db.execute(q, chunk)})
        return found

    def rows(self, items: list[dict]) -> list[dict]:
        found = self.lookup([it["uid"] for it in items])
        out = []
        for it in items:
            if it["uid"] in found:
                caption, extra = found[it["uid"]]
                if caption.strip():
                    out.append({"uid": it["uid"], "status": "kept", "caption": caption.strip(),
                                "captioner": {"file": str(self.path), **extra}})
                    continue
                out.append(_rejected(it, "empty_caption", f"empty caption in {self.path}"))
            else:
                out.append(_rejected(it, "no_caption", f"uid not in {self.path}"))
        return out


def _json_row(line: str) -> dict:
    import json

    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"got {type(row).__name__}")
    return row


def caption_stage(out: Path, model: str | None = None, captions_file: str | None = None, prompt: str = DEFAULT_PROMPT,
                  template: str = "vicuna_v1", max_new_tokens: int = 64, num_beams: int = 1, batch_size: int = 8,
                  part: Part = Part(), device: str | None = None) -> dict:
    """caption/shard-*.jsonl: one row per kept image of the shard (after selection)."""
    if (model is None) == (captions_file is None):
        raise CurationError("caption needs exactly one of --model or --captions-file")
    filt, select, stage = StageDir(out, "filter"), StageDir(out, "select"), StageDir(out, "caption")
    filt.require_complete("caption")
    clustering = StageDir(out, "embed").started
    if clustering:
        select.require_complete("caption (the embed stage has run, so selection decides what is kept)")
    if captions_file:
        fp = Path(captions_file).resolve()
        settings = {"captions_file": str(fp), "bytes": fp.stat().st_size if fp.exists() else None}
    else:
        settings = {"model": model, "prompt": prompt, "template": template, "max_new_tokens": max_new_tokens, "num_beams": num_beams}
    stage.claim(settings, upstream=[select if clustering else filt])
    if stage.complete:
        log.info("already finished")
        return stage.done_info()
    stage.remove_partial(part)
    state = PipelineState.of(out)
    todo = [i for i in range(state.shards) if part.owns(i) and not stage.shard(i, ".jsonl").exists()]
    log.info("part %s: %d shard(s) to caption from %s", part, len(todo), captions_file or model)
    source = None
    with ShardBar(len(todo), "caption") as progress:
        for index in todo:
            kept = [it for it in shard_items(out, index, "select", state) if it["status"] == "kept"]
            if source is None:
                source = CaptionFile(Path(captions_file), stage.path / "captions_index.sqlite") if captions_file else \
                    Captioner(model, prompt, template, max_new_tokens, num_beams, device)
            rows = source.rows(kept) if captions_file else _caption_items(source, kept, batch_size)
            write_jsonl_atomic(stage.shard(index, ".jsonl"), rows)
            progress.advance(len(kept))
            pause_for_tests()
    missing = [i for i in range(state.shards) if not stage.shard(i, ".jsonl").exists()]
    if missing:
        log.info("%d shard(s) still to do by other parts", len(missing))
        return {"missing_shards": len(missing)}
    counts: dict = {"captioned": 0, "rejected": 0}
    for i in range(state.shards):
        for r in read_jsonl(stage.shard(i, ".jsonl")):
            counts["captioned" if r["status"] == "kept" else "rejected"] += 1
    stage.mark_complete(counts)
    log.info("captioned %d, rejected %d", counts["captioned"], counts["rejected"])
    return counts
