"""eve-curate against hostile inputs (issue 16), through the CLI: every bad thing in an input ends
as an item rejected with a reason naming the file, row or member, the run goes on, and the counts
add up against the input; or the run stops with a clear error. Never a hang or a traceback.

The zoo: img2dataset parquet holding its images (null, empty, corrupt bytes), FIFOs, sockets and
broken links named like images, names that are not UTF-8, corrupt and cut parquet and tar files,
tar links, devices, directories and repeated names, compressed archives in a folder, folders and
files that cannot be read, '#' in folder names, and `kill -9` of a filter with decoding workers.
Everything runs in this process (a FIFO that blocks fails the test through an alarm), except the
run that is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curation_data import add_member, encode, noise
from test_curation_resume import kill_when

from data_curation.cli import main as curate
from data_curation.decisions import iter_items
from data_curation.shards import StageDir, read_jsonl
from data_curation.reading import ItemReader
from data_curation.sources import make_uid
from train.config import DataSource
from train.data import ImageStore, Manifest

MIN = "32"  # --min-side: the images below are 40 px and more


def png(seed: int, w: int = 40, h: int = 40) -> bytes:
    return encode(noise(w, h, seed))


@contextlib.contextmanager
def deadline(seconds: float):
    """Fails a call that blocks (a FIFO opened for reading) instead of hanging the test run."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: blocked?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys, *argv: str, status: int = 0) -> str:
    """eve-curate ARGV in this process; checks its exit status, returns its stderr."""
    with deadline(60):
        got = curate([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == status, err
    assert "Traceback" not in err
    return err


def scan_and_filter(capsys, out: Path, *inputs: str, shard_size: int = 4, workers: int = 0) -> dict[str, dict]:
    """{key: the item after the filter}, every key once."""
    cli(capsys, "scan", "--out", out, *[a for i in inputs for a in ("--input", i)], "--shard-size", shard_size)
    cli(capsys, "filter", "--out", out, "--min-side", MIN, "--workers", workers)
    items = list(iter_items(out, until="filter"))
    by_key = {it["key"]: it for it in items}
    assert len(by_key) == len(items), "a key listed twice"
    return by_key


def outcome(item: dict) -> str | None:
    return None if item["status"] == "kept" else item["reason"]


def assert_adds_up(out: Path, by_key: dict, expected: dict[str, str | None]) -> None:
    """Each item ends as expected (None: kept), a rejection has a reason and a detail unless it
    is a size check, and scanned = kept + rejected, per reason, in summary.json."""
    assert {k: outcome(it) for k, it in by_key.items()} == expected
    for it in by_key.values():
        if it["status"] == "rejected" and it["reason"] not in ("too_small", "bad_aspect", "duplicate"):
            assert it.get("detail"), it
    summary = json.loads((out / "summary.json").read_text())
    want = Counter(r for r in expected.values() if r)
    assert summary["counts_add_up"]
    assert summary["stages"]["scan"]["items"] == len(expected) == summary["final"]["items"]
    f = summary["stages"]["filter"]
    assert (f["in"], f["kept"], f["rejected"]) == (len(expected), len(expected) - sum(want.values()), sum(want.values()))
    assert f["rejected_by_reason"] == dict(sorted(want.items()))


def caption_and_export(capsys, out: Path, tmp: Path, *extra: str) -> list[dict]:
    """Captions every kept item from a file, exports, and reads every exported image back the way
    train/ does; returns the manifest's records."""
    captions = tmp / "captions.jsonl"
    kept = [it for it in iter_items(out, until="filter") if it["status"] == "kept"]
    captions.write_text("".join(json.dumps({"uid": it["uid"], "caption": "a picture"}) + "\n" for it in kept))
    cli(capsys, "caption", "--out", out, "--captions-file", captions)
    cli(capsys, "export", "--out", out, *extra)
    (out / "export" / "train.jsonl").read_bytes().decode("utf-8")  # strict: valid UTF-8, whatever the file names
    manifest = Manifest(DataSource(str(out / "export" / "train.jsonl")))
    records = [manifest[i] for i in range(len(manifest))]
    assert sorted(r["id"] for r in records) == sorted(it["uid"] for it in kept)
    store = ImageStore()
    for r in records:
        img = store.read(r["image"], manifest.image_root)
        assert (img.width, img.height) == (r["width"], r["height"]), r
    decisions = list(read_jsonl(out / "export" / "decisions.jsonl"))
    assert len(decisions) == json.loads((out / "summary.json").read_text())["stages"]["scan"]["items"]
    return records


# 1. img2dataset --output_format parquet: the images are in the parquet ----------------------
def img2dataset_parquet(path: Path, images: dict[str, bytes | None], row_group_size: int) -> None:
    """Its columns: key, jpg (the encoded image, null when the download failed), txt, then the
    meta: url, caption, status, error_message, width, height, ..."""
    keys = list(images)
    failed = [images[k] is None for k in keys]
    pq.write_table(pa.table({
        "key": keys,
        "jpg": pa.array([images[k] for k in keys], pa.binary()),
        "txt": [f"caption {k}" for k in keys],
        "url": [f"http://example.com/{k}.jpg" for k in keys],
        "caption": [f"caption {k}" for k in keys],
        "status": ["failed_to_download" if f else "success" for f in failed],
        "error_message": ["HTTP Error 404" if f else None for f in failed],
        "width": pa.array([None if f else 40 for f in failed], pa.int32()),
        "height": pa.array([None if f else 40 for f in failed], pa.int32()),
    }), path, row_group_size=row_group_size)


def test_img2dataset_parquet_images_are_read_from_the_parquet_and_exported(tmp_path, capsys):
    src = tmp_path / "web"
    src.mkdir()
    good = {f"{i:09d}": encode(noise(40 + i, 48, 100 + i), "JPEG") for i in range(7)}
    images = {**good, "000000100": None, "000000101": b"", "000000102": b"\xff\xd8\xff not a jpeg"}
    img2dataset_parquet(src / "00000.parquet", images, row_group_size=3)
    (src / "00000_stats.json").write_text("{}")  # img2dataset writes one beside each shard
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"web={src}")
    expected = {f"00000.parquet:{k}": None for k in good}
    expected |= {"00000.parquet:000000100": "missing", "00000.parquet:000000101": "empty",
                 "00000.parquet:000000102": "decode_error"}
    assert_adds_up(out, by_key, expected)
    first = by_key["00000.parquet:000000000"]
    assert first["ref"] == f"{src / '00000.parquet'}#row=0" and first["meta"]["caption"] == "caption 000000000"
    assert (first["parquet_column"], first["parquet_row_group"], first["parquet_row"]) == ("jpg", 0, 0)
    assert (first["width"], first["height"]) == (40, 48)
    assert (by_key["00000.parquet:000000004"]["parquet_row_group"], by_key["00000.parquet:000000004"]["parquet_row"]) == (1, 1)
    missing = by_key["00000.parquet:000000100"]["detail"]
    assert "00000.parquet row 7" in missing and "HTTP Error 404" in missing
    assert "row 8" in by_key["00000.parquet:000000101"]["detail"]
    # a reader holds one row group: the rest of it reads without the file, the next group needs it
    reader = ItemReader()
    assert reader.read(by_key["00000.parquet:000000003"]) == good["000000003"]
    (src / "00000.parquet").rename(tmp_path / "aside.parquet")
    assert reader.read(by_key["00000.parquet:000000005"]) == good["000000005"]
    with pytest.raises(FileNotFoundError):
        reader.read(by_key["00000.parquet:000000006"])
    (tmp_path / "aside.parquet").rename(src / "00000.parquet")

    records = caption_and_export(capsys, out, tmp_path)
    assert len(records) == len(good)
    assert all(r["image"].startswith(str(out.resolve() / "export" / "parquet_images" / "shard-")) for r in records)
    # the exported bytes are the parquet's; a re-run after losing the tar and done.json writes the same bytes
    tars = sorted((out / "export" / "parquet_images").glob("shard-*.tar"))
    assert len(tars) == 1
    with tarfile.open(tars[0]) as tar:
        assert tar.extractfile(f"{first['uid']}.jpg").read() == good["000000000"]
    before = {p.name: p.read_bytes() for p in (out / "export").rglob("*") if p.is_file() and p.name != "done.json"}
    (out / "export" / "done.json").unlink()
    tars[0].unlink()
    cli(capsys, "export", "--out", out)
    after = {p.name: p.read_bytes() for p in (out / "export").rglob("*") if p.is_file() and p.name != "done.json"}
    assert after == before
    assert json.loads((out / "export" / "done.json").read_text())["parquet_image_tars"] == 1


def test_run_clusters_and_exports_img2dataset_parquet_images(tmp_path, capsys, tiny_clip_dir):
    """The whole pipeline on the parquet alone (it used to stop at cluster: nothing to cluster);
    decoding workers and DataLoader workers each read row groups through their own reader."""
    good = {f"k{i:02d}": png(600 + i) for i in range(8)}
    img2dataset_parquet(tmp_path / "00000.parquet", {**good, "k99": None}, row_group_size=3)
    out = tmp_path / "out"
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"uid": make_uid("web", f"00000.parquet:{k}"), "caption": "a picture"}) + "\n"
                                for k in good))
    config = {"out": str(out), "scan": {"input": [f"web={tmp_path}"], "shard_size": 4},
              "filter": {"min_side": int(MIN), "workers": 2},
              "embed": {"model": str(tiny_clip_dir), "batch_size": 2, "workers": 1},
              "cluster": {"k": 2, "niter": 3}, "select": {"per_cluster": 3},
              "caption": {"captions_file": str(captions)}, "export": {}}
    (tmp_path / "pipeline.json").write_text(json.dumps(config))
    cli(capsys, "run", "--config", tmp_path / "pipeline.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts_add_up"] and summary["stages"]["embed"]["in"] == len(good)
    assert summary["final"]["rejected_by_reason"] == {"cluster_rank": len(good) - summary["final"]["kept"], "missing": 1}
    manifest = Manifest(DataSource(str(out / "export" / "train.jsonl")))
    assert len(manifest) == summary["final"]["kept"] > 0
    assert ImageStore().read(manifest[0]["image"], manifest.image_root).size == (40, 40)


def test_parquet_images_with_webdataset_export_and_a_lone_parquet_input(tmp_path, capsys):
    good = {f"k{i}": png(200 + i) for i in range(3)}
    img2dataset_parquet(tmp_path / "shard.parquet", good, row_group_size=2)
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"web={tmp_path / 'shard.parquet'}")
    assert_adds_up(out, by_key, {f"shard.parquet:{k}": None for k in good})
    records = caption_and_export(capsys, out, tmp_path, "--webdataset", "--per-tar", "2")
    assert all(r["image"].startswith("webdataset/shard-") and r["image"].endswith(".jpg") for r in records)
    assert not (out / "export" / "parquet_images").exists()


# 2. FIFOs, sockets, broken links named like images -----------------------------------------
def test_fifo_socket_and_broken_link_are_rejected_without_blocking(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.png").write_bytes(png(1))
    (src / "later_fifo.png").write_bytes(png(2))
    os.mkfifo(src / "y.png")
    os.mkfifo(src / "shard.tar")
    os.mkfifo(src / "meta.parquet")
    (src / "broken.png").symlink_to(src / "gone.png")
    (src / "linked.png").symlink_to(src / "good.png")  # a link to an image is that image
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        sock.bind(str(src / "s.png"))
        out = tmp_path / "out"
        cli(capsys, "scan", "--out", out, "--input", f"sa={src}")
        # a file that became a FIFO after the scan: the filter's read must not block either
        (src / "later_fifo.png").unlink()
        os.mkfifo(src / "later_fifo.png")
        cli(capsys, "filter", "--out", out, "--min-side", MIN, "--workers", "0")
    by_key = {it["key"]: it for it in iter_items(out, until="filter")}
    assert_adds_up(out, by_key, {"good.png": None, "linked.png": None, "later_fifo.png": "not_a_file", "y.png": "not_a_file",
                                 "shard.tar": "not_a_file", "meta.parquet": "not_a_file", "s.png": "not_a_file",
                                 "broken.png": "missing"})
    assert "a FIFO" in by_key["y.png"]["detail"] and str(src / "y.png") in by_key["y.png"]["detail"]
    assert "a socket" in by_key["s.png"]["detail"] and "broken symbolic link" in by_key["broken.png"]["detail"]
    assert "a FIFO" in by_key["later_fifo.png"]["detail"]
    # a FIFO given as the input itself is a clear error
    err = cli(capsys, "scan", "--out", tmp_path / "out2", "--input", f"x={src / 'y.png'}", status=2)
    assert "is neither a folder nor a regular file" in err


# 3. names that are not UTF-8 ------------------------------------------------------------------
def test_non_utf8_names_are_scanned_kept_exported_and_read_back(tmp_path, capsys):
    src = tmp_path / "src"
    raw_dir = os.fsencode(src) + b"/d\xe9j\xe0"  # Latin-1 bytes: not UTF-8
    os.makedirs(raw_dir)
    raw_file = raw_dir + b"/caf\xe9_\xff.png"
    with open(raw_file, "wb") as f:
        f.write(png(3, 48, 40))
    (src / "plain.png").write_bytes(png(4))
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"laion={src}")
    odd_key = os.fsdecode(b"d\xe9j\xe0/caf\xe9_\xff.png")
    assert_adds_up(out, by_key, {"plain.png": None, odd_key: None})
    assert by_key[odd_key]["uid"] == make_uid("laion", odd_key)
    assert (by_key[odd_key]["width"], by_key[odd_key]["height"]) == (48, 40)
    records = caption_and_export(capsys, out, tmp_path)
    odd = [r for r in records if r["id"] == by_key[odd_key]["uid"]]
    assert len(odd) == 1 and os.fsencode(odd[0]["image"]) == raw_file  # the JSON round trip gives the same bytes
    assert "\\udce9" in (out / "export" / "train.jsonl").read_text()  # as a JSON escape
    decisions = {d["key"]: d for d in read_jsonl(out / "export" / "decisions.jsonl")}
    assert decisions[odd_key]["status"] == "kept"
    # a captions file that is not UTF-8: a clear error naming its line
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"uid": "x", "caption": "ok"}\n{"uid": "y", "caption": "caf\xe9"}\n')
    other = tmp_path / "other"
    scan_and_filter(capsys, other, f"laion={src}")
    err = cli(capsys, "caption", "--out", other, "--captions-file", bad, status=2)
    assert "latin1.jsonl:2: not a JSON object: 'utf-8' codec can't decode" in err


# 4. corrupt and cut containers ----------------------------------------------------------------
def parquet_bytes(keys: list[str], row_group_size: int | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": keys, "jpg": pa.array([png(300 + i) for i in range(len(keys))], pa.binary())}), sink,
                   row_group_size=row_group_size, use_dictionary=False, compression="none")
    return sink.getvalue().to_pybytes()


def test_corrupt_and_cut_parquet_and_tar_are_recorded_and_the_scan_goes_on(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.png").write_bytes(png(5))
    whole = parquet_bytes(["a", "b"])
    (src / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (src / "garbage.parquet").write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    pq.write_table(pa.table({"id": [1, 2], "text": ["x", "y"]}), src / "nokey.parquet")
    # a parquet whose second row group is damaged: the first is listed, the rest recorded
    damaged = bytearray(parquet_bytes(["r0", "r1", "r2", "r3", "r4"], row_group_size=3))
    (src / "damaged.parquet").write_bytes(damaged)
    offset = pq.ParquetFile(src / "damaged.parquet").metadata.row_group(1).column(0).data_page_offset
    damaged[offset:offset + 16] = b"\xff" * 16
    (src / "damaged.parquet").write_bytes(damaged)
    (src / "garbage.tar").write_bytes(os.urandom(3000))
    # img2dataset's webdataset layout with a corrupt tar: its rows have no image, the tar is recorded
    pq.write_table(pa.table({"key": ["w0", "w1"], "caption": ["x", "y"]}), src / "00001.parquet")
    (src / "00001.tar").write_bytes(b"\x1f\x8b" + os.urandom(2000))
    (src / "empty.tar").write_bytes(b"")
    (tmp_path / "lone.tar").write_bytes(b"not a tar at all" * 100)  # a corrupt tar as an input of its own
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"laion={src}", f"wds={tmp_path / 'lone.tar'}")
    assert_adds_up(out, by_key, {
        "good.png": None, "cut.parquet": "unreadable_container", "garbage.parquet": "unreadable_container",
        "nokey.parquet": "unsupported_container", "damaged.parquet:r0": None, "damaged.parquet:r1": None,
        "damaged.parquet:r2": None, "damaged.parquet": "unreadable_container", "garbage.tar": "unreadable_container",
        "empty.tar": "unreadable_container", "lone.tar": "unreadable_container",
        "00001.parquet:w0": "missing", "00001.parquet:w1": "missing", "00001.tar": "unreadable_container"})
    assert f"no image for key 'w0' in {src / '00001.tar'}" in by_key["00001.parquet:w0"]["detail"]
    cut = by_key["cut.parquet"]["detail"]
    assert str(src / "cut.parquet") in cut and "pyarrow cannot read the footer" in cut and "ArrowInvalid" in cut
    damaged_detail = by_key["damaged.parquet"]["detail"]
    assert "row group 1" in damaged_detail and "rows 3 to 4 are lost, the 3 before are listed" in damaged_detail
    assert "no 'key' column" in by_key["nokey.parquet"]["detail"]
    for key in ("garbage.tar", "lone.tar", "00001.tar"):
        assert "not a readable uncompressed tar: ReadError" in by_key[key]["detail"], by_key[key]
    assert by_key["lone.tar"]["source"] == "wds"


# 5. tar members that are not files, repeated names, cut tars, unsupported archives ------------
def cut_tar(path: Path, where) -> None:
    """A tar of three images, cut at where(members)."""
    buf = Path(str(path) + ".whole")
    with tarfile.open(buf, "w") as tar:
        for i in range(3):
            add_member(tar, f"m{i}.png", png(400 + i))
    with tarfile.open(buf) as tar:
        at = where(tar.getmembers())
    path.write_bytes(buf.read_bytes()[:at])
    buf.unlink()


def test_tar_oddities_and_unsupported_archives_are_recorded(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "odd.tar", "w") as tar:
        add_member(tar, "a.png", png(10))
        for name, kind, link in (("link.png", tarfile.SYMTYPE, "a.png"), ("hard.png", tarfile.LNKTYPE, "a.png"),
                                 ("dev.png", tarfile.CHRTYPE, ""), ("fifo.png", tarfile.FIFOTYPE, ""), ("sub", tarfile.DIRTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info)
        add_member(tar, "sub/b.png", png(11))
        add_member(tar, "a.json", b"{}")
        add_member(tar, "dup.png", png(12, 60, 60))
        add_member(tar, "dup.png", png(13, 50, 50))  # tar and train/ read this one
    cut_tar(src / "cut_in_header.tar", lambda ms: ms[2].offset + 100)
    cut_tar(src / "cut_in_data.tar", lambda ms: ms[2].offset_data + 10)
    with tarfile.open(src / "trailing.tar", "w") as tar:
        add_member(tar, "t.png", png(14))
    with open(src / "trailing.tar", "ab") as f:
        f.write(b"appended after the end of the archive")
    (src / "shards.tar.gz").write_bytes(b"\x1f\x8b compressed")
    (src / "more.zip").write_bytes(b"PK\x03\x04")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"laion={src}")
    dup_first = next(k for k in by_key if k.startswith("odd.tar#dup.png@"))
    assert_adds_up(out, by_key, {
        "odd.tar#a.png": None, "odd.tar#sub/b.png": None, "odd.tar#dup.png": None, dup_first: "duplicate_name",
        "odd.tar#link.png": "not_a_file", "odd.tar#hard.png": "not_a_file", "odd.tar#dev.png": "not_a_file",
        "odd.tar#fifo.png": "not_a_file",
        "cut_in_header.tar#m0.png": None, "cut_in_header.tar#m1.png": None, "cut_in_header.tar": "unreadable_container",
        "cut_in_data.tar#m0.png": None, "cut_in_data.tar#m1.png": None, "cut_in_data.tar#m2.png": "decode_error",
        "cut_in_data.tar": "unreadable_container",
        "trailing.tar#t.png": None, "trailing.tar": "unreadable_container",
        "shards.tar.gz": "unsupported_container", "more.zip": "unsupported_container"})
    assert (by_key["odd.tar#dup.png"]["width"], by_key["odd.tar#dup.png"]["height"]) == (50, 50)
    assert "symbolic link to 'a.png'" in by_key["odd.tar#link.png"]["detail"]
    assert "hard link to 'a.png'" in by_key["odd.tar#hard.png"]["detail"]
    assert "no valid tar header at byte" in by_key["cut_in_header.tar"]["detail"]
    assert "unexpected end of data" in by_key["cut_in_data.tar"]["detail"]
    assert "gunzip" in by_key["shards.tar.gz"]["detail"]
    scan = StageDir(out, "scan").done_info()
    assert scan["skipped"] == {"other_files": 1, "tar_directories": 1, "tar_other_members": 1}
    assert scan["unusable"]["not_a_file"] == 4


def test_a_folder_or_file_that_cannot_be_read_is_recorded(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "good.png").write_bytes(png(20))
    (src / "locked" / "hidden.png").write_bytes(png(21))
    (src / "secret.png").write_bytes(png(22))
    (src / "secret.png").chmod(0)
    (src / "locked").chmod(0)
    try:
        with contextlib.suppress(PermissionError):
            os.listdir(src / "locked")
            pytest.skip("this user reads every folder (root with CAP_DAC_READ_SEARCH)")
        out = tmp_path / "out"
        by_key = scan_and_filter(capsys, out, f"sa={src}")
    finally:
        (src / "locked").chmod(0o755)
    assert_adds_up(out, by_key, {"good.png": None, "locked/": "unreadable", "secret.png": "unreadable"})
    assert "cannot list this folder: Permission denied" in by_key["locked/"]["detail"]
    assert "Permission denied" in by_key["secret.png"]["detail"]


# 6. kill -9 during filter with decoding workers ------------------------------------------------
def _processes_running(marker: str) -> set[int]:
    """Live processes whose command line holds `marker` (a run and the workers it forked)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            pids.add(int(entry.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_during_filter_with_workers_leaves_no_orphans_and_the_rerun_is_identical(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"{i:02d}.png").write_bytes(png(500 + i, 40 + i, 40))
    (src / "bad.png").write_bytes(b"\x89PNG broken")
    config = {"scan": {"input": [f"laion={src}"], "shard_size": 2},
              "filter": {"min_side": int(MIN), "dedup": True, "workers": 2}}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    (tmp_path / "straight.json").write_text(json.dumps({**config, "out": str(straight), "filter": {**config["filter"], "workers": 0}}))
    cli(capsys, "run", "--config", tmp_path / "straight.json")
    run_config = tmp_path / "killed.json"
    run_config.write_text(json.dumps({**config, "out": str(killed)}))

    seen: set[int] = set()

    def mid_filter() -> bool:
        if len(list((killed / "filter").glob("shard-*.jsonl"))) >= 2:
            seen.update(_processes_running(str(run_config)))
            return True
        return False

    try:
        assert kill_when(run_config, mid_filter, timeout=240), "the run finished before it could be killed"
        assert len(seen) >= 3, f"expected the run and its 2 workers, saw {seen}"
        deadline_at = time.monotonic() + 10
        while _processes_running(str(run_config)) and time.monotonic() < deadline_at:
            time.sleep(0.1)
        assert not _processes_running(str(run_config)), "the filter's workers outlived the killed run"
    finally:
        for pid in _processes_running(str(run_config)) & seen:  # this test's own processes, if any are left
            os.kill(pid, signal.SIGKILL)
    done = sorted((killed / "filter").glob("shard-*.jsonl"))
    assert 2 <= len(done) < 7, "killed mid-stage"
    cli(capsys, "run", "--config", run_config)  # the lock is free: the re-run is not refused
    for stage in ("scan", "filter"):
        names = sorted(p.name for p in (straight / stage).glob("shard-*"))
        assert names == sorted(p.name for p in (killed / stage).glob("shard-*")) and len(names) == 7
        for n in names:
            assert (straight / stage / n).read_bytes() == (killed / stage / n).read_bytes(), f"{stage}/{n}"
    assert (straight / "filter" / "done.json").read_text() == (killed / "filter" / "done.json").read_text()
    assert not list(killed.rglob("*.tmp*"))


# 7. '#' in folder names ------------------------------------------------------------------------
def test_hash_in_folder_names_is_kept_exported_and_read_by_train(tmp_path, capsys):
    src = tmp_path / "src"
    weird = src / "we#ird"
    weird.mkdir(parents=True)
    (weird / "a.png").write_bytes(png(30))
    (weird / "#b#.png").write_bytes(png(31))
    with tarfile.open(weird / "shard#1.tar", "w") as tar:
        add_member(tar, "c#.png", png(32))
    (src / "x.tar#y.png").write_bytes(png(33))  # its path would read as member y.png of x.tar
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"sa={src}")
    assert_adds_up(out, by_key, {"we#ird/a.png": None, "we#ird/#b#.png": None, "we#ird/shard#1.tar#c#.png": None,
                                 "x.tar#y.png": "ambiguous_path"})
    # a file named like a member of a tar beside it: one key twice, a clear error naming both
    with tarfile.open(src / "x.tar", "w") as tar:
        add_member(tar, "y.png", png(34))
    err = cli(capsys, "scan", "--out", tmp_path / "clash", "--input", f"sa={src}", status=2)
    assert "1 uid(s) listed twice" in err and f"sa: 'x.tar#y.png' ({src / 'x.tar'}#y.png)" in err
    assert f"sa: 'x.tar#y.png' ({src / 'x.tar#y.png'})" in err
    for extra in ((), ("--relative-paths",)):
        if extra:
            shutil.rmtree(out / "export")
        records = caption_and_export(capsys, out, tmp_path, *extra)
        assert len(records) == 3
        images = sorted(r["image"] for r in records)
        prefix = "../../src/we#ird/" if extra else f"{weird}/"
        assert images == [f"{prefix}#b#.png", f"{prefix}a.png", f"{prefix}shard#1.tar#c#.png"]


def test_duplicate_parquet_keys_are_recorded_not_fatal(tmp_path, capsys):
    img2dataset_parquet(tmp_path / "p.parquet", {"k": png(40)}, row_group_size=2)
    table = pq.read_table(tmp_path / "p.parquet")
    pq.write_table(pa.concat_tables([table, table]), tmp_path / "twice.parquet")
    out = tmp_path / "out"
    by_key = scan_and_filter(capsys, out, f"web={tmp_path / 'twice.parquet'}")
    assert_adds_up(out, by_key, {"twice.parquet:k": None, "twice.parquet:k@row1": "duplicate_name"})
    assert "key 'k' repeats row 0" in by_key["twice.parquet:k@row1"]["detail"]
