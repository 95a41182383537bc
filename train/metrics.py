"""Training metrics: console progress, metrics.jsonl, TensorBoard, the loss plot, model-MFU."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

# Dense bf16 peak of one device, for model-MFU (SPEC: image tokens count as decoder tokens).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A6000": 155e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class MetricsLog:
    """metrics.jsonl (one line per logged step) and TensorBoard, written by rank 0. On resume the
    file is cut back to the resumed step, so the curve continues without duplicates."""

    def __init__(self, out_dir: Path, resumed_step: int):
        self.path = out_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def plot_losses(metrics_path: Path, out_png: Path, title: str) -> None:
    """The LM and PAL loss curves of a stage as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "lm_loss", "pal_loss"):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points and any(v for _, v in points):
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
