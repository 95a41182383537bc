"""Training data: manifests of captions or conversations, images from folders or tar shards.

A manifest is JSONL (one sample a line; only byte offsets are kept in memory) or a LLaVA-style
JSON list. A sample is {"id", "image": optional path (relative to the image root, or
"shard.tar#member" inside a webdataset tar), "conversations": [{"from", "value"}, ...]}.
Samples are tokenized with eve.templates (labels from character offsets) and `max_length` is
applied after the visual tokens are spliced in. A bad sample (undecodable image, label
mismatch, image longer than max_length) is replaced by the next good one and counted, or
raises with `on_bad_sample="fail"`: the order stays deterministic, so resume stays exact.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from eve.image_io import InvalidImageError, load_image
from eve.processing_eve import EveProcessor, image_sizes_of, pad_images
from eve.templates import IGNORE_INDEX, LabelMaskingError, encode_example
from train.config import DataSource

MAX_REPLACEMENTS = 64


class BadSampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a short code."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason = reason


class Manifest:
    """Random access to the records of one manifest without holding a JSONL in memory."""

    def __init__(self, source: DataSource):
        self.path = Path(source.path)
        self.image_root = Path(source.image_root) if source.image_root else self.path.parent
        if not self.path.exists():
            raise FileNotFoundError(f"manifest {self.path} does not exist")
        if self.path.suffix == ".json":
            self.records = json.loads(self.path.read_text())
            self.offsets = None
        else:
            self.records = None
            self.offsets = _line_offsets(self.path)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        if self.records is not None:
            return self.records[i]
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise BadSampleError(f"{self.path}:{i + 1}", "bad_json", str(e)) from e


def _line_offsets(path: Path) -> np.ndarray:
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


class ImageStore:
    """Opens image references: plain paths, or `shard.tar#member` inside tar shards."""

    def __init__(self):
        self._tars: dict[Path, tuple[tarfile.TarFile, dict]] = {}  # per worker process

    def read(self, ref: str, root: Path):
        if "#" in ref and ref.split("#", 1)[0].endswith(".tar"):
            shard, member = ref.split("#", 1)
            tar, members = self._open_tar(root / shard)
            if member not in members:
                raise InvalidImageError(ref, "missing", f"no member {member!r} in {shard}")
            return load_image(tar.extractfile(members[member]).read())
        return load_image(root / ref)

    def _open_tar(self, path: Path):
        if path not in self._tars:
            tar = tarfile.open(path)
            self._tars[path] = (tar, {m.name: m for m in tar.getmembers() if m.isfile()})
        return self._tars[path]


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixels: np.ndarray | None  # [3, h, w]
    teacher_pixels: np.ndarray | None  # [3, T, T]
    sample_id: str
    truncated_tokens: int
    skipped: list[tuple[str, str]]  # (sample id, reason) of bad samples replaced by this one


class EveDataset(Dataset):
    def __init__(
        self,
        sources: list[DataSource],
        processor: EveProcessor,
        template: str,
        max_length: int,
        with_teacher: bool,
        on_bad_sample: str = "skip",
    ):
        self.manifests = [Manifest(s) for s in sources]
        self.bounds = np.cumsum([0] + [len(m) for m in self.manifests])
        self.processor, self.template, self.max_length = processor, template, max_length
        self.with_teacher, self.on_bad_sample = with_teacher, on_bad_sample
        self.images = ImageStore()
        if len(self) == 0:
            raise ValueError(f"no samples in {[s.path for s in sources]}")

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index: int) -> Sample:
        skipped = []
        for attempt in range(MAX_REPLACEMENTS):
            i = (index + attempt) % len(self)
            try:
                sample = self._encode(i)
                sample.skipped = skipped
                return sample
            except (BadSampleError, InvalidImageError, LabelMaskingError) as e:
                if self.on_bad_sample == "fail":
                    raise
                skipped.append((self._where(i), getattr(e, "reason", "label_mismatch")))
        raise RuntimeError(f"{MAX_REPLACEMENTS} bad samples in a row from index {index}: {skipped[-3:]}")

    def _where(self, i: int) -> str:
        m = int(np.searchsorted(self.bounds, i, side="right") - 1)
        return f"{self.manifests[m].path}#{i - self.bounds[m]}"

    def _encode(self, i: int) -> Sample:
        m = int(np.searchsorted(self.bounds, i, side="right") - 1)
        manifest = self.manifests[m]
        record = manifest[i - int(self.bounds[m])]
        where = f"{manifest.path}#{i - int(self.bounds[m])} (id {record.get('id')})"
        if "conversations" not in record:
            raise BadSampleError(where, "bad_record", "no 'conversations'")
        image_ref = record.get("image")
        ip = self.processor.image_processor
        pixels = teacher = None
        counts = []
        if image_ref:
            img = self.images.read(str(image_ref), manifest.image_root)
            pixels = ip.preprocess_one(img)
            counts = [ip.num_visual_tokens(img.height, img.width)]
            if self.with_teacher:
                teacher = ip.teacher_pixels([img])[0]
        turns = record["conversations"]
        if not image_ref and any("<image>" in t.get("value", "") for t in turns):
            raise BadSampleError(where, "bad_record", "<image> in the text but no image")
        enc = encode_example(
            self.processor.tokenizer, self.template, turns, self.processor.image_token_id, counts, self.max_length,
            self.processor.split_at_images,
        )
        return Sample(enc["input_ids"], enc["labels"], pixels, teacher, str(record.get("id", i)), enc["truncated_tokens"], [])


def collate(samples: list[Sample], pad_token_id: int) -> dict:
    """Right-padded token batch; images padded to the batch's largest size with their sizes."""
    longest = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    add_images_and_meta(batch, samples, samples)
    batch["meta"]["attn_len"] = longest  # attention cost per token: the padded row length
    return batch


def add_images_and_meta(batch: dict, in_row_order: list[Sample], samples: list[Sample]) -> dict:
    """Add `pixel_values`, `image_sizes` (and `teacher_pixel_values`) of the samples with an
    image, in the order their image tokens appear in the batch (`in_row_order`), and `meta`
    (ids in the sampler's order, skipped / truncated counts, images, real tokens)."""
    with_images = [s for s in in_row_order if s.pixels is not None]
    if with_images:
        arrays = [s.pixels for s in with_images]
        batch["pixel_values"] = torch.from_numpy(pad_images(arrays))
        batch["image_sizes"] = torch.from_numpy(image_sizes_of(arrays))
        if with_images[0].teacher_pixels is not None:
            batch["teacher_pixel_values"] = torch.from_numpy(np.stack([s.teacher_pixels for s in with_images]))
    batch["meta"] = {
        "ids": [s.sample_id for s in samples],
        "skipped": [x for s in samples for x in s.skipped],
        "truncated_tokens": sum(s.truncated_tokens for s in samples),
        "truncated_samples": sum(s.truncated_tokens > 0 for s in samples),
        "images": len(with_images),
        "tokens": sum(len(s.input_ids) for s in samples),  # real tokens, padding not counted
    }
    return batch


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, starting after the samples that were
    already consumed: re-running from a checkpoint sees exactly the batches it would have."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int, consumed: int = 0):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.consumed = consumed  # global samples consumed, all epochs together

    def __iter__(self):
        epoch, offset = divmod(self.consumed, self.n)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            yield from order[offset + self.rank :: self.world]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless: the trainer counts steps
        return self.n
