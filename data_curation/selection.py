"""Stage 5, assign + select: each embedding gets its nearest centroid (cosine), then each cluster
keeps its N members nearest the centre (SPEC 3: a partition, so no image is picked twice).

Assignment runs per embedding shard (resumable); selection streams over the assignments keeping
at most N per cluster, so memory is bounded by K x N (the output), not by the dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_curation.clustering import embedding_shards
from data_curation.shards import write_json_atomic


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (= cosine for unit vectors): (cluster ids, similarity)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ids, sims = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for s in range(0, len(x), chunk):
        d, i = index.search(np.ascontiguousarray(x[s : s + chunk], dtype=np.float32), 1)
        ids[s : s + chunk], sims[s : s + chunk] = i[:, 0], d[:, 0]
    return ids, sims


def top_n_per_cluster(cluster: np.ndarray, sim: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n most similar members of every cluster (ties broken by key)."""
    order = np.lexsort((key, -sim, cluster))
    c = cluster[order]
    starts = np.r_[0, np.flatnonzero(c[1:] != c[:-1]) + 1]
    rank = np.arange(len(c)) - np.repeat(starts, np.diff(np.r_[starts, len(c)]))
    return order[rank < n]


def assign_stage(out: Path) -> None:
    centroids = np.load(out / "cluster" / "centroids.npy")
    dst = out / "select" / "assign"
    dst.mkdir(parents=True, exist_ok=True)
    for f in tqdm(embedding_shards(out), desc="assign", unit="shard"):
        target = dst / f"{f.stem}.npz"
        if target.exists():
            continue
        ids, sims = assign(np.load(f, mmap_mode="r"), centroids)
        tmp = dst / f"{f.stem}.tmp{os.getpid()}.npz"
        with open(tmp, "wb") as fh:
            np.savez(fh, cluster=ids, sim=sims)
        os.replace(tmp, target)


def select_stage(out: Path, per_cluster: int = 300) -> dict:
    """Writes select/selected.json (kept uids with cluster and similarity) and cluster sizes."""
    assign_stage(out)
    k = len(np.load(out / "cluster" / "centroids.npy", mmap_mode="r"))
    sizes = np.zeros(k, np.int64)
    best = {"cluster": np.zeros(0, np.int64), "sim": np.zeros(0, np.float32), "uid": np.zeros(0, "U40")}
    total = 0
    for f in embedding_shards(out):
        a = np.load(out / "select" / "assign" / f"{f.stem}.npz")
        uids = np.asarray(json.loads((out / "embed" / f"{f.stem}.json").read_text())["uids"], dtype="U40")
        sizes += np.bincount(a["cluster"], minlength=k)
        total += len(uids)
        merged = {"cluster": np.r_[best["cluster"], a["cluster"]], "sim": np.r_[best["sim"], a["sim"]], "uid": np.r_[best["uid"], uids]}
        keep = top_n_per_cluster(merged["cluster"], merged["sim"], merged["uid"], per_cluster)
        best = {key: v[keep] for key, v in merged.items()}
    small = np.flatnonzero(sizes < per_cluster)
    result = {
        "per_cluster": per_cluster, "embedded": int(total), "selected": int(len(best["uid"])),
        "rejected_cluster_rank": int(total - len(best["uid"])), "clusters": k,
        "clusters_smaller_than_n": int(len(small)), "smallest_clusters": {int(c): int(sizes[c]) for c in small[:20]},
        "selected_items": {str(u): {"cluster": int(c), "sim": float(s)} for u, c, s in zip(best["uid"], best["cluster"], best["sim"])},
    }
    write_json_atomic(out / "select" / "selected.json", result)
    np.save(out / "select" / "cluster_sizes.npy", sizes)
    _histogram(sizes, per_cluster, out / "cluster_sizes.png")
    if len(small):
        print(f"select: {len(small)} of {k} clusters have fewer than {per_cluster} members")
    return result


def _histogram(sizes: np.ndarray, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(sizes, bins=min(50, max(5, len(np.unique(sizes)))))
    ax.axvline(n, color="red", ls="--", label=f"N = {n} kept per cluster")
    ax.set_xlabel("cluster size")
    ax.set_ylabel("clusters")
    ax.set_title(f"{len(sizes)} clusters, {int(sizes.sum())} embeddings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
