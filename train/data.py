"""Training data: manifests of captions or conversations, images from folders or tar shards.

A manifest is JSONL (one sample a line; only byte offsets are kept in memory) or a LLaVA-style
JSON list. A sample is {"id", "image": optional path (relative to the image root, or
"shard.tar#member" inside a webdataset tar), "conversations": [{"from", "value"}, ...]}.
Samples are tokenized with eve.templates (labels from character offsets) and `max_length` is
applied after the visual tokens are spliced in. A bad sample is replaced by the next good one
and counted under its reason, or raises with `on_bad_sample="fail"`: the order stays
deterministic, so resume stays exact. Bad means: a line that is not a JSON object (`bad_json`,
`bad_record`: `42`, `null`, a list, bytes that are not UTF-8), conversations that are not a
list of {"from": str, "value": str} (`bad_record`), an image that is missing, not a regular file,
undecodable or cut short inside its tar (`missing`, `not_a_file`, `decode_error`, ...), an
empty answer or a speaker the template does not know (`empty_answer`, `unknown_speaker`), a
label mismatch or an image longer than max_length (`label_mismatch`).
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from eve.image_io import InvalidImageError, load_image
from eve.image_ref import NotRegularFileError, open_regular_file, split_ref
from eve.processing_eve import EveProcessor, image_sizes_of, pad_images
from eve.templates import IGNORE_INDEX, LabelMaskingError, encode_example
from train.config import DataSource

MAX_REPLACEMENTS = 64
log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a short code."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason, self.detail = reason, detail


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing, or a LLaVA JSON that is not a list)."""


class Manifest:
    """Random access to the records of one manifest without holding a JSONL in memory."""

    def __init__(self, source: DataSource):
        self.path = Path(source.path)
        self.image_root = Path(source.image_root) if source.image_root else self.path.parent
        if not self.path.is_file():
            raise ManifestError(f"manifest {self.path} does not exist or is not a file")
        if self.path.suffix == ".json":
            self.records = _json_list(self.path)
            self.offsets = None
        else:
            self.records = None
            self.offsets, self.line_numbers = _line_offsets(self.path)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.offsets)

    def where(self, i: int) -> str:
        """Record `i` as a reader finds it: `file.jsonl:LINE` or `file.json[INDEX]`."""
        return f"{self.path}[{i}]" if self.records is not None else f"{self.path}:{self.line_numbers[i]}"

    def __getitem__(self, i: int) -> dict:
        """Record `i` (0-based): a dict, else a BadSampleError naming the file and line/index."""
        where = self.where(i)
        if self.records is not None:
            record = self.records[i]
        else:
            with open(self.path, "rb") as f:
                f.seek(int(self.offsets[i]))
                line = f.readline()
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
                raise BadSampleError(where, "bad_json", str(e)) from e
        if not isinstance(record, dict):
            raise BadSampleError(where, "bad_record", f"{_kind(record)}, not a JSON object")
        return record


def _json_list(path: Path) -> list:
    """A LLaVA-style JSON list; a file that is not one cannot be trained on at all."""
    try:
        records = json.loads(path.read_bytes())
    except ValueError as e:
        raise ManifestError(f"manifest {path} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(records, list):
        raise ManifestError(f"manifest {path} holds {_kind(records)}, not a list of samples")
    return records


def _line_offsets(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines (12 bytes per sample)."""
    offsets, numbers, pos = [], [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                offsets.append(pos)
                numbers.append(number)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(numbers, dtype=np.uint32)


class ImageStore:
    """Opens image references: plain paths, or `shard.tar#member` inside tar shards. A tar is
    indexed once per worker process, as far as it can be read: a tar cut short keeps the members
    before the cut (logged), and a sample whose member is cut or absent is a bad sample."""

    def __init__(self):
        self._tars: dict[Path, tuple[tarfile.TarFile | None, dict]] = {}  # per worker process

    def read(self, ref: str, root: Path):
        shard, member = split_ref(ref)
        if member is None:
            return load_image(root / ref)
        tar, members = self._open_tar(root / shard)
        if member not in members:
            raise InvalidImageError(ref, "missing", f"no file member {member!r} in {root / shard}")
        try:
            data = tar.extractfile(members[member]).read()
        except (tarfile.TarError, OSError) as e:  # the tar ends inside this member
            raise InvalidImageError(ref, "decode_error", f"member cut short in {root / shard}: {e}") from e
        return load_image(data)

    def _open_tar(self, path: Path):
        if path not in self._tars:
            self._tars[path] = _index_tar(path)
        return self._tars[path]


def _index_tar(path: Path) -> tuple[tarfile.TarFile | None, dict]:
    """(open tar, {name: regular-file member}); (None, {}) for a tar that cannot be opened."""
    try:  # opened once, without blocking: a FIFO named like a tar, even one swapped in late, is refused
        f = open_regular_file(path)
    except (OSError, NotRegularFileError) as e:
        log.warning("%s: no such tar, or not a regular file (%s); its samples are skipped", path, e)
        return None, {}
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, OSError) as e:
        f.close()
        log.warning("%s: not a readable uncompressed tar (%s); its samples are skipped", path, e)
        return None, {}
    members = {}
    while True:
        try:
            m = tar.next()
        except (tarfile.TarError, OSError) as e:
            log.warning("%s: unreadable after %d members (%s); the samples after the cut are skipped", path, len(members), e)
            break
        if m is None:
            break
        if m.isfile():
            members[m.name] = m
    return tar, members


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixels: np.ndarray | None  # [3, h, w]
    teacher_pixels: np.ndarray | None  # [3, T, T]
    sample_id: str
    truncated_tokens: int
    skipped: list[tuple[str, str, str]]  # (where, reason, message) of bad samples replaced by this one


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
                detail = e.detail if isinstance(e, BadSampleError) else str(e)  # the others name no line
                skipped.append((self._where(i), e.reason, detail))
        raise ManifestError(f"{MAX_REPLACEMENTS} bad samples in a row from index {index} (the data is mostly unusable); "
                            f"the last: {skipped[-3:]}")

    def _where(self, i: int) -> str:
        m = int(np.searchsorted(self.bounds, i, side="right") - 1)
        return self.manifests[m].where(i - int(self.bounds[m]))

    def _encode(self, i: int) -> Sample:
        m = int(np.searchsorted(self.bounds, i, side="right") - 1)
        manifest = self.manifests[m]
        record = manifest[i - int(self.bounds[m])]
        where = f"{manifest.where(i - int(self.bounds[m]))} (id {record.get('id')})"
        turns = _turns(record, where)
        image_ref = record.get("image")
        if image_ref is not None and not isinstance(image_ref, str):
            raise BadSampleError(where, "bad_record", f"'image' is {_kind(image_ref)}, not a path")
        ip = self.processor.image_processor
        pixels = teacher = None
        counts = []
        if image_ref:
            img = self.images.read(str(image_ref), manifest.image_root)
            pixels = ip.preprocess_one(img)
            counts = [ip.num_visual_tokens(img.height, img.width)]
            if self.with_teacher:
                teacher = ip.teacher_pixels([img])[0]
        if not image_ref and any("<image>" in t["value"] for t in turns):
            raise BadSampleError(where, "bad_record", "<image> in the text but no image")
        enc = encode_example(
            self.processor.tokenizer, self.template, turns, self.processor.image_token_id, counts, self.max_length,
            self.processor.split_at_images,
        )
        return Sample(enc["input_ids"], enc["labels"], pixels, teacher, str(record.get("id", i)), enc["truncated_tokens"], [])


def _turns(record: dict, where: str) -> list[dict]:
    """The record's conversations, checked to be a non-empty list of {"from": str, "value": str}."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(where, "bad_record", f"'conversations' must be a non-empty list, not {_kind(turns)}")
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSampleError(where, "bad_record", f"turn {t} is {_kind(turn)}, not an object")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                raise BadSampleError(where, "bad_record", f"turn {t}: '{key}' is {_kind(turn.get(key))}, not a string")
    return turns


JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _kind(value) -> str:
    """A JSON value's kind, as the manifest's author wrote it."""
    return "null (or missing)" if value is None else JSON_KINDS.get(type(value), type(value).__name__)


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
