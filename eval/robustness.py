"""Aspect-ratio robustness: the same items re-rendered at aspect ratios from 1:4 to 4:1 and at
several resolutions, scored against the native run (accuracy, answer consistency, visual
tokens, latency per setting) with a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ASPECTS = [(1, 4), (1, 3), (1, 2), (2, 3), (1, 1), (3, 2), (2, 1), (3, 1), (4, 1)]  # width : height
RESOLUTIONS = [336, 672]  # longest side of the re-rendered image
NEUTRAL_FILL = (124, 116, 104)  # ~ the CLIP mean: what a photo's letterbox usually becomes
FILLS = ("neutral", "edge")


def reframe(image: Image.Image, aspect: tuple[int, int], longest: int, fill: str = "neutral") -> Image.Image:
    """Keep all the content: pad to the target aspect ratio (w:h), then resize so the longest side
    is `longest`. `fill`: "neutral" pads grey; "edge" continues the image's own background (the
    mean colour of its border), so that only the framing changes, not what the picture shows."""
    w, h = image.size
    target = aspect[0] / aspect[1]
    cw, ch = (max(w, round(h * target)), h) if w / h < target else (w, max(h, round(w / target)))
    canvas = Image.new("RGB", (cw, ch), _fill_colour(image, fill))
    canvas.paste(image, ((cw - w) // 2, (ch - h) // 2))
    scale = longest / max(cw, ch)
    return canvas.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)


def _fill_colour(image: Image.Image, fill: str) -> tuple[int, int, int]:
    if fill == "neutral":
        return NEUTRAL_FILL
    if fill != "edge":
        raise ValueError(f"unknown sweep fill {fill!r}; known: {', '.join(FILLS)}")
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(round(v)) for v in border.mean(0))


def run_sweep(model, processor, task, items, out_dir: Path, native: list[dict], batch_size: int, template: str,
              aspects=ASPECTS, resolutions=RESOLUTIONS, fill: str = "neutral", max_new_tokens: int | None = None) -> dict:
    from eval.runner import run_items  # torch: not needed for `eve-eval --help`, which reads FILLS

    native_by_id = {r["question_id"]: r for r in native}
    rows = []
    for res in resolutions:
        for aspect in aspects:
            name = f"ar{aspect[0]}x{aspect[1]}-res{res}" + ("" if fill == "neutral" else f"-{fill}")  # records resume per name
            recs = run_items(model, processor, task, [it for it in items if it.image is not None], out_dir / "sweep" / name,
                             batch_size, template, max_new_tokens, transform=lambda im, a=aspect, r=res: reframe(im, a, r, fill))
            scored = [r for r in recs if r["score"] is not None]
            same = [r["parsed"] == native_by_id[r["question_id"]]["parsed"] for r in scored if r["question_id"] in native_by_id]
            rows.append({
                "setting": name, "aspect": f"{aspect[0]}:{aspect[1]}", "resolution": res, "fill": fill, "n": len(scored),
                "accuracy": sum(r["score"] for r in scored) / len(scored) if scored else 0.0,
                "consistency_with_native": sum(same) / len(same) if same else 0.0,
                "mean_visual_tokens": sum(r["visual_tokens"] for r in scored) / len(scored) if scored else 0.0,
                "mean_latency_s": sum(r["latency_s"] for r in scored) / len(scored) if scored else 0.0,
            })
    result = {"task": task.name, "settings": rows}
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    _chart(rows, out_dir / "sweep.png", task.name)
    return result


def _chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for res in sorted({r["resolution"] for r in rows}):
        sub = [r for r in rows if r["resolution"] == res]
        ax.plot([r["aspect"] for r in sub], [r["accuracy"] for r in sub], marker="o", label=f"accuracy @ {res}px")
        ax.plot([r["aspect"] for r in sub], [r["consistency_with_native"] for r in sub], ls="--", marker=".",
                label=f"consistency @ {res}px")
    ax.set_xlabel("aspect ratio (w:h)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}: aspect-ratio sweep")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
