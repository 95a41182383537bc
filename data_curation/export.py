"""Stage 7, export: training manifests in the format train/ reads, and where every item ended.

- export/train.jsonl: one kept, captioned image a line: {"id": uid, "image": <absolute path, or
  relative to export/ with --relative-paths; "x.tar#member" inside a tar>, "conversations":
  [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}], "source",
  "width", "height"} (train.config.DataSource(path=".../train.jsonl")).
- export/llava.json: the same samples as one LLaVA-style JSON list (written streaming).
- export/decisions.jsonl: every scanned item with its final status, stage and reason.
- with --webdataset: export/webdataset/shard-*.tar holding <uid>.<ext> (the original bytes),
  <uid>.json (the sample) and <uid>.txt (the caption), and train.jsonl pointing into them.
  Finished tars are skipped on a re-run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from data_curation.decisions import PipelineState, iter_items
from data_curation.progress import bar, stage_log
from data_curation.shards import CurationError, StageDir, atomic_path, pause_for_tests, read_jsonl, shard_name
from data_curation.sources import read_item_bytes

log = stage_log("export")
DECISION_FIELDS = ("uid", "source", "key", "ref", "status", "stage", "reason", "detail", "cluster", "sim")


def sample_of(item: dict, image: str) -> dict:
    return {"id": item["uid"], "image": image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": item["caption"]}],
            "source": item["source"], "width": item["width"], "height": item["height"]}


def _image_path(item: dict, manifest_dir: Path, relative: bool) -> str:
    ref = item["ref"]
    if not relative:
        return ref
    path, sep, member = ref.partition("#")
    return os.path.relpath(path, manifest_dir) + sep + member


def _extension(item: dict) -> str:
    suffix = Path(item["ref"].rsplit("#", 1)[-1]).suffix.lower().lstrip(".")
    return suffix or "jpg"


class TarSharder:
    """Re-shards samples into webdataset tars of `per_tar` samples, each written through a
    temporary file and renamed when full (memory: one image); tars that exist are finished and
    are not rewritten."""

    def __init__(self, folder: Path, per_tar: int):
        self.folder, self.per_tar = folder, per_tar
        self.count = 0
        self.current: tuple[tarfile.TarFile, Path, Path] | None = None  # (tar, temporary, final)

    def add(self, item: dict) -> str:
        """Adds the item's image (unless its tar is finished); returns its ref for the manifest."""
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
            for mname, payload in ((member, read_item_bytes(item)), (f"{item['uid']}.json", json.dumps(sample).encode()),
                                   (f"{item['uid']}.txt", item["caption"].encode())):
                info = tarfile.TarInfo(mname)
                info.size = len(payload)
                self.current[0].addfile(info, io.BytesIO(payload))
        return f"{self.folder.name}/{name}#{member}"

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
    sharder = TarSharder(stage.path / "webdataset", per_tar) if webdataset else None
    counts = {"items": 0, "samples": 0}
    with atomic_path(stage.path / "train.jsonl") as train_tmp, atomic_path(stage.path / "decisions.jsonl") as dec_tmp, \
            open(train_tmp, "w") as train, open(dec_tmp, "w") as decisions, \
            bar(sum(state.shard_sizes), "export", "img") as progress:
        for item in iter_items(out, state=state):
            counts["items"] += 1
            decisions.write(json.dumps({k: item[k] for k in DECISION_FIELDS if k in item}, ensure_ascii=False) + "\n")
            if item["status"] == "kept":
                image = sharder.add(item) if sharder else _image_path(item, stage.path, relative_paths)
                train.write(json.dumps(sample_of(item, image), ensure_ascii=False) + "\n")
                counts["samples"] += 1
            progress.update(1)
        if sharder:
            sharder.close()
    if llava_json:
        _write_json_list(stage.path / "llava.json", read_jsonl(stage.path / "train.jsonl"))
    if webdataset:
        counts["tars"] = -(-counts["samples"] // per_tar)
    stage.mark_complete(counts)
    log.info("wrote %d samples to %s%s, and the decision for all %d items to %s", counts["samples"], stage.path / "train.jsonl",
             " (+ llava.json)" if llava_json else "", counts["items"], stage.path / "decisions.jsonl")
    return counts


def _write_json_list(path: Path, rows) -> None:
    """A JSON list written row by row (the LLaVA format is one list; memory stays one row)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("[")
        for i, row in enumerate(rows):
            f.write(("\n" if i == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
        f.write("\n]\n")
