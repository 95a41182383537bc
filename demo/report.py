"""The demo's report: DIR/report.md with its PNGs (the world, the loss curves of every training
step, accuracy by aspect ratio and question type, the aspect-ratio sweep)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.datasets import QUESTION_TYPES
from demo.world import TRAIN_ASPECTS, UNSEEN_ASPECTS, aspect_name, chance_level, render, sample_scene


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def world_mosaic(seed: int, long_side: int, path: Path) -> None:
    """One scene per aspect ratio, the unseen ones last, with their caption underneath."""
    rng = np.random.default_rng([seed, 99])
    tiles = []
    for aspect in TRAIN_ASPECTS + UNSEEN_ASPECTS:
        scene = sample_scene(rng, [aspect], seed=int(rng.integers(2**31)))
        name = aspect_name(aspect) + ("\nunseen" if aspect in UNSEEN_ASPECTS else "")
        tiles.append((render(scene, long_side), name))
    pad, label = 8, 28  # two lines: a 1:4 tile is too narrow for "1:4 (unseen)"
    canvas = Image.new("RGB", (sum(t.width for t, _ in tiles) + pad * (len(tiles) + 1), long_side + label + 2 * pad), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), pad
    for tile, text in tiles:
        canvas.paste(tile, (x, pad))
        draw.rectangle([x - 1, pad - 1, x + tile.width, pad + tile.height], outline=(120, 120, 120))
        draw.text((x, pad + long_side + 3), text, fill=(0, 0, 0))
        x += tile.width + pad
    canvas.save(path)


def _loss_plot(results: dict, path: Path, step_name, label: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for ax, step, title in ((axes[0], "decoder", "decoder: text pre-training"), (axes[1], "teacher", "teacher: contrastive")):
        losses = results[step]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
        ax.set_title(title)
    for ax, stage in zip(axes[2:], (1, 2, 3)):
        rows = results[step_name(f"stage{stage}")]["metrics"]
        for key in ("lm_loss", "pal_loss"):
            points = [(r["step"], r[key]) for r in rows if r.get(key)]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        ax.set_title(f"{label} stage {stage}")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def breakdown(run_dir: str) -> dict:
    """Accuracy by native aspect ratio and by question type (question_id % 10), from predictions."""
    rows = [json.loads(line) for line in (Path(run_dir) / "predictions.jsonl").read_text().splitlines() if line.strip()]
    by_aspect, by_type = defaultdict(list), defaultdict(list)
    for r in rows:
        if r["score"] is None:
            continue
        w, h = r["native_size"]
        by_aspect[_nearest_aspect(w, h)].append(r["score"])
        by_type[QUESTION_TYPES[int(r["question_id"]) % 10]].append(r["score"])
    mean = lambda v: float(np.mean(v))  # noqa: E731
    return {"by_aspect": {k: {"n": len(v), "accuracy": mean(v)} for k, v in sorted(by_aspect.items(), key=lambda kv: _ratio(kv[0]))},
            "by_type": {k: {"n": len(v), "accuracy": mean(v)} for k, v in by_type.items()}}


def _nearest_aspect(w: int, h: int) -> str:
    """The name of the world's aspect ratio nearest to a rendered size."""
    return aspect_name(min(TRAIN_ASPECTS + UNSEEN_ASPECTS, key=lambda a: abs(np.log(a[0] / a[1] * h / w))))


def _ratio(name: str) -> float:
    a, b = name.split(":")
    return int(a) / int(b)


def _accuracy_plot(heldout: dict, unseen: dict, chance: float, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [7, 3]})
    merged = {**heldout["by_aspect"], **unseen["by_aspect"]}
    names = sorted(merged, key=_ratio)
    colours = ["tab:orange" if n in unseen["by_aspect"] else "tab:blue" for n in names]
    ax1.bar(names, [merged[n]["accuracy"] for n in names], color=colours)
    ax1.set_title("accuracy by aspect ratio (orange: never seen in training)")
    ax1.set_xlabel("aspect ratio (w:h)")
    types = list(QUESTION_TYPES)
    x = np.arange(len(types))
    ax2.bar(x - 0.2, [heldout["by_type"][t]["accuracy"] for t in types], 0.4, label="held-out")
    ax2.bar(x + 0.2, [unseen["by_type"][t]["accuracy"] for t in types], 0.4, label="unseen AR", color="tab:orange")
    ax2.set_xticks(x, types)
    ax2.set_title("accuracy by question")
    ax2.legend(fontsize=8, loc="lower right")
    for ax in (ax1, ax2):
        ax.axhline(chance, color="gray", ls="--", lw=1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


FAMILY_LABELS = {"eve": "EVE", "eve2": "EVEv2", "eve2dense": "EVEv2 without experts"}


def write_report(demo, results: dict) -> dict:
    """The report of the run's first family, plus the comparison of families when there are several."""
    out, family = demo.out, demo.families[0]
    label = FAMILY_LABELS[family]

    def step_name(step: str) -> str:
        return demo.step_name(family, step)

    chance = chance_level()
    ev = results[step_name("eval")]
    held, unseen = ev["heldout"]["summary"], ev["unseen"]["summary"]
    held_b, unseen_b = breakdown(ev["heldout"]["run_dir"]), breakdown(ev["unseen"]["run_dir"])
    _loss_plot(results, out / "loss_curves.png", step_name, label)
    _accuracy_plot(held_b, unseen_b, chance, out / "accuracy.png")
    sweep_png = Path(ev["heldout"]["run_dir"]) / "sweep.png"
    cur = results["curate"]["summary"]
    stage_rows = []
    for stage in (1, 2, 3):
        m = results[step_name(f"stage{stage}")]["metrics"]
        first, last = m[0], m[-1]
        stage_rows.append(f"| {stage} | {last['step']} | {first['lm_loss']:.3f} -> {last['lm_loss']:.3f} | "
                          f"{first['pal_loss']:.3f} -> {last['pal_loss']:.3f} | {np.mean([r['tokens_per_s'] for r in m]):.0f} | "
                          f"{results[step_name(f'stage{stage}')]['seconds']:.0f} |")
    lines = [
        "# eve-demo report",
        "",
        f"{label}; seed {demo.seed}, {'--quick' if demo.quick else 'full run'}; every number below was measured by the project's own tools.",
        "",
        *_families_section(demo, results, chance),
        "## Result",
        "",
        "| split | items | VQA accuracy | 95% CI | chance |",
        "| --- | --- | --- | --- | --- |",
        f"| held-out (training aspect ratios, new images) | {held['items']} | {held['mean_score']:.3f} | "
        f"{held['mean_score_ci95'][0]:.3f}-{held['mean_score_ci95'][1]:.3f} | {chance:.2f} |",
        f"| unseen aspect ratios (1:4, 4:1) | {unseen['items']} | {unseen['mean_score']:.3f} | "
        f"{unseen['mean_score_ci95'][0]:.3f}-{unseen['mean_score_ci95'][1]:.3f} | {chance:.2f} |",
        "",
        "![accuracy](accuracy.png)",
        "",
        "| question | held-out | unseen aspect ratios |",
        "| --- | --- | --- |",
        *[f"| {t} | {held_b['by_type'][t]['accuracy']:.3f} | {unseen_b['by_type'][t]['accuracy']:.3f} |" for t in QUESTION_TYPES],
        "",
        "## The world",
        "",
        "One to four shapes of one colour and one kind per image; three questions per image (colour, shape, count), "
        f"four possible answers each. Training uses the aspect ratios {', '.join(map(aspect_name, TRAIN_ASPECTS))}; "
        f"{' and '.join(map(aspect_name, UNSEEN_ASPECTS))} occur only in the unseen split.",
        "",
        "![world](world.png)",
        "",
        "## Curation (eve-curate)",
        "",
        f"{cur['final']['items']} files scanned, {cur['final']['kept']} kept, {cur['final']['rejected']} rejected: "
        + ", ".join(f"{k} {v}" for k, v in sorted(cur["final"]["rejected_by_reason"].items())) + ".",
        "Details: `curation/summary.json`, `curation/cluster_sizes.png`.",
        "",
        "## Training (eve-train, DeepSpeed)",
        "",
        "| stage | steps | LM loss | PAL loss | tokens/s | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
        *stage_rows,
        "",
        _stages_text(family),
        "",
        "![losses](loss_curves.png)",
        "",
        "## Aspect-ratio sweep (eve-eval --sweep)",
        "",
        "The held-out images padded with their own background colour (`--sweep-fill edge`) to aspect ratios from 1:4 "
        "to 4:1, so the shapes shrink as the frame stretches (a 1:1 scene framed at 4:1 keeps a quarter of its size), "
        f"rendered at {demo.plan.model_image_size // 2} and {demo.plan.model_image_size} px on the long side; the processor "
        f"brings both to the model's {demo.plan.model_image_size} px, so the smaller one is the same picture at half the detail.",
        "",
        f"![sweep]({sweep_png.relative_to(out)})",
        "",
        "## Time per step",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v['seconds']:.0f} |" for k, v in results.items() if k != "report"],
        "",
        f"The final model is in `{'final' if family == 'eve' else family + '/final'}/` "
        "(`AutoModelForCausalLM.from_pretrained` after `import eve`).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    families = {f: {"heldout_accuracy": results[demo.step_name(f, "eval")]["heldout"]["summary"]["mean_score"],
                    "unseen_ar_accuracy": results[demo.step_name(f, "eval")]["unseen"]["summary"]["mean_score"],
                    **({"text_accuracy": results["language"][f]} if "language" in results else {})} for f in demo.families}
    return {"heldout_accuracy": held["mean_score"], "unseen_ar_accuracy": unseen["mean_score"], "chance": chance,
            "by_type": {"heldout": held_b["by_type"], "unseen": unseen_b["by_type"]}, "families": families,
            **({"text_accuracy_decoder": results["language"]["decoder"]} if "language" in results else {})}


def _stages_text(family: str) -> str:
    if family == "eve":
        return ("Stage 1 trains the patch embedding and PAL with the decoder frozen; stage 2 trains everything (ZeRO-3); "
                "stage 3 is SFT on conversations (PAL off). Configs: `configs/stage*.json`.")
    stage2 = ("the patch embedding and the vision experts, the language weights frozen" if family == "eve2" else
              "the patch embedding and the decoder (no experts: the ablation of EVEv2's)")
    return (f"Stage 1 trains the patch embedding with the decoder frozen (no PAL); stage 2 {stage2}; stage 3 is SFT of "
            f"everything. Configs: `{family}/configs/stage*.json`.")


def _families_section(demo, results: dict, chance: float) -> list[str]:
    """Both families on the same world, and the text each decoder kept (the paper's forgetting)."""
    if "language" not in results:
        return []
    lang = results["language"]
    rows = []
    for f in demo.families:
        ev = results[demo.step_name(f, "eval")]
        rows.append(f"| {FAMILY_LABELS[f]} | {ev['heldout']['summary']['mean_score']:.3f} | "
                    f"{ev['unseen']['summary']['mean_score']:.3f} | {lang[f]['stage2']:.3f} | {lang[f]['stage3']:.3f} |")
    return [
        "## Families on the same world",
        "",
        f"Same world, stand-ins, curated data and step counts; chance {chance:.2f}. Text accuracy: next-token accuracy "
        f"on {lang['texts']} held-out texts of the world (captions and chats), teacher-forced; the stand-in decoder "
        f"scores {lang['decoder']:.3f} before any image. EVE trains its decoder in stage 2 (no experts); EVEv2 trains "
        "vision experts there and keeps the language weights frozen until SFT; EVEv2 without experts is the same model "
        "and recipe with its decoder trained where EVEv2 trains the experts.",
        "",
        "| family | held-out VQA | unseen aspect ratios | text accuracy after stage 2 | after stage 3 |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
