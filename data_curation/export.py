"""Stage 7, export: training manifests in the format train/ reads, and where every item ended.

- export/train.jsonl: one kept, captioned image a line: {"id": uid, "image": <absolute path, or
  relative to export/ with --relative-paths; "x.tar#member" inside a tar>, "conversations":
  [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}], "source",
  "width", "height"} (train.config.DataSource(path=".../train.jsonl")).
- export/llava.json: the same samples as one LLaVA-style JSON list (written streaming).
- export/decisions.jsonl: every scanned item with its final status, stage, reason and detail.
- with --webdataset: export/webdataset/shard-*.tar holding <uid>.<ext> (the original bytes),
  <uid>.json (the sample) and <uid>.txt (the caption), and train.jsonl pointing into them
  (relative to export/).
- without it, images that have no file of their own (their bytes live in a parquet, img2dataset's
  --output_format parquet) are copied the same way into export/parquet_images/shard-*.tar, and
  train.jsonl points into those ("shard.tar#<uid>.jpg", absolute unless --relative-paths): train/
  reads paths and tar members, not parquet rows. Every other image stays where it is.
Tars are written through a temporary file and renamed when full; finished ones are skipped on a
re-run (the samples are assigned to tars in the same order every time). Non-UTF-8 file names
are written as JSON escapes (see shards.py) and read back by train/ as the same file.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from data_curation.decisions import PipelineState, iter_items
from data_curation.progress import bar, stage_log
from data_curation.shards import CurationError, StageDir, atomic_path, open_json_text, pause_for_tests, read_jsonl, shard_name
from data_curation.reading import ItemReader
from eve.image_ref import join_ref, split_ref

log = stage_log("export")
DECISION_FIELDS = ("uid", "source", "key", "ref", "status", "stage", "reason", "detail", "cluster", "sim")


def sample_of(item: dict, image: str) -> dict:
    return {"id": item["uid"], "image": image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": item["caption"]}],
            "source": item["source"], "width": item["width"], "height": item["height"]}


def _image_path(ref: str, manifest_dir: Path, relative: bool) -> str:
    if not relative:
        return ref
    path, member = split_ref(ref)
    relative_path = os.path.relpath(path, manifest_dir)
    return relative_path if member is None else join_ref(relative_path, member)


def _extension(item: dict) -> str:
    if "parquet_column" in item:
        return item["parquet_column"]  # named after img2dataset's --encode_format: jpg, png, webp
    path, member = split_ref(item["ref"])
    suffix = Path(member if member is not None else path).suffix.lower().lstrip(".")
    return suffix or "jpg"


class TarSharder:
    """Re-shards samples into webdataset tars of `per_tar` samples, each written through a
    temporary file and renamed when full (memory: one image); tars that exist are finished and
    are not rewritten."""

    def __init__(self, folder: Path, per_tar: int, reader: ItemReader):
        self.folder, self.per_tar, self.reader = folder, per_tar, reader
        self.count = 0
        self.current: tuple[tarfile.TarFile, Path, Path] | None = None  # (tar, temporary, final)

    def add(self, item: dict) -> tuple[Path, str]:
        """Adds the item's image (unless its tar is finished); returns (tar, member)."""
        name = f"{shard_name(self.count // self.per_tar)}.tar"
        if self.count % self.per_tar == 0:
            self.close()
            final = self.folder / name
            if not final.exists():
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f".{name}.{os.getpid()}.tmp")
                self.current = (tarfile.open(tmp, "w"), tmp, final)
        self.count += 1
        member = f"{item['uid']}.{_extension(item)}"
        if self.current is not None:
            sample = sample_of(item, member)
            try:
                data = self.reader.read(item)
            except Exception as e:  # noqa: BLE001 - any failure to read a kept image means the input changed
                raise CurationError(f"export: cannot read {item['ref']} (uid {item['uid']}) any more, which the filter read: "
                                    f"{type(e).__name__}: {e}. The input changed since: restore it, or redo the stages "
                                    "from filter in a new --out") from e
            for mname, payload in ((member, data), (f"{item['uid']}.json", json.dumps(sample).encode()),
                                   (f"{item['uid']}.txt", item["caption"].encode())):
                info = tarfile.TarInfo(mname)
                info.size = len(payload)
                self.current[0].addfile(info, io.BytesIO(payload))
        return self.folder / name, member

    @property
    def tars(self) -> int:
        return -(-self.count // self.per_tar)

    def close(self) -> None:
        if self.current is not None:
            tar, tmp, final = self.current
            tar.close()
            os.replace(tmp, final)
            self.current = None
            pause_for_tests()


def export_stage(out: Path, webdataset: bool = False, per_tar: int = 1000, relative_paths: bool = False,
                 llava_json: bool = True) -> dict:
    caption, stage = StageDir(out, "caption"), StageDir(out, "export")
    caption.require_complete("export (every exported image needs a caption)")
    if per_tar < 1:
        raise CurationError("--per-tar must be >= 1")
    stage.claim({"webdataset": webdataset, "per_tar": per_tar, "relative_paths": relative_paths, "llava_json": llava_json},
                upstream=[caption])
    if stage.complete:
        log.info("already finished")
        return stage.done_info()
    stage.remove_partial()
    state = PipelineState.of(out)
    reader = ItemReader()
    sharder = TarSharder(stage.path / "webdataset", per_tar, reader) if webdataset else None
    held = TarSharder(stage.path.resolve() / "parquet_images", per_tar, reader)  # images without a file of their own
    counts = {"items": 0, "samples": 0}
    with atomic_path(stage.path / "train.jsonl") as train_tmp, atomic_path(stage.path / "decisions.jsonl") as dec_tmp, \
            open_json_text(train_tmp, "w") as train, open_json_text(dec_tmp, "w") as decisions, \
            bar(sum(state.shard_sizes), "export", "img") as progress:
        for item in iter_items(out, state=state):
            counts["items"] += 1
            decisions.write(json.dumps({k: item[k] for k in DECISION_FIELDS if k in item}, ensure_ascii=False) + "\n")
            if item["status"] == "kept":
                if sharder:
                    tar, member = sharder.add(item)
                    image = join_ref(tar.relative_to(stage.path).as_posix(), member)
                elif "parquet_column" in item:
                    image = _image_path(join_ref(*held.add(item)), stage.path, relative_paths)
                else:
                    image = _image_path(item["ref"], stage.path, relative_paths)
                train.write(json.dumps(sample_of(item, image), ensure_ascii=False) + "\n")
                counts["samples"] += 1
            progress.update(1)
        for s in (sharder, held):
            if s is not None:
                s.close()
    if llava_json:
        _write_json_list(stage.path / "llava.json", read_jsonl(stage.path / "train.jsonl"))
    if webdataset:
        counts["tars"] = sharder.tars
    if held.count:
        counts["parquet_image_tars"] = held.tars
    stage.mark_complete(counts)
    log.info("wrote %d samples to %s%s, and the decision for all %d items to %s", counts["samples"], stage.path / "train.jsonl",
             " (+ llava.json)" if llava_json else "", counts["items"], stage.path / "decisions.jsonl")
    return counts


def _write_json_list(path: Path, rows) -> None:
    """A JSON list written row by row (the LLaVA format is one list; memory stays one row)."""
    with atomic_path(path) as tmp, open_json_text(tmp, "w") as f:
        f.write("[")
        for i, row in enumerate(rows):
            f.write(("\n" if i == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
        f.write("\n]\n")
