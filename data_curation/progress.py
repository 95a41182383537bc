"""Progress bars and logs: what every stage read, wrote and skipped, with rates and ETA."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm


def stage_log(stage: str) -> logging.Logger:
    return logging.getLogger(f"eve-curate.{stage}")


def bar(total: int | None, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr; with `total` known it shows the rate and the ETA."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0, smoothing=0.05, file=sys.stderr)


class ShardBar:
    """A bar over shards (whose count is known up front, hence the ETA) that also shows how many
    images went through and their rate, for stages whose per-shard item count is not known."""

    def __init__(self, total_shards: int, desc: str):
        self.bar = bar(total_shards, desc, "shard")
        self.images, self.start = 0, time.perf_counter()

    def advance(self, images: int) -> None:
        self.images += images
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(images=self.images, img_per_s=f"{rate:.1f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ShardBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
