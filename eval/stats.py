"""Bootstrap confidence intervals and a paired comparison of two checkpoints (scipy's bootstrap)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _bootstrap(x: np.ndarray, n_boot: int, alpha: float, seed: int):
    from scipy.stats import bootstrap

    # percentile intervals: BCa is undefined for the constant samples small benchmarks give
    return bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha, method="percentile",
                     rng=np.random.default_rng(seed), vectorized=True)


def bootstrap_ci(scores: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-item scores."""
    x = np.asarray(scores, dtype=np.float64)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    ci = _bootstrap(x, n_boot, alpha, seed).confidence_interval
    return float(ci.low), float(ci.high)


def paired_comparison(a: dict[str, float], b: dict[str, float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean difference b - a over the items both scored, with a bootstrap CI and the share of
    resamples in which b is better (a one-sided bootstrap p-value is 1 minus that)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two runs share no scored item")
    d = np.asarray([b[k] - a[k] for k in common], dtype=np.float64)
    if len(d) > 1:
        res = _bootstrap(d, n_boot, 0.05, seed)
        ci, p_better = [float(res.confidence_interval.low), float(res.confidence_interval.high)], float((res.bootstrap_distribution > 0).mean())
    else:
        ci, p_better = [float(d[0])] * 2, float(d[0] > 0)
    return {"items": len(common), "mean_a": float(np.mean([a[k] for k in common])),
            "mean_b": float(np.mean([b[k] for k in common])), "difference": float(d.mean()),
            "ci95": ci, "p_b_better": p_better, "b_wins": int((d > 0).sum()), "a_wins": int((d < 0).sum())}
