"""eve-curate end to end on generated images: every stage through `run --config`, folder / tar /
parquet sources, the bad-image zoo, counts that add up, selection against brute force, the
manifests train/ reads, captions merged from files and written by an EVE checkpoint, split
runs, refused settings changes and concurrent runs."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from curation_data import MAX_ASPECT, MAX_PIXELS, MIN_SIDE, make_sources, make_tiny_llava, noise, write_captions_file

from data_curation.captioning import caption_stage
from data_curation.cli import main as curate
from data_curation.decisions import iter_items
from data_curation.reading import header_size, read_item_bytes
from data_curation.shards import CurationError, Part, StageDir, read_jsonl, run_lock
from data_curation.sources import Input, list_items
from eve.testing import make_tiny_open_clip
from train.config import DataSource
from train.data import ImageStore, Manifest

K, PER_CLUSTER = 4, 8
UNCAPTIONED = {"batch0/sa_0.jpg", "batch0/sa_1.jpg"}  # keys left out of the captions file


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("clip32"), image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, clip_dir):
    """The whole pipeline once, from a YAML config: (out, sources, expected filter outcomes)."""
    root = tmp_path_factory.mktemp("curation")
    sources, expected = make_sources(root / "src")
    write_captions_file(root / "captions.jsonl", sources, UNCAPTIONED)
    out = root / "out"
    config = {
        "out": str(out),
        "scan": {"input": [f"{k}={v}" for k, v in sources.items()], "shard_size": 16},
        "filter": {"min_side": MIN_SIDE, "max_aspect": MAX_ASPECT, "dedup": True, "max_pixels": MAX_PIXELS, "workers": 2},
        "embed": {"model": str(clip_dir), "sources": ["laion"], "batch_size": 8, "workers": 0},
        "cluster": {"k": K, "niter": 10, "seed": 0},
        "select": {"per_cluster": PER_CLUSTER, "merge_budget": 5},  # a tiny budget: many prunes
        "caption": {"captions_file": str(root / "captions.jsonl")},
        "export": {"webdataset": True, "per_tar": 10},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert curate(["run", "--config", str(root / "pipeline.yaml")]) == 0
    return out, sources, expected


def test_every_item_ends_in_one_place_and_counts_add_up(curated):
    out, sources, expected = curated
    summary = json.loads((out / "summary.json").read_text())
    final, stages = summary["final"], summary["stages"]
    assert summary["counts_add_up"] and final["pending"] == 0
    assert final["items"] == stages["scan"]["items"] == sum(expected.values()) == final["kept"] + final["rejected"]
    assert list(stages) == ["scan", "filter", "embed", "cluster", "select", "caption", "export"]
    # filter: the zoo and the sizes, per reason
    want = Counter()
    for (source, reason), n in expected.items():
        if reason:
            want[reason] += n
    assert stages["filter"]["rejected_by_reason"] == dict(want)
    assert stages["filter"]["kept"] == sum(n for (s, r), n in expected.items() if r is None)
    # only laion is clustered; the other sources go straight to captioning
    laion_passed = expected[("laion", None)]
    assert stages["embed"]["in"] == stages["select"]["in"] == laion_passed
    sel = stages["select"]
    assert sel["selected"] + sel["rejected_cluster_rank"] == laion_passed
    assert final["kept_by_source"]["laion"] == sel["selected"] <= K * PER_CLUSTER
    assert stages["caption"]["rejected_by_reason"] == {"no_caption": 2}
    assert final["rejected_by_reason"] == {**want, "cluster_rank": sel["rejected_cluster_rank"], "no_caption": 2}
    assert final["kept_by_source"]["sa"] == 6 - 2 and final["kept_by_source"]["web"] == 6
    assert stages["export"]["samples"] == final["kept"]
    assert stages["cluster"]["trained_points"] == laion_passed and not stages["cluster"]["faiss_subsampled"]
    # decisions.jsonl: every scanned uid exactly once, with a reason when rejected
    decisions = list(read_jsonl(out / "export" / "decisions.jsonl"))
    scanned = [r["uid"] for i in range(stages["scan"]["shards"]) for r in read_jsonl(StageDir(out, "scan").shard(i, ".jsonl"))]
    assert sorted(d["uid"] for d in decisions) == sorted(scanned) and len(set(scanned)) == len(scanned)
    assert all(d["status"] == "kept" or (d["status"] == "rejected" and d["reason"] and d["stage"]) for d in decisions)
    assert (out / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_image_zoo_reasons(curated):
    out, _, _ = curated
    by_key = {it["key"]: it for it in iter_items(out) if it["source"] == "laion"}
    for key, reason in {"zero.jpg": "empty", "corrupt.jpg": "decode_error", "truncated.png": "decode_error",
                        "notimage.png": "decode_error", "bomb.png": "too_large", "thin_header.png": "too_small",
                        "zz_dup.png": "duplicate", "0003.png": "too_small", "0004.png": "bad_aspect"}.items():
        assert (by_key[key]["status"], by_key[key]["reason"]) == ("rejected", reason), key
        assert by_key[key]["stage"] == "filter"
    for key in ("cmyk.jpg", "deep16.png", "palette.png", "alpha.png", "animated.gif", "rotated.jpg"):
        assert by_key[key]["status"] in ("kept", "rejected") and by_key[key].get("stage") in (None, "select"), key
    assert (by_key["rotated.jpg"]["width"], by_key["rotated.jpg"]["height"]) == (40, 60)  # EXIF orientation applied


def test_scan_sources_keys_sizes_and_stable_uids(curated, tmp_path):
    out, sources, _ = curated
    items = {(it["source"], it["key"]): it for it in iter_items(out)}
    web = {k: it for (s, k), it in items.items() if s == "web"}
    assert sorted(web) == ["00000.parquet:k0", "00000.parquet:k1", "00000.parquet:k2", "00000.parquet:k3",
                           "00000.tar#extra.jpg", "00001.parquet:f0", "00001.parquet:f1"]
    assert web["00000.parquet:k0"]["meta"] == {"caption": "a", "url": "http://x/0"}
    assert web["00000.parquet:k3"]["reason"] == "missing" and "HTTP 404" in web["00000.parquet:k3"]["detail"]
    assert web["00000.parquet:k0"]["ref"].endswith("00000.tar#k0.jpg")
    assert {k for (s, k) in items if s == "openimages"} == {f"openimages.tar#{i:03d}.png" for i in range(6)}
    assert ("sa", "sa/batch0/sa_0.jpg") not in items and ("sa", "batch0/sa_0.jpg") in items
    lone = [it["key"] for it in list_items(Input("web", sources["web"] / "00000.parquet"))]  # a parquet given alone
    assert lone == ["00000.parquet:k0", "00000.parquet:k1", "00000.parquet:k2", "00000.parquet:k3", "00000.tar#extra.jpg"]
    # a tar member is read with one seek and is the same bytes the tar holds
    member = items[("openimages", "openimages.tar#002.png")]
    with tarfile.open(sources["openimages"]) as tar:
        assert read_item_bytes(member) == tar.extractfile("002.png").read()
    assert header_size(member) == (48, 48)
    # uids hash source + key: a second scan elsewhere gives the same ones
    assert curate(["scan", "--out", str(tmp_path / "again"), "--shard-size", "7",
                   *[a for k, v in sources.items() for a in ("--input", f"{k}={v}")]]) == 0
    again = {it["uid"] for i in range(20) if StageDir(tmp_path / "again", "scan").shard(i, ".jsonl").exists()
             for it in read_jsonl(StageDir(tmp_path / "again", "scan").shard(i, ".jsonl"))}
    assert again == {it["uid"] for it in items.values()}


def test_selection_equals_brute_force_given_the_centroids(curated):
    out, _, _ = curated
    x = np.concatenate([np.load(StageDir(out, "embed").shard(i, ".npy")) for i in range(StageDir(out, "scan").done_info()["shards"])])
    uids = [u for i in range(StageDir(out, "scan").done_info()["shards"])
            for u in json.loads(StageDir(out, "embed").shard(i, ".json").read_text())["uids"]]
    centroids = np.load(out / "cluster" / "centroids.npy")
    sims = x.astype(np.float64) @ centroids.T.astype(np.float64)
    cluster, best = sims.argmax(1), sims.max(1)
    brute = set()
    for c in range(K):
        members = np.flatnonzero(cluster == c)
        order = members[np.lexsort((members, -best[members]))]
        brute |= {uids[i] for i in order[:PER_CLUSTER]}
    kept = {it["uid"] for it in iter_items(out, until="select") if it["source"] == "laion" and it["status"] == "kept"}
    assert kept == brute
    sizes = np.load(out / "select" / "cluster_sizes.npy")
    assert sizes.tolist() == np.bincount(cluster, minlength=K).tolist()


def test_manifests_are_what_train_reads(curated):
    out, _, _ = curated
    manifest = Manifest(DataSource(str(out / "export" / "train.jsonl")))
    summary = json.loads((out / "summary.json").read_text())
    assert len(manifest) == summary["final"]["kept"]
    store = ImageStore()
    for i in range(len(manifest)):
        rec = manifest[i]
        assert rec["image"].startswith("webdataset/shard-") and rec["conversations"][0] == {"from": "human", "value": "<image>"}
        img = store.read(rec["image"], manifest.image_root)
        assert (img.width, img.height) == (rec["width"], rec["height"]) and img.mode == "RGB"
        assert rec["conversations"][1]["value"] == f"a {rec['source']} picture"
    llava = json.loads((out / "export" / "llava.json").read_text())
    assert [r["id"] for r in llava] == [manifest[i]["id"] for i in range(len(manifest))]
    with tarfile.open(out / "export" / "webdataset" / "shard-00000.tar") as tar:
        names = tar.getnames()
    uid = manifest[0]["id"]
    assert {f"{uid}.json", f"{uid}.txt"} <= set(names)
    first = next(read_jsonl(StageDir(out, "caption").shard(0, ".jsonl")))
    assert first["captioner"] == {"file": str((out.parent / "captions.jsonl").resolve()), "model": "annotator-v0"}


def test_rerun_is_a_no_op_and_changed_settings_are_refused(curated, capsys):
    out, _, _ = curated
    before = (out / "export" / "train.jsonl").read_bytes()
    assert curate(["filter", "--out", str(out), "--min-side", str(MIN_SIDE), "--max-aspect", str(MAX_ASPECT), "--dedup",
                   "--max-pixels", str(MAX_PIXELS)]) == 0
    assert curate(["filter", "--out", str(out), "--min-side", "448"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "min_side: was 32, now 448" in err
    assert (out / "export" / "train.jsonl").read_bytes() == before
    with run_lock(out, "select"):  # another run holds the folder
        assert curate(["select", "--out", str(out), "--per-cluster", str(PER_CLUSTER)]) == 2
    assert "another eve-curate is running" in capsys.readouterr().err


def test_cluster_reports_faiss_subsampling(curated):
    from data_curation.clustering import sample_embeddings, train_kmeans
    from data_curation.embedding import embedding_shards

    out, _, _ = curated
    x, total = sample_embeddings(embedding_shards(out, "test"), sample=10**6, seed=0)
    assert len(x) == total
    _, info = train_kmeans(x, k=2, niter=5, seed=0, max_points_per_centroid=10)
    assert info["points_given"] == total and info["trained_points"] == 20 and info["faiss_subsampled"]
    x, _ = sample_embeddings(embedding_shards(out, "test"), sample=20, seed=0)
    assert len(x) == 20


def small_folder(root: Path, n: int = 5) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        noise(64, 48, 9000 + i).save(root / f"{i}.png")
    return root


def test_embed_split_in_parts_and_caption_merge_from_csv(tmp_path, clip_dir):
    src = small_folder(tmp_path / "imgs", 9)
    out = tmp_path / "out"
    assert curate(["scan", "--out", str(out), "--input", f"laion={src}", "--shard-size", "2"]) == 0
    assert curate(["filter", "--out", str(out), "--min-side", "32", "--workers", "0"]) == 0
    embed = ["embed", "--out", str(out), "--model", str(clip_dir), "--workers", "0"]
    assert curate([*embed, "--part", "1/2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not StageDir(out, "embed").complete and summary["final"]["pending"] == 9 and summary["counts_add_up"]
    assert summary["stages"]["embed"]["pending"] == 5  # shards 0, 2, 4 wait for the other part
    assert summary["stages"]["embed"]["kept"] == 4  # shards 1, 3: embedded, waiting for selection
    assert curate([*embed, "--part", "0/2"]) == 0
    assert StageDir(out, "embed").complete
    assert curate(["cluster", "--out", str(out), "--k", "2", "--niter", "3"]) == 0
    assert curate(["select", "--out", str(out), "--per-cluster", "3", "--part", "0/2"]) == 0
    assert curate(["select", "--out", str(out), "--per-cluster", "3"]) == 0
    uids = [it["uid"] for it in iter_items(out) if it["status"] == "kept"]
    selected = StageDir(out, "select").done_info()["selected"]
    sizes = np.load(out / "select" / "cluster_sizes.npy")
    assert len(uids) == selected == np.minimum(sizes, 3).sum() and sizes.sum() == 9
    (tmp_path / "caps.csv").write_text("uid,caption,annotator\n" + "".join(f"{u},caption {i},bob\n" for i, u in enumerate(uids[1:])))
    assert curate(["caption", "--out", str(out), "--captions-file", str(tmp_path / "caps.csv")]) == 0
    assert curate(["export", "--out", str(out), "--relative-paths"]) == 0
    rows = list(read_jsonl(out / "export" / "train.jsonl"))
    assert len(rows) == selected - 1 and rows[0]["image"].startswith("../../imgs/")
    assert Manifest(DataSource(str(out / "export" / "train.jsonl"))).image_root == out / "export"
    ImageStore().read(rows[0]["image"], out / "export")
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final["rejected_by_reason"] == {"cluster_rank": 9 - selected, "no_caption": 1}


def test_caption_file_errors_name_the_line(tmp_path):
    src = small_folder(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    curate(["scan", "--out", str(out), "--input", f"sa={src}"])
    curate(["filter", "--out", str(out), "--min-side", "32", "--workers", "0"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"uid": "a", "caption": "x"}\n{"uid": "a", "caption": "y"}\n')
    with pytest.raises(CurationError, match=r"bad.jsonl:2: uid a already has a caption on line 1"):
        caption_stage(out, captions_file=str(bad))


def test_caption_with_an_eve_checkpoint(tmp_path, built):
    model, processor = built
    ckpt = tmp_path / "eve"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    src = small_folder(tmp_path / "imgs", 3)
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert curate(["scan", "--out", str(out), "--input", f"sa={src}"]) == 0
    assert curate(["filter", "--out", str(out), "--min-side", "32", "--workers", "0"]) == 0
    assert curate(["caption", "--out", str(out), "--model", str(ckpt), "--max-new-tokens", "4", "--batch-size", "2",
                   "--prompt", "Describe the image briefly."]) == 0
    rows = list(read_jsonl(StageDir(out, "caption").shard(0, ".jsonl")))
    assert len(rows) == 3  # the broken image was rejected by the filter
    for r in rows:
        if r["status"] == "kept":
            c = r["captioner"]
            assert c["model"] == str(ckpt) and "<image>" in c["prompt"] and "Describe the image briefly." in c["prompt"]
            assert c["generation"] == {"max_new_tokens": 4, "num_beams": 1, "do_sample": False}
        else:  # a random tiny model may well say nothing
            assert r["reason"] == "empty_caption"
    assert json.loads((out / "summary.json").read_text())["counts_add_up"]


def test_caption_with_a_generic_transformers_captioner(tmp_path):
    ckpt = make_tiny_llava(tmp_path / "llava")
    src = small_folder(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    assert curate(["scan", "--out", str(out), "--input", f"web={src}"]) == 0
    assert curate(["filter", "--out", str(out), "--min-side", "32", "--workers", "0"]) == 0
    assert curate(["caption", "--out", str(out), "--model", str(ckpt), "--prompt", "<image> Describe.", "--max-new-tokens", "3",
                   "--batch-size", "3"]) == 0
    rows = list(read_jsonl(StageDir(out, "caption").shard(0, ".jsonl")))
    assert len(rows) == 3 and all(r["status"] == "kept" or r["reason"] == "empty_caption" for r in rows)
    kept = [r for r in rows if r["status"] == "kept"]
    assert kept and kept[0]["captioner"]["prompt"] == "<image> Describe."


def test_part_parsing_and_help_for_every_subcommand(capsys):
    assert Part.parse("1/4").owns(5) and not Part.parse("1/4").owns(4) and Part.parse(None).whole
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(CurationError, match="--part"):
            Part.parse(bad)
    for stage in ["scan", "filter", "embed", "cluster", "select", "caption", "export", "run"]:
        with pytest.raises(SystemExit) as e:
            curate([stage, "--help"])
        assert e.value.code == 0
        assert "--" in capsys.readouterr().out


def test_config_errors_are_clear(tmp_path, capsys):
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "o"), "filter": {"min_sid": 3}}))
    assert curate(["run", "--config", str(cfg)]) == 2
    assert "filter: unknown option 'min_sid'" in capsys.readouterr().err
    cfg.write_text(json.dumps({"out": str(tmp_path / "o"), "filtr": {}}))
    assert curate(["run", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['filtr']" in capsys.readouterr().err
    assert curate(["filter", "--out", str(tmp_path / "o")]) == 2
    assert "needs the scan stage to be finished" in capsys.readouterr().err
