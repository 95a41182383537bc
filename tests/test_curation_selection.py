"""The selection arithmetic against brute force: nearest-centroid assignment, the bounded top-N
merge over chunks (with ties and tiny buffers), and the per-cluster thresholds the stage applies
shard by shard."""

from __future__ import annotations

import numpy as np
import pytest

from data_curation.selection import Assigner, TopNPerCluster, is_kept


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_kept(cluster: np.ndarray, sim: np.ndarray, n: int) -> set[int]:
    """Per cluster, the n members with the highest similarity, ties to the lower index."""
    kept = set()
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        ranked = sorted(members.tolist(), key=lambda i: (-float(sim[i]), i))
        kept |= set(ranked[:n])
    return kept


def test_assigner_is_the_argmax_of_the_inner_products():
    rng = np.random.default_rng(0)
    x, c = unit(rng, 700, 24), unit(rng, 9, 24)
    ids, sims = Assigner(c, chunk=64)(x)
    ref = x.astype(np.float64) @ c.T.astype(np.float64)
    assert np.array_equal(ids, ref.argmax(1)) and np.allclose(sims, ref.max(1), atol=1e-5)


@pytest.mark.parametrize("budget", [1, 7, 10_000])
@pytest.mark.parametrize("chunk", [1, 13, 1000])
def test_top_n_merge_over_chunks_equals_brute_force(budget, chunk):
    rng = np.random.default_rng(budget + chunk)
    n_items, k, n = 600, 7, 25
    cluster = rng.integers(0, k, n_items).astype(np.int32)
    cluster[cluster == 6] = 5  # cluster 6 empty, cluster 5 large
    sim = np.round(rng.random(n_items), 2).astype(np.float32)  # many exact ties
    top = TopNPerCluster(k, n, budget)
    for s in range(0, n_items, chunk):
        top.add(cluster[s : s + chunk], sim[s : s + chunk], np.arange(s, min(n_items, s + chunk)))
    c, s, key = top.result()
    expected = brute_force_kept(cluster, sim, n)
    assert set(key.tolist()) == expected and len(key) == len(expected)
    assert top.sizes.tolist() == np.bincount(cluster, minlength=k).tolist()
    # the thresholds reproduce the same set item by item (what the stage does per shard)
    thr_sim, thr_key = top.thresholds()
    kept = is_kept(cluster, sim, np.arange(n_items), thr_sim, thr_key)
    assert set(np.flatnonzero(kept).tolist()) == expected
    # a partition: every cluster keeps min(size, n), no item twice
    assert np.bincount(c, minlength=k).tolist() == np.minimum(np.bincount(cluster, minlength=k), n).tolist()


def test_memory_stays_bounded_by_k_times_n_plus_budget():
    rng = np.random.default_rng(3)
    k, n, budget = 5, 10, 100
    top = TopNPerCluster(k, n, budget)
    for s in range(0, 20_000, 500):
        top.add(rng.integers(0, k, 500).astype(np.int32), rng.random(500).astype(np.float32), np.arange(s, s + 500))
        assert len(top.cluster) + top.pending_size <= k * n + budget + 500
    assert len(top.result()[0]) == k * n
