"""eve-curate: EVE's pre-training data curation (SPEC 3), one subcommand per stage.

    eve-curate scan    --out cur --input sa1b=/data/sa1b --input laion=/data/laion-shards
    eve-curate filter  --out cur --min-side 448 [--dedup]
    eve-curate embed   --out cur --model EVA02-L-14 --pretrained merged2b_s4b_b131k --sources laion
    eve-curate cluster --out cur --k 50000 --niter 20
    eve-curate select  --out cur --per-cluster 300
    eve-curate caption --out cur --model path/to/captioner      (or --captions-file caps.jsonl)
    eve-curate export  --out cur [--webdataset]
    eve-curate run     --config pipeline.json                   (all of the above from one file)

Every stage works in shards and skips finished ones: after `kill -9`, re-run the same command.
summary.json at the root of --out holds the counts per stage and reason, checked to add up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_curation.shards import remove_partial
from data_curation.summary import write_summary

STAGES = ["scan", "filter", "embed", "cluster", "select", "caption", "export"]


def run_stage(stage: str, out: Path, **kw) -> None:
    if remove_partial(out / stage):
        print(f"{stage}: removed partial files of an interrupted run")
    if stage == "scan":
        from data_curation.sources import scan

        n = scan(kw["input"], out, kw.get("shard_size", 1000))
        print(f"scan: {n} items from {len(kw['input'])} input(s)")
    elif stage == "filter":
        from data_curation.filtering import FilterSettings, filter_stage

        filter_stage(out, FilterSettings(kw.get("min_side", 448), kw.get("max_aspect", 4.0), kw.get("dedup", False), kw.get("max_pixels")))
    elif stage == "embed":
        from data_curation.embedding import embed_stage

        embed_stage(out, kw.get("model", "EVA02-L-14"), kw.get("pretrained"), kw.get("sources"), kw.get("batch_size", 64))
    elif stage == "cluster":
        from data_curation.clustering import cluster_stage

        cluster_stage(out, kw["k"], kw.get("niter", 20), kw.get("seed", 0), kw.get("sample"), kw.get("max_points_per_centroid", 256))
    elif stage == "select":
        from data_curation.selection import select_stage

        select_stage(out, kw.get("per_cluster", 300))
    elif stage == "caption":
        from data_curation.captioning import DEFAULT_PROMPT, caption_stage

        caption_stage(out, kw.get("model"), kw.get("captions_file"), kw.get("prompt") or DEFAULT_PROMPT,
                      kw.get("max_new_tokens", 64), kw.get("batch_size", 8))
    elif stage == "export":
        from data_curation.export import export_stage

        print(f"export: {export_stage(out, kw.get('webdataset', False))}")
    summary = write_summary(out)
    print(f"{stage}: done; final {summary['final']}")


def run_pipeline(config_path: Path) -> None:
    """A JSON file: {"out": ..., "scan": {...}, "filter": {...}, ...}; stages absent are skipped."""
    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["out"])
    for stage in STAGES:
        if stage in cfg:
            run_stage(stage, out, **cfg[stage])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-curate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, help_: str):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--out", required=True, type=Path, help="the curation folder (shared by all stages)")
        return p

    p = stage("scan", "list images from folders, tar shards and img2dataset parquet; read sizes from headers")
    p.add_argument("--input", action="append", required=True, metavar="NAME=PATH", help="a source (repeatable)")
    p.add_argument("--shard-size", type=int, default=1000)
    p = stage("filter", "reject too small, too elongated, undecodable and (optionally) duplicate images")
    p.add_argument("--min-side", type=int, default=448, help="minimum of both sides (SPEC: 448)")
    p.add_argument("--max-aspect", type=float, default=4.0, help="maximum long/short side ratio")
    p.add_argument("--dedup", action="store_true", help="reject exact duplicates (SHA-256 of the bytes)")
    p.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")
    p = stage("embed", "L2-normalised open_clip image embeddings of the kept images")
    p.add_argument("--model", default="EVA02-L-14", help="open_clip name or local directory")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--sources", nargs="*", default=None, help="only these sources are clustered (SPEC: laion)")
    p.add_argument("--batch-size", type=int, default=64)
    p = stage("cluster", "spherical K-means with FAISS")
    p.add_argument("--k", type=int, default=50000)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=None, help="embeddings sampled for training (default: all)")
    p.add_argument("--max-points-per-centroid", type=int, default=256, help="FAISS's subsampling cap")
    p = stage("select", "assign every embedding to its cluster; keep the N nearest per cluster")
    p.add_argument("--per-cluster", type=int, default=300)
    p = stage("caption", "re-caption kept images with a model, or merge captions from a file")
    p.add_argument("--model", default=None, help="captioner: any transformers image-to-text model or an EVE checkpoint")
    p.add_argument("--captions-file", default=None, help="JSONL {uid, caption} or CSV/TSV with uid, caption")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p = stage("export", "training manifests (train.jsonl, llava.json), optionally webdataset tars")
    p.add_argument("--webdataset", action="store_true")
    p = sub.add_parser("run", help="the whole pipeline from a JSON config", description=run_pipeline.__doc__)
    p.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.stage == "run":
        run_pipeline(args.config)
        return
    kw = {k: v for k, v in vars(args).items() if k not in ("stage", "out")}
    run_stage(args.stage, args.out, **kw)


if __name__ == "__main__":
    main()
