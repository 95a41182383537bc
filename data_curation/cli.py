"""eve-curate: EVE's pre-training data curation (SPEC section 3), one subcommand per stage.

    eve-curate scan    --out cur --input sa1b=/data/sa1b --input laion=/data/laion   (folders, .tar, parquet)
    eve-curate filter  --out cur --min-side 448 --dedup --workers 16
    eve-curate embed   --out cur --model EVA02-L-14 --pretrained merged2b_s4b_b131k --sources laion
    eve-curate cluster --out cur --k 50000 --niter 20
    eve-curate select  --out cur --per-cluster 300
    eve-curate caption --out cur --model path/to/captioner      (or --captions-file captions.jsonl)
    eve-curate export  --out cur [--webdataset]                 (-> cur/export/train.jsonl for eve-train)
    eve-curate run     --config pipeline.json                   (the stages named in one JSON/YAML file)

Every stage works in shards written atomically and skips finished ones: after `kill -9`, run the
same command again. embed, select (its assignment) and caption take --part I/N to spread the
shards over N processes or GPUs. Every scanned item ends kept or rejected with a reason;
cur/summary.json (rewritten after every stage) holds the counts per stage and reason, checked to
add up, and cur/cluster_sizes.png the histogram of cluster sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from data_curation.shards import CurationError, Part, run_lock

STAGES = ("scan", "filter", "embed", "cluster", "select", "caption", "export")
PART_HELP = "I/N: do only the shards whose index is I modulo N (run N of these side by side, e.g. one per GPU)"
log = logging.getLogger("eve-curate")


def _cpus(cap: int) -> int:
    return max(1, min(cap, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="eve-curate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    subs: dict[str, argparse.ArgumentParser] = {}

    def stage(name: str, summary: str, details: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=f"{summary}.\n\n{details}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--out", required=True, type=Path, help="the curation folder, shared by all stages")
        subs[name] = p
        return p

    p = stage("scan", "list the images of every input with a stable uid and their size from the header",
              "Inputs: folders (recursive), webdataset .tar shards, img2dataset parquet with its images in itself\n"
              "(--output_format parquet), in the tar or folder of the same name, or beside it. Writes scan/shard-*.jsonl.\n"
              "What cannot be an image (a FIFO, a corrupt tar or parquet, a .tar.gz, ...) is listed with its reason.")
    p.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                   help="a source: NAME=folder|x.tar|x.parquet (repeatable)")
    p.add_argument("--shard-size", type=int, default=5000, help="items per shard, the unit of resumption (default 5000)")

    p = stage("filter", "reject too small, too elongated, undecodable and (optionally) duplicate images",
              "Reasons: too_small, bad_aspect, missing, empty, decode_error, too_large, duplicate, and those the scan\n"
              "found: not_a_file, unreadable, unreadable_container, unsupported_container, duplicate_name, ambiguous_path.\n"
              "Writes filter/shard-*.jsonl with every item and its decision.")
    p.add_argument("--min-side", type=int, default=448, help="minimum of width and height (SPEC 3: 448)")
    p.add_argument("--max-aspect", type=float, default=4.0, help="maximum long side / short side (default 4)")
    p.add_argument("--dedup", action="store_true", help="reject exact duplicates (hash of the bytes; the first in scan order stays)")
    p.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit in pixels (default: Pillow's, ~89M)")
    p.add_argument("--workers", type=int, default=_cpus(16),
                   help="decoding processes (0: in this process; default: the CPUs, at most 16)")

    p = stage("embed", "L2-normalised open_clip image embeddings of the kept images of the clustered sources",
              "Writes embed/shard-*.npy (float rows) and shard-*.json (their uids, and images that failed).\n"
              "fp16 on GPU, fp32 on CPU.")
    p.add_argument("--model", default="EVA02-L-14",
                   help="open_clip model name, or a local directory in open_clip's layout (default EVA02-L-14)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (e.g. merged2b_s4b_b131k) or a checkpoint file")
    p.add_argument("--sources", nargs="*", default=None, help="the sources to embed, cluster and select (SPEC 3: laion); default all")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=_cpus(8), help="DataLoader decoding workers (0: in this process)")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"], help="dtype of the saved embeddings")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--part", default=None, metavar="I/N", help=PART_HELP)

    p = stage("cluster", "spherical K-means with FAISS",
              "FAISS trains on at most --max-points-per-centroid points per centroid; the run samples that many\n"
              "(--sample) and says how many it trained on. Writes cluster/centroids.npy and cluster/done.json.")
    p.add_argument("--k", type=int, default=50000, help="number of clusters (SPEC 3: 50,000)")
    p.add_argument("--niter", type=int, default=20, help="K-means iterations (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=None, help="embeddings sampled for training (default: k x max-points-per-centroid)")
    p.add_argument("--max-points-per-centroid", type=int, default=256, help="FAISS's subsampling cap (default 256)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for FAISS (default: all FAISS sees; 0: CPU)")

    p = stage("select", "assign every embedding to its nearest centroid; keep the N nearest members of each cluster",
              "A partition (no image is picked twice); the others are rejected as cluster_rank. Clusters smaller than\n"
              "N keep all their members and are reported. Writes select/shard-*.jsonl and cluster_sizes.png.")
    p.add_argument("--per-cluster", type=int, default=300, help="N kept per cluster (SPEC 3: 300)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the assignment index (default: all FAISS sees; 0: CPU)")
    p.add_argument("--merge-budget", type=int, default=None, help="top-N merge buffer in entries (default max(K*N, 1M))")
    p.add_argument("--part", default=None, metavar="I/N", help=PART_HELP + "; only the assignment is split, then run without --part")

    p = stage("caption", "re-caption the kept images with a model, or merge captions from a file keyed by uid",
              "Any transformers image-to-text model or an EVE checkpoint; model, prompt and decoding settings are\n"
              "recorded with every caption. Images without a caption are rejected (no_caption, caption_error, ...).")
    p.add_argument("--model", default=None, help="captioner: a path or hub id")
    p.add_argument("--captions-file", default=None, help="instead of a model: JSONL {uid, caption, ...} or CSV/TSV with uid, caption")
    p.add_argument("--prompt", default=None,
                   help="the instruction given with each image (default: a request for a detailed description)")
    p.add_argument("--template", default="vicuna_v1", help="EVE captioners: the eve.templates prompt template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy decoding")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--part", default=None, metavar="I/N", help=PART_HELP)

    p = stage("export", "write the training manifests (export/train.jsonl, llava.json) and every item's decision",
              "train.jsonl is what eve-train reads (DataSource path); --webdataset also re-shards images + JSON into tars.")
    p.add_argument("--webdataset", action="store_true", help="copy images + json + txt into export/webdataset/shard-*.tar")
    p.add_argument("--per-tar", type=int, default=1000, help="samples per webdataset tar")
    p.add_argument("--relative-paths", action="store_true", help="image paths relative to export/ instead of absolute")
    p.add_argument("--no-llava-json", dest="llava_json", action="store_false", help="skip llava.json (one big JSON list)")

    p = sub.add_parser("run", help="run the stages named in a JSON (or YAML) config file, in order",
                       description="Run the pipeline from a config file: {\"out\": DIR, \"scan\": {...}, \"filter\": {...}, ...}. "
                                   "Each stage's options are its command-line options (underscores or dashes). "
                                   "Stages absent from the file are skipped. Re-running resumes.")
    p.add_argument("--config", required=True, type=Path, help="pipeline.json (or .yaml)")
    p.add_argument("--out", type=Path, default=None, help="overrides the config's out")
    subs["run"] = p
    return parser, subs


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    """Runs one stage under the output's lock, then rewrites summary.json."""
    from data_curation.summary import write_summary

    out: Path = args.out
    part = Part.parse(getattr(args, "part", None))
    with run_lock(out, stage, part):
        result = _dispatch(stage, out, args, part)
    write_summary(out)
    return result


def _dispatch(stage: str, out: Path, a: argparse.Namespace, part: Part) -> dict:
    if stage == "scan":
        from data_curation.sources import scan_stage

        return scan_stage(out, a.input, a.shard_size)
    if stage == "filter":
        from data_curation.filtering import FilterSettings, filter_stage

        return filter_stage(out, FilterSettings(a.min_side, a.max_aspect, a.dedup, a.max_pixels), a.workers)
    if stage == "embed":
        from data_curation.embedding import embed_stage

        if a.pretrained is None and not Path(a.model).is_dir():
            log.warning("embed: --model %s without --pretrained: random weights, the clusters will mean nothing", a.model)
        return embed_stage(out, a.model, a.pretrained, a.sources, a.batch_size, a.workers, a.store_dtype, part, a.device)
    if stage == "cluster":
        from data_curation.clustering import cluster_stage

        return cluster_stage(out, a.k, a.niter, a.seed, a.sample, a.max_points_per_centroid, a.gpus)
    if stage == "select":
        from data_curation.selection import select_stage

        return select_stage(out, a.per_cluster, part, a.merge_budget, a.gpus)
    if stage == "caption":
        from data_curation.captioning import DEFAULT_PROMPT, caption_stage

        return caption_stage(out, a.model, a.captions_file, a.prompt or DEFAULT_PROMPT, a.template, a.max_new_tokens, a.num_beams,
                             a.batch_size, part, a.device)
    if stage == "export":
        from data_curation.export import export_stage

        return export_stage(out, a.webdataset, a.per_tar, a.relative_paths, a.llava_json)
    raise CurationError(f"unknown stage {stage!r}")


def load_config(path: Path) -> dict:
    if not path.exists():
        raise CurationError(f"--config {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise CurationError(f"{path}: YAML configs need PyYAML, which is not installed: use JSON") from None
            cfg = yaml.safe_load(text)
        else:
            cfg = json.loads(text)
    except CurationError:
        raise
    except Exception as e:  # noqa: BLE001 - JSON and YAML raise different types
        raise CurationError(f"{path}: cannot parse: {e}") from e
    if not isinstance(cfg, dict):
        raise CurationError(f"{path}: expected a mapping of stage names to options")
    unknown = sorted(set(cfg) - set(STAGES) - {"out"})
    if unknown:
        raise CurationError(f"{path}: unknown key(s) {unknown}; expected 'out' and stages {list(STAGES)}")
    return cfg


def config_argv(sub: argparse.ArgumentParser, stage: str, options: dict, where: Path) -> list[str]:
    """A stage's options from the config as its command line, so argparse applies the same
    types, defaults and checks as on the command line."""
    actions = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "out")}
    argv: list[str] = []
    for key, value in (options or {}).items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise CurationError(f"{where}: {stage}: unknown option {key!r}; known: {sorted(actions)}")
        flag = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise CurationError(f"{where}: {stage}.{key} must be true or false")
            if value != action.default:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(action, argparse._AppendAction):
            for v in value if isinstance(value, list) else [value]:
                argv += [flag, str(v)]
        elif action.nargs in ("*", "+"):
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
        else:
            argv += [flag, str(value)]
    return argv


def run_pipeline(config: Path, out_override: Path | None, subs: dict[str, argparse.ArgumentParser]) -> dict:
    cfg = load_config(config)
    out = out_override or (Path(cfg["out"]) if "out" in cfg else None)
    if out is None:
        raise CurationError(f"{config}: no 'out' (or pass --out)")
    stages = [s for s in STAGES if s in cfg]
    log.info("run: stages %s into %s", stages, out)
    results = {}
    for stage in stages:
        args = subs[stage].parse_args(["--out", str(out), *config_argv(subs[stage], stage, cfg[stage], config)])
        log.info("run: %s", stage)
        results[stage] = run_stage(stage, args)
    return results


def main(argv: list[str] | None = None) -> int:
    parser, subs = build_parser()
    args = parser.parse_args(argv)
    # Our own logs at --log-level; the libraries' (open_clip, faiss) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    try:
        if args.stage == "run":
            run_pipeline(args.config, args.out, subs)
        else:
            run_stage(args.stage, args)
    except CurationError as e:
        print(f"eve-curate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
