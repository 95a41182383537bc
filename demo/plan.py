"""How big each step of the demo is: the full run (~15 min on 2 CPU cores) and `--quick` (~6 min)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoPlan:
    # the world
    pool_images: int  # curation input (training aspect ratios), before filtering and selection
    bad_images: int  # too small or undecodable files mixed into the pool, for the filter to reject
    sft_images: int  # stage 3 conversations, three questions each
    eval_images: int  # per split (held-out seen aspect ratios; unseen 1:4 and 4:1), three questions each
    # the stand-ins
    decoder_steps: int  # text-only pre-training of the tiny Llama
    teacher_steps: int  # contrastive training of the tiny open_clip tower
    # curation: K-means clusters and images kept per cluster
    clusters: int
    per_cluster: int
    # EVE's three stages (optimizer steps at global batch `batch_size`)
    stage_steps: tuple[int, int, int]
    batch_size: int = 16
    image_long_side: int = 128  # stored images
    model_image_size: int = 64  # longest side the model sees (the demo flavor's 64, or more); the teacher sees half

    @property
    def flavor_overrides(self) -> dict:
        return {"image_size": self.model_image_size, "teacher_image_size": self.model_image_size // 2}

    def with_steps(self, steps: int | None) -> "DemoPlan":
        """`--steps N`: N optimizer steps for each of the three stages."""
        return self if steps is None else dataclasses.replace(self, stage_steps=(steps, steps, steps))


FULL = DemoPlan(pool_images=4000, bad_images=40, sft_images=4000, eval_images=100, decoder_steps=200, teacher_steps=600,
                clusters=32, per_cluster=100, stage_steps=(150, 500, 900), model_image_size=96)
QUICK = DemoPlan(pool_images=800, bad_images=8, sft_images=800, eval_images=24, decoder_steps=150, teacher_steps=300,
                 clusters=8, per_cluster=80, stage_steps=(30, 60, 300))
