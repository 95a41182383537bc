"""summary.json at the root of the curation folder: counts per stage and per reason code, and the
final place of every item, rewritten after every stage.

The counts come from one streaming pass over the per-shard decisions (memory: one shard) and are
checked against what each stage recorded when it finished (its done.json) and against the scan:
every scanned item is kept, rejected with a reason, or pending a stage that has not finished.
The scan's entry also shows what it found unusable (recorded by the filter with its reason) and
what it skipped as not images (sidecars, tar directories, hidden and other files).
A mismatch is written into the summary (counts_add_up: false, problems) and raised.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

from data_curation.decisions import FLOW, PipelineState, iter_items
from data_curation.progress import stage_log
from data_curation.shards import CurationError, StageDir, write_json_atomic

log = stage_log("summary")
STAGES = ("scan", "filter", "embed", "cluster", "select", "caption", "export")


def build_summary(out: Path) -> dict:
    scan = StageDir(out, "scan")
    summary: dict = {"out": str(out), "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    if not scan.complete:
        summary["stages"]["scan"] = {"finished": False}
        summary["counts_add_up"] = True
        return summary
    state = PipelineState.of(out)
    reached, passed, pending = Counter(), Counter(), Counter()
    rejected: dict[str, Counter] = defaultdict(Counter)
    final, final_reasons = Counter(), Counter()
    kept_by_source, items_by_source = Counter(), Counter()
    for item in iter_items(out, state=state):
        path = ["filter"] + (["embed", "select"] if state.is_clustered(item["source"]) else [])
        path += ["caption"] if state.caption_started else []
        decided = item.get("stage")
        for s in path:
            reached[s] += 1
            if s == decided:
                break
            passed[s] += 1
        if item["status"] == "rejected":
            rejected[decided][item["reason"]] += 1
            final_reasons[item["reason"]] += 1
        elif item["status"] == "pending":
            pending[decided] += 1
        else:
            kept_by_source[item["source"]] += 1
        final[item["status"]] += 1
        items_by_source[item["source"]] += 1

    scan_info = scan.done_info()
    stages = summary["stages"]
    stages["scan"] = {"finished": True, "items": scan_info["items"], "shards": scan_info["shards"], "by_source": scan_info["by_source"],
                      **{k: scan_info[k] for k in ("unusable", "skipped") if k in scan_info}}
    for name in FLOW:
        d = StageDir(out, name)
        if not d.started:
            continue
        stages[name] = {"finished": d.complete, "in": reached[name], "kept": passed[name],
                        "rejected": sum(rejected[name].values()), "rejected_by_reason": dict(sorted(rejected[name].items())),
                        "pending": pending[name], "settings": d.settings()["settings"]}
        if name == "embed":
            stages[name]["sources"] = sorted(state.clustered) if state.clustered else None
    for name in ("cluster", "select", "export"):
        d = StageDir(out, name)
        if d.started:
            stages[name] = {**stages.get(name, {}), "finished": d.complete, **d.done_info()}
    summary["stages"] = {name: stages[name] for name in STAGES if name in stages}  # pipeline order
    summary["final"] = {"items": sum(final.values()), "kept": final["kept"], "rejected": final["rejected"],
                        "pending": final["pending"], "rejected_by_reason": dict(sorted(final_reasons.items())),
                        "kept_by_source": dict(sorted(kept_by_source.items())),
                        "items_by_source": dict(sorted(items_by_source.items()))}
    problems = _check(out, summary, scan_info)
    summary["counts_add_up"] = not problems
    if problems:
        summary["problems"] = problems
    return summary


def _check(out: Path, summary: dict, scan_info: dict) -> list[str]:
    """Each count against an independent record of it."""
    stages, final = summary["stages"], summary["final"]
    problems = []

    def expect(what: str, got, want) -> None:
        if got != want:
            problems.append(f"{what}: {got} != {want}")

    expect("final kept + rejected + pending vs scanned items", final["kept"] + final["rejected"] + final["pending"],
           scan_info["items"])
    expect("items by source vs scan", final["items_by_source"], scan_info["by_source"])
    for name in FLOW:
        if name in stages:
            s = stages[name]
            expect(f"{name}: in vs kept + rejected + pending", s["in"], s["kept"] + s["rejected"] + s["pending"])
    done = {name: StageDir(out, name).done_info() for name in STAGES}
    if done["filter"]:
        expect("filter: kept, rejected vs filter/done.json", (stages["filter"]["kept"], stages["filter"]["rejected"]),
               (done["filter"]["kept"], done["filter"]["rejected"]))
    if done["embed"]:
        expect("embed: in vs embedded + failed in embed/done.json", stages["embed"]["in"],
               done["embed"]["embedded"] + done["embed"]["failed"])
    if done["select"]:
        expect("select: kept vs select/done.json", stages["select"]["kept"], done["select"]["selected"])
        expect("select: in vs embedded", stages["select"]["in"], done["select"]["embedded"])
    if done["caption"]:
        expect("caption: kept, rejected vs caption/done.json", (stages["caption"]["kept"], stages["caption"]["rejected"]),
               (done["caption"]["captioned"], done["caption"]["rejected"]))
    if done["export"]:
        expect("export: samples vs final kept", done["export"]["samples"], final["kept"])
    return problems


def write_summary(out: Path) -> dict:
    summary = build_summary(out)
    write_json_atomic(Path(out) / "summary.json", summary)
    if not summary["counts_add_up"]:
        raise CurationError(f"curation counts do not add up ({out / 'summary.json'}): {summary['problems']}")
    if "final" in summary:
        f = summary["final"]
        log.info("summary: %d items: %d kept, %d rejected %s, %d pending -> %s", f["items"], f["kept"], f["rejected"],
                 f["rejected_by_reason"], f["pending"], Path(out) / "summary.json")
    return summary
