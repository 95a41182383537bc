"""Bootstrap confidence intervals and a paired comparison of two checkpoints."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(scores: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-item scores."""
    x = np.asarray(scores, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_comparison(a: dict[str, float], b: dict[str, float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean difference b - a over the items both scored, with a bootstrap CI and the share of
    resamples in which b is better (a one-sided bootstrap p-value is 1 minus that)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two runs share no scored item")
    d = np.asarray([b[k] - a[k] for k in common], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    return {"items": len(common), "mean_a": float(np.mean([a[k] for k in common])),
            "mean_b": float(np.mean([b[k] for k in common])), "difference": float(d.mean()),
            "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "p_b_better": float((means > 0).mean()), "b_wins": int((d > 0).sum()), "a_wins": int((d < 0).sum())}
