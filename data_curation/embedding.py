"""Stage 3, embed: L2-normalised open_clip image embeddings of the kept images of the clustered
sources (SPEC 3: LAION), one `.npy` per shard with its uid index in `.json`.

The model is any open_clip name with a pretrained tag or a checkpoint file (default
EVA02-L-14, 768-d), or a local directory in open_clip's layout (open_clip_config.json +
weights), loaded like eve.teacher.ClipTeacher and preprocessed with open_clip's own transform
for that model. Only the image tower is kept. fp16 on GPU, fp32 on CPU; images are decoded in
DataLoader workers. `--part I/N` spreads the shards over several processes (one per GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_curation.decisions import PipelineState, shard_items
from data_curation.failures import failure_of
from data_curation.progress import ShardBar, stage_log
from data_curation.shards import (CurationError, Part, StageDir, pause_for_tests, read_json, save_npy_atomic,
                                  write_json_atomic)
from data_curation.reading import ItemReader
from eve.image_io import load_image

log = stage_log("embed")
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


class _Images(torch.utils.data.Dataset):
    """Decodes and preprocesses one item; a failure is returned, not raised, so it is recorded."""

    def __init__(self, items: list[dict], preprocess):
        self.items, self.preprocess = items, preprocess
        self.reader = ItemReader()  # each DataLoader worker reads through its own copy

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.reader.read(self.items[i]))), None
        except Exception as e:  # noqa: BLE001 - a bad item never ends the run
            return i, None, failure_of(e)


class Embedder:
    """An open_clip image tower with its preprocessing, on the best device available."""

    def __init__(self, model: str, pretrained: str | None = None, device: str | None = None):
        import open_clip

        if Path(model).is_file():
            raise CurationError(f"--model {model} is a file: give the open_clip model name as --model and the checkpoint "
                                f"as --pretrained (e.g. --model EVA02-L-14 --pretrained {model})")
        if Path(model).is_dir():
            clip, _, self.preprocess = open_clip.create_model_and_transforms(f"local-dir:{model}", weights_only=True)
        else:
            clip, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, weights_only=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.visual = clip.visual.to(self.device, self.dtype).eval()  # the text tower is not needed
        del clip
        probe = self.preprocess(Image.new("RGB", (64, 64)))  # the output width, for empty shards too
        self.dim = int(self._forward(probe[None]).shape[1])
        log.info("model %s (pretrained %s) on %s in %s: %d-d embeddings", model, pretrained, self.device, self.dtype, self.dim)

    @torch.no_grad()
    def _forward(self, pixels: torch.Tensor) -> np.ndarray:
        feats = self.visual(pixels.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def embed(self, items: list[dict], batch_size: int, workers: int) -> tuple[np.ndarray, list[str], list[dict]]:
        """(embeddings [n, dim], their uids, failures {"uid", "reason", "detail"}) in item order."""
        loader = torch.utils.data.DataLoader(_Images(items, self.preprocess), batch_size=batch_size, num_workers=workers,
                                             collate_fn=list)
        vectors, uids, failed = [], [], []
        for batch in loader:
            good = [(i, t) for i, t, _ in batch if t is not None]
            failed += [{"uid": items[i]["uid"], "reason": err[0], "detail": err[1]} for i, t, err in batch if t is None]
            if good:
                v = self._forward(torch.stack([t for _, t in good]))
                ok = np.isfinite(v).all(axis=1) & (np.linalg.norm(v, axis=1) > 0.5)  # fp16 overflow, all-zero features
                failed += [{"uid": items[i]["uid"], "reason": "bad_embedding", "detail": "non-finite or zero features"}
                           for (i, _), good_row in zip(good, ok) if not good_row]
                vectors.append(v[ok])
                uids += [items[i]["uid"] for (i, _), good_row in zip(good, ok) if good_row]
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return out, uids, failed


def embed_stage(out: Path, model: str = "EVA02-L-14", pretrained: str | None = None, sources: list[str] | None = None,
                batch_size: int = 64, workers: int = 0, store_dtype: str = "float32", part: Part = Part(),
                device: str | None = None) -> dict:
    """embed/shard-*.npy + .json for every filter shard (empty ones for shards without items of
    the clustered sources); finished shards are skipped."""
    filt, stage = StageDir(out, "filter"), StageDir(out, "embed")
    filt.require_complete("embed")
    if store_dtype not in STORE_DTYPES:
        raise CurationError(f"--store-dtype must be one of {sorted(STORE_DTYPES)}")
    known = StageDir(out, "scan").done_info()["by_source"]
    unknown = sorted(set(sources or []) - set(known))
    if unknown:
        raise CurationError(f"embed --sources {unknown}: no such source in the scan (sources: {sorted(known)})")
    stage.claim({"model": model, "pretrained": pretrained, "sources": sorted(sources) if sources else None,
                 "store_dtype": store_dtype}, upstream=[filt])
    if stage.complete:
        log.info("already finished")
        return stage.done_info()
    stage.remove_partial(part)
    state = PipelineState.of(out)
    mine = [i for i in range(state.shards) if part.owns(i)]
    todo = [i for i in mine if not stage.shard(i, ".json").exists()]
    log.info("part %s: %d shard(s), %d already done; embedding sources %s", part, len(mine), len(mine) - len(todo), sources or "all")
    embedder = Embedder(model, pretrained, device) if todo else None
    with ShardBar(len(todo), "embed") as progress:
        for index in todo:
            items = [it for it in shard_items(out, index, "filter", state)
                     if it["status"] == "kept" and state.is_clustered(it["source"])]
            vectors, uids, failed = embedder.embed(items, batch_size, workers)
            save_npy_atomic(stage.shard(index, ".npy"), vectors.astype(STORE_DTYPES[store_dtype]))
            # the .json is written last: it is the shard's completion mark
            write_json_atomic(stage.shard(index, ".json"), {"uids": uids, "failed": failed, "dim": embedder.dim})
            progress.advance(len(items))
            pause_for_tests()
    return _finish(stage, state.shards)


def _finish(stage: StageDir, shards: int) -> dict:
    """Mark the stage complete once every shard is there (whichever part finishes last)."""
    missing = [i for i in range(shards) if not stage.shard(i, ".json").exists()]
    if missing:
        log.info("%d shard(s) still to do by other parts (first: %d)", len(missing), missing[0])
        return {"missing_shards": len(missing)}
    embedded = failed = 0
    dims = set()
    for i in range(shards):
        meta = read_json(stage.shard(i, ".json"))
        embedded, failed = embedded + len(meta["uids"]), failed + len(meta["failed"])
        dims.add(meta["dim"])
    if len(dims) > 1:
        raise CurationError(f"{stage.path}: shards of different dimensions {sorted(dims)}")
    info = {"embedded": embedded, "failed": failed, "dim": dims.pop() if dims else None}
    stage.mark_complete(info)
    log.info("embedded %d images (%d failed to decode), dim %s", embedded, failed, info["dim"])
    return info


def embedding_shards(out: Path, needed_by: str) -> list[Path]:
    """The embedding arrays, one per shard in order (their uids: the .json beside each); the
    stage must be finished."""
    stage = StageDir(out, "embed")
    stage.require_complete(needed_by)
    return [stage.shard(i, ".npy") for i in range(PipelineState.of(out).shards)]


def shard_uids(array_path: Path) -> list[str]:
    return read_json(array_path.with_suffix(".json"))["uids"]
