"""Where every scanned item ends: kept, or rejected with a reason by one stage, or pending a stage
that has not finished its shard. One function computes it, shard by shard, so the summary,
captioning and export always agree and memory stays bounded by a shard.

The flow of an item: filter -> (embed -> select, for the sources that are clustered) ->
caption (once that stage has started). What the scan found unusable (a FIFO, a corrupt tar, ...)
is rejected by the filter stage with the scan's reason, so it is counted there. Shard i of every
stage holds the items of scan shard i, and each join below checks that the stages agree on which
items they saw: the counts add up by construction, and a stale or mixed folder is reported
instead of miscounted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_curation.shards import CurationError, StageDir, read_json, read_jsonl

FLOW = ("filter", "embed", "select", "caption")


@dataclass(frozen=True)
class PipelineState:
    """What has started in a curation folder: the scan's shard sizes, which sources the embed
    stage clusters (None: no clustering), whether captioning has started."""

    out: Path
    shard_sizes: tuple[int, ...]
    clustered: frozenset[str] | None
    caption_started: bool

    @classmethod
    def of(cls, out: Path) -> "PipelineState":
        scan = StageDir(out, "scan")
        scan.require_complete("reading decisions")
        embed = StageDir(out, "embed")
        clustered = None
        if embed.started:
            sources = embed.settings()["settings"]["sources"]
            clustered = frozenset(sources) if sources else frozenset({"*"})
        return cls(Path(out), tuple(scan.done_info()["shard_sizes"]), clustered, StageDir(out, "caption").started)

    @property
    def shards(self) -> int:
        return len(self.shard_sizes)

    def is_clustered(self, source: str) -> bool:
        return self.clustered is not None and ("*" in self.clustered or source in self.clustered)


def _pending(item: dict, stage: str) -> None:
    item.update(status="pending", stage=stage, reason=f"awaiting_{stage}")


def _reject(item: dict, stage: str, reason: str, detail: str | None = None) -> None:
    item.update(status="rejected", stage=stage, reason=reason)
    if detail:
        item["detail"] = detail


def shard_items(out: Path, index: int, until: str = "caption", state: PipelineState | None = None) -> list[dict]:
    """The items of shard `index` with their status after the stages up to `until` (see FLOW)."""
    if until not in FLOW:
        raise ValueError(f"until must be one of {FLOW}")
    state = state or PipelineState.of(out)
    path = StageDir(out, "filter").shard(index, ".jsonl")
    if not path.exists():
        items = list(read_jsonl(StageDir(out, "scan").shard(index, ".jsonl")))
        for it in items:
            _pending(it, "filter")
        return items
    items = list(read_jsonl(path))
    if len(items) != state.shard_sizes[index]:
        raise CurationError(f"{path}: {len(items)} items, but scan shard {index} has {state.shard_sizes[index]}")
    for it in items:
        if it["status"] == "rejected":
            it["stage"] = "filter"
    if until == "filter":
        return items
    if state.clustered is not None:
        clustered = [it for it in items if it["status"] == "kept" and state.is_clustered(it["source"])]
        _apply_embed_and_select(out, index, clustered, until)
    if until != "caption" or not state.caption_started:
        return items
    _apply_caption(out, index, [it for it in items if it["status"] == "kept"])
    return items


def _apply_embed_and_select(out: Path, index: int, items: list[dict], until: str) -> None:
    meta_path = StageDir(out, "embed").shard(index, ".json")
    if not meta_path.exists():
        for it in items:
            _pending(it, "embed")
        return
    meta = read_json(meta_path)
    failed = {f["uid"]: f for f in meta["failed"]}
    embedded = [it for it in items if it["uid"] not in failed]
    if [it["uid"] for it in embedded] != meta["uids"] or len(failed) + len(embedded) != len(items):
        raise CurationError(f"{meta_path}: embeds {len(meta['uids'])} and failed {len(failed)} items, but the filter kept "
                            f"{len(items)} of the clustered sources in this shard: outputs from different runs?")
    for it in items:
        if it["uid"] in failed:
            _reject(it, "embed", failed[it["uid"]]["reason"], failed[it["uid"]].get("detail"))
    if until == "embed":
        return
    sel_path = StageDir(out, "select").shard(index, ".jsonl")
    if not sel_path.exists():
        for it in embedded:
            _pending(it, "select")
        return
    rows = list(read_jsonl(sel_path))
    if [r["uid"] for r in rows] != meta["uids"]:
        raise CurationError(f"{sel_path}: its items differ from {meta_path}: outputs from different runs?")
    for it, r in zip(embedded, rows):
        it.update(cluster=r["cluster"], sim=r["sim"])
        if r["status"] != "kept":
            _reject(it, "select", r["reason"])


def _apply_caption(out: Path, index: int, kept: list[dict]) -> None:
    path = StageDir(out, "caption").shard(index, ".jsonl")
    if not path.exists():
        for it in kept:
            _pending(it, "caption")
        return
    rows = list(read_jsonl(path))
    if [r["uid"] for r in rows] != [it["uid"] for it in kept]:
        raise CurationError(f"{path}: captions {len(rows)} items, but {len(kept)} are kept in this shard: "
                            "outputs from different runs?")
    for it, r in zip(kept, rows):
        if r["status"] == "kept":
            it.update(caption=r["caption"], captioner=r["captioner"])
        else:
            _reject(it, "caption", r["reason"], r.get("detail"))


def iter_items(out: Path, until: str = "caption", state: PipelineState | None = None) -> Iterator[dict]:
    """Every scanned item with its status, shard by shard (memory: one shard)."""
    state = state or PipelineState.of(out)
    for index in range(state.shards):
        yield from shard_items(out, index, until, state)
