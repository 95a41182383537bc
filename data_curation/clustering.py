"""Stage 4, cluster: spherical K-means with FAISS on the embeddings (on the GPUs when FAISS has
them), saving cluster/centroids.npy and the settings and objective in cluster/done.json.

FAISS trains on at most `max_points_per_centroid` points per centroid (256 by default) and
subsamples the rest; this stage samples that many itself (`--sample`, evenly over the shards,
read through memory maps), so memory is the sample, not the dataset, and the run states
exactly how many points it trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from data_curation.progress import stage_log
from data_curation.shards import CurationError, StageDir, save_npy_atomic

log = stage_log("cluster")


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def sample_embeddings(paths: list[Path], sample: int, seed: int) -> tuple[np.ndarray, int]:
    """(a uniform sample without replacement as float32, the number of embeddings in all)."""
    sizes = [np.load(p, mmap_mode="r").shape[0] for p in paths]
    total = int(sum(sizes))
    if total == 0:
        raise CurationError(f"no embeddings in {paths[0].parent if paths else 'the embed stage'}: nothing to cluster")
    take = min(sample, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, take, replace=False))
    parts, offset = [], 0
    for p, n in zip(paths, sizes):
        lo, hi = np.searchsorted(chosen, [offset, offset + n])
        if hi > lo:
            parts.append(np.asarray(np.load(p, mmap_mode="r")[chosen[lo:hi] - offset], dtype=np.float32))
        offset += n
    return np.ascontiguousarray(np.concatenate(parts)), total


def train_kmeans(x: np.ndarray, k: int, niter: int, seed: int, max_points_per_centroid: int = 256,
                 gpu: int | None = None) -> tuple[np.ndarray, dict]:
    """Spherical K-means (unit-norm centroids, inner-product assignment). Returns the centroids
    and what the run did: points trained on, objective (sum of cosines) per iteration."""
    import faiss

    n, d = x.shape
    if n < k:
        raise CurationError(f"{n} embeddings cannot make {k} clusters: lower --k")
    gpus = faiss_gpus() if gpu is None else gpu
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=gpus if gpus > 0 else False,
                      max_points_per_centroid=max_points_per_centroid, verbose=False)
    start = time.perf_counter()
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    seconds = time.perf_counter() - start
    trained = min(n, k * max_points_per_centroid)
    objective = [float(v) for v in km.obj]
    info = {"k": k, "dim": d, "niter": niter, "seed": seed, "max_points_per_centroid": max_points_per_centroid,
            "points_given": n, "trained_points": trained, "faiss_subsampled": trained < n,
            "objective": objective[-1] if objective else None,
            "mean_cosine_train": objective[-1] / trained if objective else None,
            "objective_per_iteration": objective, "seconds": round(seconds, 3), "gpus": gpus}
    if n < 39 * k:
        log.warning("only %.1f points per centroid (FAISS suggests >= 39): clusters will be noisy", n / k)
    return km.centroids.astype(np.float32), info


def cluster_stage(out: Path, k: int = 50000, niter: int = 20, seed: int = 0, sample: int | None = None,
                  max_points_per_centroid: int = 256, gpu: int | None = None) -> dict:
    embed, stage = StageDir(out, "embed"), StageDir(out, "cluster")
    embed.require_complete("cluster")
    if k < 1 or niter < 1 or max_points_per_centroid < 1:
        raise CurationError("cluster: --k, --niter and --max-points-per-centroid must be >= 1")
    sample = sample or k * max_points_per_centroid
    stage.claim({"k": k, "niter": niter, "seed": seed, "sample": sample, "max_points_per_centroid": max_points_per_centroid},
                upstream=[embed])
    if stage.complete:
        log.info("already finished")
        return stage.done_info()
    stage.remove_partial()
    from data_curation.embedding import embedding_shards  # here: the module loads torch and open_clip's helpers

    x, total = sample_embeddings(embedding_shards(out, "cluster"), sample, seed)
    log.info("K=%d, %d iterations: sampled %d of %d embeddings (%s)", k, niter, len(x), total,
             "all of them" if len(x) == total else f"--sample {sample}")
    centroids, info = train_kmeans(x, k, niter, seed, max_points_per_centroid, gpu)
    info = {**info, "embeddings": total, "sampled": len(x)}
    how = "FAISS subsampled to max_points_per_centroid per centroid" if info["faiss_subsampled"] else "no subsampling"
    log.info("trained on %d points (%s); objective %.4g, mean cosine %.4f, %.1f s",
             info["trained_points"], how, info["objective"], info["mean_cosine_train"], info["seconds"])
    save_npy_atomic(stage.path / "centroids.npy", centroids)
    stage.mark_complete(info)
    return info
