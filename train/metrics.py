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


def _host_peak_bytes() -> int:
    """This process's peak resident memory since start or the last reset (Linux VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset: a bound, not a phase figure


class PhaseMemory:
    """Peak memory of this rank per phase of a run (start-up, train, export): host RSS, and device
    memory on CUDA. Start-up and export are where ZeRO-3 runs used to run out of memory, and
    where the gains of partitioned construction and streamed export show. The host peak is reset
    between phases through /proc/self/clear_refs (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict] = {}

    def end(self, phase: str) -> None:
        record = {"host_peak_gb": _host_peak_bytes() / 2**30}
        if self.device.type == "cuda":
            record["device_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self.phases[phase] = record
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS
        except OSError:
            pass

    def write(self, path: Path, is_main: bool) -> None:
        """memory.json: {phase: [per-rank records]}; every rank must call it."""
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, self.phases)
        if is_main:
            path.write_text(json.dumps({phase: [r[phase] for r in ranks] for phase in self.phases}, indent=2) + "\n")


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
