"""Stage 4, cluster: spherical K-means with FAISS on the embeddings (GPU when FAISS has one).

FAISS trains on at most `max_points_per_centroid` points per centroid (256 by default) and
subsamples the rest: the run reports how many points it actually trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from data_curation.shards import save_npy_atomic, shards, write_json_atomic


def embedding_shards(out: Path) -> list[Path]:
    return shards(out / "embed", ".npy")


def sample_embeddings(out: Path, sample: int | None, seed: int) -> np.ndarray:
    """An evenly spread sample across shards (memory: the sample, not the dataset)."""
    files = embedding_shards(out)
    sizes = [np.load(f, mmap_mode="r").shape[0] for f in files]
    total = sum(sizes)
    if total == 0:
        raise ValueError(f"no embeddings under {out / 'embed'}: run the embed stage first")
    take = total if sample is None else min(sample, total)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, take, replace=False))
    parts, offset = [], 0
    for f, n in zip(files, sizes):
        idx = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
        if len(idx):
            parts.append(np.asarray(np.load(f, mmap_mode="r")[idx], dtype=np.float32))
        offset += n
    return np.ascontiguousarray(np.concatenate(parts))


def cluster_stage(out: Path, k: int, niter: int = 20, seed: int = 0, sample: int | None = None,
                  max_points_per_centroid: int = 256) -> dict:
    import faiss

    dst = out / "cluster"
    if (dst / "cluster.json").exists():
        import json

        return json.loads((dst / "cluster.json").read_text())
    x = sample_embeddings(out, sample, seed)
    if len(x) < k:
        raise ValueError(f"{len(x)} embeddings cannot make {k} clusters")
    gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpu,
                      max_points_per_centroid=max_points_per_centroid, verbose=False)
    start = time.time()
    km.train(x)
    trained = min(len(x), k * max_points_per_centroid)
    info = {"k": k, "niter": niter, "seed": seed, "embeddings_sampled": int(len(x)), "trained_points": int(trained),
            "subsampled": bool(trained < len(x)), "objective": float(km.obj[-1]) if len(km.obj) else None,
            "seconds": time.time() - start, "gpu": gpu, "max_points_per_centroid": max_points_per_centroid}
    print(f"cluster: K={k}, trained on {trained:,} of {len(x):,} sampled embeddings"
          + (" (FAISS subsamples to max_points_per_centroid per centroid)" if info["subsampled"] else ""))
    save_npy_atomic(dst / "centroids.npy", km.centroids.astype(np.float32))
    write_json_atomic(dst / "cluster.json", info)
    return info
