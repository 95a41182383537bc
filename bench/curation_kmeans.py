"""Cluster + assign + select on synthetic embeddings: eve-curate's FAISS path (the functions the
CLI runs: data_curation.clustering.train_kmeans, selection.Assigner, selection.TopNPerCluster)
side by side with scikit-learn's KMeans (init="random", n_init=1, tol=0: the same iterations)
and MiniBatchKMeans (the same number of epochs), and the assignment's GEMM rate against a plain
numpy matmul of the same shapes measured in the same run.

Embeddings: a mixture of unit-norm clusters (N x d, float32). Quality is the same number for
every method: the mean cosine of each point to its nearest (normalised) centroid, computed by one
function. The assignment (N x d against K x d, top-1) does 2 N K d flops.

    .venv/bin/python bench/curation_kmeans.py                         # 200k x 768, K=1000 (minutes on 2 cores)
    .venv/bin/python bench/curation_kmeans.py --n 1000000 --k 5000 --skip-sklearn

Last line: `curation_kmeans: faiss_vs_sklearn=<speed ratio> assign_gemm_efficiency=<0..1>`.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from data_curation.clustering import train_kmeans
from data_curation.selection import Assigner, TopNPerCluster

# The paper's scale (SPEC 3) and the GPU assumption for the projection.
PAPER_N, PAPER_K, PAPER_N_PER_CLUSTER, PAPER_NITER = 15_000_000, 50_000, 300, 20
EVA02_L_14_DIM = 768  # open_clip EVA02-L-14 image embedding width
H100_GEMM = 50e12  # assumed sustained fp32/TF32 GEMM FLOP/s on one H100 (well under its TF32 tensor-core peak)
CLI_SHARD = 5000  # eve-curate scan --shard-size default


def synthetic(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centres, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in blocks: peak memory is the output
        e = min(n, s + 100_000)
        x[s:e] = mu[rng.integers(0, centres, e - s)] + 0.8 * rng.standard_normal((e - s, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def quality(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean cosine of every point to its nearest centroid (centroids normalised first)."""
    c = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    _, sims = Assigner(c.astype(np.float32))(x)
    return float(sims.mean(dtype=np.float64))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="embeddings (up to 1,000,000)")
    ap.add_argument("--d", type=int, default=EVA02_L_14_DIM)
    ap.add_argument("--k", type=int, default=1000, help="clusters (up to 5000)")
    ap.add_argument("--niter", type=int, default=10, help="K-means iterations, the same for every method")
    ap.add_argument("--per-cluster", type=int, default=300)
    ap.add_argument("--skip-sklearn", action="store_true", help="skip sklearn KMeans (hours at 1M x 5000 on 2 cores)")
    ap.add_argument("--skip-minibatch", action="store_true")
    args = ap.parse_args()
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n, d, k, niter = args.n, args.d, args.k, args.niter
    print(f"curation_kmeans: N={n:,} d={d} K={k} iterations={niter}, {os.cpu_count()} CPU(s)")
    x, t_gen = timed(lambda: synthetic(n, d, max(k // 2, 2), seed=0))
    print(f"synthetic embeddings: {t_gen:.1f} s, {x.nbytes / 2**30:.2f} GiB")

    rows = []
    (centroids, info), t_faiss = timed(lambda: train_kmeans(x, k, niter, seed=0, max_points_per_centroid=256))
    rows.append(("faiss spherical k-means (eve-curate)", t_faiss, quality(x, centroids), f"trained on {info['trained_points']:,} points"))
    t_sk = None
    if not args.skip_sklearn:
        sk, t_sk = timed(lambda: KMeans(k, init="random", n_init=1, max_iter=niter, tol=0, random_state=0).fit(x))
        rows.append(("sklearn KMeans (random init)", t_sk, quality(x, sk.cluster_centers_), f"{sk.n_iter_} iterations"))
        del sk
    t_mb = None
    if not args.skip_minibatch:
        mb, t_mb = timed(lambda: MiniBatchKMeans(k, init="random", n_init=1, max_iter=niter, batch_size=4096,
                                                 max_no_improvement=None, random_state=0).fit(x))
        rows.append(("sklearn MiniBatchKMeans (4096)", t_mb, quality(x, mb.cluster_centers_), f"{mb.n_steps_} steps"))
        del mb

    # assign: the CLI's chunked flat inner-product index; the same shapes through numpy's matmul
    assigner = Assigner(centroids)
    (ids, sims), t_assign = timed(lambda: assigner(x))
    ct = np.ascontiguousarray(centroids.T)

    def matmul() -> None:
        for s in range(0, n, assigner.chunk):
            x[s : s + assigner.chunk] @ ct

    matmul()  # warm-up (page faults of the output buffers)
    _, t_matmul = timed(matmul)
    flops = 2.0 * n * k * d
    r_assign, r_matmul = flops / t_assign, flops / t_matmul
    eff = r_assign / r_matmul

    top = TopNPerCluster(k, args.per_cluster)

    def select() -> None:
        for s in range(0, n, CLI_SHARD):  # shard by shard, as the CLI streams them
            top.add(ids[s : s + CLI_SHARD], sims[s : s + CLI_SHARD], np.arange(s, min(n, s + CLI_SHARD)))
        top.result()

    _, t_select = timed(select)
    kept = len(top.result()[0])

    print(f"\n{'method':<40}{'seconds':>9}{'quality (mean cos)':>20}   notes")
    for name, t, q, note in rows:
        print(f"{name:<40}{t:>9.2f}{q:>20.4f}   {note}")
    print(f"\nassign (faiss IndexFlatIP, top-1, chunks of {assigner.chunk}): {t_assign:.2f} s = {r_assign / 1e9:.1f} GFLOP/s")
    print(f"numpy matmul, same shapes and chunks:        {t_matmul:.2f} s = {r_matmul / 1e9:.1f} GFLOP/s")
    print(f"assignment GEMM efficiency: {eff:.2f} of the matmul rate (target >= 0.5)")
    print(f"select top-{args.per_cluster} per cluster (bounded merge, {CLI_SHARD}-item shards): {t_select:.2f} s, "
          f"{n / t_select / 1e6:.1f} M items/s, kept {kept:,}")
    train_flops = 2.0 * info["trained_points"] * k * d * niter
    train_eff = train_flops / t_faiss / r_matmul
    print(f"faiss k-means: {train_flops / t_faiss / 1e9:.1f} GFLOP/s over {niter} iterations = {train_eff:.2f} of the matmul rate")
    print(f"peak memory (ru_maxrss): {peak_gib():.2f} GiB")

    # The paper's scale on one H100, from the measured efficiencies (assumptions stated).
    n_train = min(PAPER_N, 256 * PAPER_K)
    t_train = 2.0 * n_train * PAPER_K * EVA02_L_14_DIM * PAPER_NITER / (H100_GEMM * min(train_eff, 1.0))
    t_assign_h100 = 2.0 * PAPER_N * PAPER_K * EVA02_L_14_DIM / (H100_GEMM * min(eff, 1.0))
    shards = -(-PAPER_N // CLI_SHARD)
    t_select_paper = PAPER_N / (n / t_select)
    print(f"\npaper scale: {PAPER_N / 1e6:.0f}M x d={EVA02_L_14_DIM} (EVA02-L-14) into K={PAPER_K:,}, {PAPER_NITER} iterations, "
          f"N={PAPER_N_PER_CLUSTER} per cluster, on one H100")
    print(f"  assumptions: GEMM-bound at {H100_GEMM / 1e12:.0f} TFLOP/s fp32/TF32, times the efficiencies measured here "
          f"(k-means {min(train_eff, 1):.2f}, assign {min(eff, 1):.2f}); FAISS trains on 256 x K = {n_train / 1e6:.1f}M points")
    print(f"  k-means training:  {duration(t_train)}   (one `eve-curate cluster` job; FAISS uses every GPU of the node)")
    print(f"  assignment of all: {duration(t_assign_h100)}   ({shards:,} shards of {CLI_SHARD:,}, {duration(t_assign_h100 / shards)} "
          "each; `eve-curate select --part I/N` spreads them over GPUs or nodes)")
    print(f"  top-{PAPER_N_PER_CLUSTER} selection: {duration(t_select_paper)} on one CPU core at the rate measured here "
          f"(memory ~{PAPER_K * PAPER_N_PER_CLUSTER * 16 * 2 / 2**30:.1f} GiB: about 2 K x N candidates)")
    gb = PAPER_N * EVA02_L_14_DIM * 4 / 1e9
    print(f"  I/O: the embeddings are {gb:.0f} GB as float32 ({gb / 2:.0f} GB with embed --store-dtype float16); one pass "
          f"at an assumed 3 GB/s from disk takes {duration(gb / 3)}, {'more' if gb / 3 > t_assign_h100 else 'less'} than the "
          "assignment's GEMMs. The embed stage (EVA02-L-14 over 15M images, not measured here) dominates the curation.")
    reference = t_sk if t_sk is not None else t_mb
    label = "sklearn KMeans" if t_sk is not None else "sklearn MiniBatchKMeans (KMeans skipped)"
    print(f"faiss vs {label}: {reference / t_faiss:.2f}x faster")
    print(f"curation_kmeans: faiss_vs_sklearn={reference / t_faiss:.2f} assign_gemm_efficiency={min(eff, 1.0):.2f}")


if __name__ == "__main__":
    main()
