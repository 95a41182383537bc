"""eve-demo: the whole product on built-in synthetic data, on this machine, with nothing downloaded.

    eve-demo                      # ~15 min on 2 CPU cores -> runs/demo
    eve-demo --quick --out DIR    # ~6 min, the version the tests run

Builds a world of coloured shapes on canvases of many aspect ratios; trains the stand-ins for
Vicuna (a tokenizer and a small Llama, on text only) and EVA-CLIP (a small open_clip, briefly,
on the same world); curates the pre-training images with eve-curate (filter, embed, K-means,
select, caption, export); trains EVE's three stages with eve-train's DeepSpeed trainer; and
evaluates with eve-eval on held-out images, including aspect ratios never seen in training
(1:4 and 4:1). Writes DIR/report.md and DIR/final (load it with AutoModelForCausalLM and
AutoProcessor after `import eve`). Interrupted (Ctrl-C, kill -9)? Run the same command again:
it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from demo.plan import FULL, QUICK

FAMILY_CHOICES = {"eve": ("eve",), "eve2": ("eve2",), "eve2dense": ("eve2dense",), "both": ("eve", "eve2"),
                  "all": ("eve", "eve2", "eve2dense")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/demo, or runs/demo-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="a ~6-minute version: less data, fewer steps")
    parser.add_argument("--seed", type=int, default=0, help="one seed for the world, the stand-ins and training")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps for each of EVE's three stages")
    parser.add_argument("--family", choices=list(FAMILY_CHOICES), default="eve",
                        help="model family: EVE (v1), EVEv2 (modality experts, conv-only patch embedding), EVEv2 without "
                             "its experts (eve2dense, the ablation), both (EVE and EVEv2) or all three on the same world, "
                             "compared in the report with the text each decoder kept")
    parser.add_argument("--until", default=None, metavar="STEP",
                        help="stop after this step (e.g. curate, stage2, eve2-stage1); the same command without it "
                             "continues from there")
    args = parser.parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls torch.distributed APIs that torch marks deprecated, once per step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    from demo.pipeline import Demo

    plan = (QUICK if args.quick else FULL).with_steps(args.steps)
    out = args.out or Path("runs/demo-quick" if args.quick else "runs/demo")
    families = FAMILY_CHOICES[args.family]
    demo = Demo(out=out, plan=plan, seed=args.seed, quick=args.quick, families=families)
    try:
        results = demo.run(until=args.until)
    except KeyboardInterrupt:
        print(f"\neve-demo: interrupted; run the same command again to resume ({out})", file=sys.stderr)
        raise SystemExit(130) from None
    if "report" not in results:
        print(f"eve-demo: stopped after {args.until} (--until); run the command without it to finish ({out})")
        return
    r = results["report"]
    final = out / "final" if families[0] == "eve" else out / families[0] / "final"
    print(f"report: {out / 'report.md'}; model: {final}")
    for family, f in r.get("families", {}).items():
        text = f.get("text_accuracy")
        kept = f" text_accuracy={text['stage2']:.3f}/{text['stage3']:.3f} (decoder {r['text_accuracy_decoder']:.3f})" if text else ""
        print(f"{family}: heldout_accuracy={f['heldout_accuracy']:.3f} unseen_ar_accuracy={f['unseen_ar_accuracy']:.3f}{kept}")
    print(f"demo: heldout_accuracy={r['heldout_accuracy']:.3f} unseen_ar_accuracy={r['unseen_ar_accuracy']:.3f} chance={r['chance']:.2f}")


if __name__ == "__main__":
    main()
