"""Stage 5, select (assign + select): every embedding gets its nearest centroid and cosine
similarity; each cluster keeps its N members nearest the centre (SPEC 3 decision: among its own
members, a partition, so no image is picked twice); the rest are rejected as `cluster_rank`.

Three resumable passes, memory bounded by a shard plus K x N numbers (the size of the answer):
1. assign: per embedding shard, a flat inner-product index over the centroids (FAISS, on the
   GPUs when it has them) -> select/assign/shard-*.npz. `--part I/N` spreads this pass.
2. thresholds: stream the assignments through a bounded per-cluster top-N merge and keep, per
   cluster, the similarity and key of its N-th member -> select/thresholds.npz.
3. decide: per shard, kept iff (sim, -key) >= its cluster's threshold -> select/shard-*.jsonl.
Ties in similarity go to the earlier item in scan order (the key is its global position).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_curation.progress import ShardBar, stage_log
from data_curation.shards import (CurationError, Part, StageDir, pause_for_tests, save_npy_atomic, save_npz_atomic,
                                  write_jsonl_atomic)

log = stage_log("select")


class Assigner:
    """Nearest centroid by inner product (= cosine for unit vectors), in chunks so memory is
    bounded by `chunk` x K similarities whatever the input size."""

    def __init__(self, centroids: np.ndarray, gpu: int | None = None, chunk: int = 65536):
        import faiss

        from data_curation.clustering import faiss_gpus

        self.k, d = centroids.shape
        self.chunk = chunk
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        gpus = faiss_gpus() if gpu is None else gpu
        self.index = faiss.index_cpu_to_all_gpus(index, ngpu=gpus) if gpus > 0 else index
        self.backend = f"faiss IndexFlatIP on {gpus} GPU(s)" if gpus > 0 else "faiss IndexFlatIP on CPU"

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids int32, similarities float32) of the rows of `x` (may be a memory map)."""
        ids, sims = np.empty(len(x), np.int32), np.empty(len(x), np.float32)
        for s in range(0, len(x), self.chunk):
            d, i = self.index.search(np.ascontiguousarray(x[s : s + self.chunk], dtype=np.float32), 1)
            ids[s : s + self.chunk], sims[s : s + self.chunk] = i[:, 0], d[:, 0]
        return ids, sims


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    return Assigner(centroids, chunk=chunk)(x)


class TopNPerCluster:
    """The N most similar members of every cluster over a stream of chunks, in bounded memory.

    Candidates below their cluster's current N-th best are dropped on arrival; the buffer is
    pruned back to N per cluster whenever it exceeds `budget` entries, so memory stays about
    K x N + budget entries (16 bytes each) whatever the stream length. Order: similarity
    descending, then key ascending (keys must be unique, e.g. the global item position).
    """

    def __init__(self, k: int, n: int, budget: int | None = None):
        if n < 1:
            raise CurationError("--per-cluster must be >= 1")
        self.k, self.n = k, n
        self.budget = budget or max(k * n, 1 << 20)
        self.cluster, self.sim, self.key = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        self.floor = np.full(k, -np.inf, np.float32)  # the N-th best similarity so far (-inf: not full yet)
        self.sizes = np.zeros(k, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_size = 0

    def add(self, cluster: np.ndarray, sim: np.ndarray, key: np.ndarray) -> None:
        self.sizes += np.bincount(cluster, minlength=self.k)
        keep = sim >= self.floor[cluster]  # ties survive until a prune orders them by key
        self.pending.append((cluster[keep].astype(np.int32), sim[keep].astype(np.float32), key[keep].astype(np.int64)))
        self.pending_size += int(keep.sum())
        if len(self.cluster) + self.pending_size > self.budget + self.k * self.n:
            self._prune()

    def _prune(self) -> None:
        if not self.pending:
            return
        c = np.concatenate([self.cluster] + [p[0] for p in self.pending])
        s = np.concatenate([self.sim] + [p[1] for p in self.pending])
        key = np.concatenate([self.key] + [p[2] for p in self.pending])
        self.pending, self.pending_size = [], 0
        order = np.lexsort((key, -s, c))
        c, s, key = c[order], s[order], key[order]
        starts = np.searchsorted(c, np.arange(self.k))
        rank = np.arange(len(c)) - starts[c]
        keep = rank < self.n
        self.cluster, self.sim, self.key = c[keep], s[keep], key[keep]
        full = np.flatnonzero(np.bincount(self.cluster, minlength=self.k) == self.n)
        last = np.searchsorted(self.cluster, full, side="right") - 1
        self.floor[full] = self.sim[last]

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster, sim, key) of the kept members, sorted by cluster, similarity, key."""
        self._prune()
        return self.cluster, self.sim, self.key

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per cluster, (sim, key) of its N-th member; (-inf, max) when it has fewer than N, so
        that `is_kept` keeps all its members."""
        c, s, key = self.result()
        thr_sim = np.full(self.k, -np.inf, np.float32)
        thr_key = np.full(self.k, np.iinfo(np.int64).max, np.int64)
        full = np.flatnonzero(np.bincount(c, minlength=self.k) == self.n)
        last = np.searchsorted(c, full, side="right") - 1
        thr_sim[full], thr_key[full] = s[last], key[last]
        return thr_sim, thr_key


def is_kept(cluster: np.ndarray, sim: np.ndarray, key: np.ndarray, thr_sim: np.ndarray, thr_key: np.ndarray) -> np.ndarray:
    t = thr_sim[cluster]
    return (sim > t) | ((sim == t) & (key <= thr_key[cluster]))


def select_stage(out: Path, per_cluster: int = 300, part: Part = Part(), budget: int | None = None,
                 gpu: int | None = None) -> dict:
    cluster, stage = StageDir(out, "cluster"), StageDir(out, "select")
    cluster.require_complete("select")
    stage.claim({"per_cluster": per_cluster}, upstream=[cluster])
    if stage.complete:
        log.info("already finished")
        return stage.done_info()
    stage.remove_partial(part)
    from data_curation.embedding import embedding_shards  # here: the module loads torch

    arrays = embedding_shards(out, "select")
    centroids = np.load(cluster.path / "centroids.npy")
    _assign_pass(stage, arrays, centroids, part, gpu)
    if not part.whole:
        log.info("part %s: assignment done; run `eve-curate select --out %s` (no --part) to finish", part, out)
        return {"assigned_part": str(part)}
    thresholds = _threshold_pass(stage, arrays, len(centroids), per_cluster, budget)
    return _decide_pass(out, stage, arrays, per_cluster, thresholds)


def _assign_path(stage: StageDir, array: Path) -> Path:
    return stage.path / "assign" / f"{array.stem}.npz"


def _assign_pass(stage: StageDir, arrays: list[Path], centroids: np.ndarray, part: Part, gpu: int | None) -> None:
    todo = [a for i, a in enumerate(arrays) if part.owns(i) and not _assign_path(stage, a).exists()]
    log.info("assign: %d shard(s) to do against K=%d centroids", len(todo), len(centroids))
    if not todo:
        return
    assigner = Assigner(centroids, gpu)
    log.info("assign: %s", assigner.backend)
    with ShardBar(len(todo), "assign") as progress:
        for a in todo:
            x = np.load(a, mmap_mode="r")
            ids, sims = assigner(x)
            save_npz_atomic(_assign_path(stage, a), cluster=ids, sim=sims)
            progress.advance(len(x))
            pause_for_tests()


def _threshold_pass(stage: StageDir, arrays: list[Path], k: int, per_cluster: int, budget: int | None) -> dict:
    path = stage.path / "thresholds.npz"
    if not path.exists():
        missing = [a.name for a in arrays if not _assign_path(stage, a).exists()]
        if missing:
            raise CurationError(f"select: {len(missing)} shard(s) not assigned yet (e.g. {missing[0]}): run the other parts first")
        top = TopNPerCluster(k, per_cluster, budget)
        offset = 0
        for a in arrays:
            with np.load(_assign_path(stage, a)) as z:
                c, s = z["cluster"], z["sim"]
            top.add(c, s, np.arange(offset, offset + len(c), dtype=np.int64))
            offset += len(c)
        thr_sim, thr_key = top.thresholds()
        save_npz_atomic(path, thr_sim=thr_sim, thr_key=thr_key, sizes=top.sizes)
    with np.load(path) as z:
        return {name: z[name] for name in z.files}


def _decide_pass(out: Path, stage: StageDir, arrays: list[Path], per_cluster: int, thresholds: dict) -> dict:
    offset, selected, rejected = 0, 0, 0
    with ShardBar(len(arrays), "select") as progress:
        for i, a in enumerate(arrays):
            with np.load(_assign_path(stage, a)) as z:
                c, s = z["cluster"], z["sim"]
            kept = is_kept(c, s, np.arange(offset, offset + len(c)), thresholds["thr_sim"], thresholds["thr_key"])
            offset += len(c)
            selected, rejected = selected + int(kept.sum()), rejected + int((~kept).sum())
            target = stage.shard(i, ".jsonl")
            if not target.exists():
                from data_curation.embedding import shard_uids

                uids = shard_uids(a)
                write_jsonl_atomic(target, ({"uid": u, "cluster": int(ci), "sim": round(float(si), 6),
                                             **({"status": "kept"} if ki else {"status": "rejected", "reason": "cluster_rank"})}
                                            for u, ci, si, ki in zip(uids, c, s, kept)))
                pause_for_tests()
            progress.advance(len(c))
    sizes = thresholds["sizes"]
    small = np.flatnonzero(sizes < per_cluster)
    expected = int(np.minimum(sizes, per_cluster).sum())
    if selected != expected or selected + rejected != int(sizes.sum()):
        raise CurationError(f"select: kept {selected} of {selected + rejected}, expected {expected} "
                            f"(the sum of min(size, N)) of {int(sizes.sum())}")
    info = {"per_cluster": per_cluster, "clusters": int(len(sizes)), "embedded": int(sizes.sum()), "selected": selected,
            "rejected_cluster_rank": rejected, "clusters_smaller_than_n": int(len(small)),
            "empty_clusters": int((sizes == 0).sum()),
            "smallest_clusters": {int(c): int(sizes[c]) for c in small[np.argsort(sizes[small], kind="stable")][:50]},
            "cluster_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
            "histogram": "cluster_sizes.png"}
    save_npy_atomic(stage.path / "cluster_sizes.npy", sizes)
    plot_cluster_sizes(sizes, per_cluster, out / "cluster_sizes.png")
    if len(small):
        log.warning("%d of %d clusters have fewer than %d members (all their members are kept)", len(small), len(sizes), per_cluster)
    log.info("kept %d, rejected %d as cluster_rank; cluster sizes min %d / median %.0f / max %d (histogram: %s)", selected,
             rejected, sizes.min(), np.median(sizes), sizes.max(), out / "cluster_sizes.png")
    stage.mark_complete(info)
    return info


def plot_cluster_sizes(sizes: np.ndarray, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_curation.shards import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(sizes, bins=min(60, max(5, len(np.unique(sizes)))), color="tab:blue")
    ax.axvline(n, color="tab:red", ls="--", label=f"N = {n} kept per cluster")
    ax.set_xlabel("cluster size (members)")
    ax.set_ylabel("clusters")
    ax.set_title(f"{len(sizes):,} clusters, {int(sizes.sum()):,} embeddings, {int((sizes < n).sum()):,} smaller than N")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
