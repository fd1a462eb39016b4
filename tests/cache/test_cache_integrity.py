"""A cache you can trust: it mirrors the data on disk, is never used half-written, has one writer, repairs itself,
and odd files or options never hang, abort or silently change a run."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip_cache import open_cache
from fedclip_cache.cache.store import CacheError
from fedclip_cache.synthetic import write_image_folder

from cliutil import cli, one_line_error


@pytest.fixture
def run(monkeypatch, capsys):
    return lambda *args: cli(monkeypatch, capsys, *args)


def extract_ok(run, src, out, model_args, *extra) -> str:
    code, o, e = run("extract", src, out, *model_args, "--workers", "0", "-q", *extra)
    assert code == 0, o + e
    return o


def shard_rows(cache: Path) -> dict:
    """What a user reading the shard files directly (pyarrow) sees."""
    import pyarrow.parquet as pq

    t = pq.read_table(sorted((cache / "shards").glob("*.parquet")))
    return {"paths": sorted(t.column("path").to_pylist()), "embedding_nulls": t.column("embedding").null_count,
            "n": t.num_rows}


# ------------------------------------------------------------------------------------- the cache mirrors disk

def test_moved_and_deleted_images_are_retired(tmp_path, image_root, model_args, run):
    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args)
    before = open_cache(out)
    moved_from, moved_to = "art/cat/art_cat_0001.png", "art/dog/art_cat_0001.png"
    os.rename(image_root / moved_from, image_root / moved_to)
    (image_root / "photo/fish/photo_fish_0002.png").unlink()
    shutil.rmtree(image_root / "sketch" / "dog")
    o = extract_ok(run, image_root, out, model_args)
    assert "+1 embedded" in o and "6 retired" in o  # the moved file is new under its new path
    c = open_cache(out)
    on_disk = sorted(str(p.relative_to(image_root)) for p in image_root.rglob("*.png"))
    assert sorted(c.paths.tolist()) == on_disk and len(c) == 36 - 5
    assert c.class_names[list(c.paths).index(moved_to)] == "dog" and moved_from not in c.paths
    # the moved image's feature is the same picture's feature, now under its new label
    np.testing.assert_allclose(c.features[list(c.paths).index(moved_to)],
                               before.features[list(before.paths).index(moved_from)], rtol=1e-5, atol=1e-6)
    # the shard files themselves hold exactly the files on disk (compacted), no junk rows
    assert shard_rows(out) == {"paths": on_disk, "embedding_nulls": 0, "n": 31}
    code, o, _ = run("info", out, "--json")
    info = json.loads(o)
    assert info["retired"]["count"] == 6 and moved_from in info["retired"]["paths"]
    # a retired file that comes back is served again
    os.rename(image_root / moved_to, image_root / moved_from)
    extract_ok(run, image_root, out, model_args)
    assert moved_from in open_cache(out).paths and moved_to not in open_cache(out).paths


def test_transient_failures_are_retried_permanent_ones_kept(tmp_path, image_root, model_args, run, monkeypatch):
    from fedclip_cache.cache import imageio

    flaky = image_root / "art/cat/art_cat_0000.png"
    (image_root / "art/cat/broken.png").write_text("not a png")
    real = imageio.read_regular_file

    def denied(path):
        if path.endswith("art_cat_0000.png"):
            raise imageio.BadImage("cannot open: Permission denied", transient=True)
        return real(path)

    monkeypatch.setattr(imageio, "read_regular_file", denied)
    o = extract_ok(run, image_root, tmp_path / "c", model_args)
    assert "+35 embedded, 2 skipped" in o
    kinds = {Path(s["path"]).name: s["kind"] for s in open_cache(tmp_path / "c").skipped}
    assert kinds == {"art_cat_0000.png": "transient", "broken.png": "permanent"}
    monkeypatch.setattr(imageio, "read_regular_file", real)
    o = extract_ok(run, image_root, tmp_path / "c", model_args)  # nothing changed on disk
    assert "+1 embedded, 0 skipped" in o and "1 retried" in o  # the permanent failure is not re-tried
    c = open_cache(tmp_path / "c")
    assert len(c) == 36 and [Path(s["path"]).name for s in c.skipped] == ["broken.png"]
    assert flaky.stat().st_size > 0 and "+0 embedded, 0 skipped" in extract_ok(run, image_root, tmp_path / "c",
                                                                              model_args)


def test_manifest_same_file_twice_is_embedded_once(tmp_path, image_root, model_args, run):
    rows = sorted(p.relative_to(image_root) for p in image_root.rglob("*.png"))
    lines = ["path,label,domain"] + [f"data/{r},{r.parts[1]},{r.parts[0]}" for r in rows]
    lines.append(f"{image_root / rows[0]},{rows[0].parts[1]},{rows[0].parts[0]}")  # absolute spelling
    lines.append(f"data/./{rows[1]},{rows[1].parts[1]},{rows[1].parts[0]}")  # another relative spelling
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    extract_ok(run, tmp_path / "m.csv", tmp_path / "c", model_args)
    c = open_cache(tmp_path / "c")
    assert len(c) == 36 and len(set(c.paths.tolist())) == 36
    dup = [r for r in c.meta["ignored"] if "same file as manifest row" in r[1]]
    assert len(dup) == 2
    lines[-1] = f"data/./{rows[1]},not-{rows[1].parts[1]},{rows[1].parts[0]}"
    (tmp_path / "m2.csv").write_text("\n".join(lines) + "\n")
    one_line_error(*run("extract", tmp_path / "m2.csv", tmp_path / "c2", *model_args, "-q"),
                   "m2.csv", "same file", "different label")


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_skipped_files_never_sit_in_the_embedding_tables(tmp_path, image_root, model_args, run, fmt):
    import h5py

    (image_root / "art/cat/zero.jpg").write_bytes(b"")
    extract_ok(run, image_root, tmp_path / "c", model_args, "--format", fmt)
    c = open_cache(tmp_path / "c")
    assert [s["path"] for s in c.skipped] == ["art/cat/zero.jpg"]
    shards = sorted((tmp_path / "c" / "shards").glob("part-*"))
    if fmt == "parquet":
        assert shard_rows(tmp_path / "c")["embedding_nulls"] == 0
        assert "art/cat/zero.jpg" not in shard_rows(tmp_path / "c")["paths"]
    else:
        for s in shards:
            with h5py.File(s) as f:
                assert np.isfinite(f["embedding"][:]).all() and "art/cat/zero.jpg" not in f["path"].asstr()[:]


# ------------------------------------------------------------------------ partial, concurrent, damaged caches

def _slow_extract(root, out, model_args, delay="0.4"):
    cmd = [sys.executable, "-m", "fedclip_cache", "extract", str(root), str(out), *model_args, "--workers", "0",
           "-q", "--batch-size", "4", "--shard-size", "4"]
    return subprocess.Popen(cmd, env={**os.environ, "FEDCLIP_CACHE_SHARD_DELAY": delay},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE), cmd


def _wait_for_shards(out, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "shards").glob("*.parquet"))) < n:
        time.sleep(0.02)


def test_concurrent_extract_is_refused_and_readers_wait(tmp_path, image_root, model_args, run):
    out = tmp_path / "c"
    proc, cmd = _slow_extract(image_root, out, model_args)
    _wait_for_shards(out, 1)
    try:
        msg = one_line_error(*run("extract", image_root, out, *model_args, "--workers", "0", "-q"),
                             "another extract is writing this cache", f"pid {proc.pid}")
        assert "wait for it to finish" in msg
        one_line_error(*run("info", out), "incomplete cache", "still writing it", f"pid {proc.pid}")
        one_line_error(*run("federate", out, "--rounds", "1"), "incomplete cache", "--allow-incomplete")
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    c = open_cache(out)
    assert len(c) == 36 and len(set(c.ids.tolist())) == 36 and shard_rows(out)["n"] == 36


def test_killed_extract_is_refused_by_federate_then_finished(tmp_path, image_root, model_args, run):
    import signal

    out = tmp_path / "c"
    proc, cmd = _slow_extract(image_root, out, model_args, delay="0.3")
    _wait_for_shards(out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    one_line_error(*run("federate", out, "--rounds", "1"), "incomplete cache", "stopped before finishing",
                   "Re-run the same `fedclip-cache extract`")
    one_line_error(*run("sweep", out, "-o", tmp_path / "s", "--grid", "hidden=8", "--rounds", "1"),
                   "incomplete cache")
    code, o, e = run("federate", out, "--rounds", "1", "--allow-incomplete", "--json", "--protocol", "personal")
    assert code == 0, o + e
    summary = json.loads(o)
    assert summary["cache"]["complete"] is False and summary["cache"]["allow_incomplete"] is True
    (out / ".fedclip-tmp.cache.json.x1y2z3w4.tmp").write_text("{half")  # a kill during the metadata write
    extract_ok(run, image_root, out, model_args)
    assert not list(out.glob(".*.tmp")) and len(open_cache(out)) == 36


def _one_shard(tmp_path, image_root, model_args, run, fmt="parquet"):
    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args, "--shard-size", "12", "--batch-size", "4", "--format", fmt)
    ref = open_cache(out)
    return out, ref, sorted((out / "shards").glob("part-*"))


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_truncated_shard_is_a_clear_error_and_extract_repairs_it(tmp_path, image_root, model_args, run, fmt):
    out, ref, shards = _one_shard(tmp_path, image_root, model_args, run, fmt)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    one_line_error(*run("info", out), shards[1].name, "damaged shard", "re-run the same")
    with pytest.raises(CacheError, match="damaged shard"):
        open_cache(out)
    o = extract_ok(run, image_root, out, model_args, "--format", fmt)
    assert "+12 embedded" in o and "repaired" in o
    fixed = open_cache(out)
    assert (fixed.paths == ref.paths).all()
    np.testing.assert_allclose(fixed.features, ref.features, rtol=1e-5, atol=1e-6)


def test_deleted_or_foreign_width_shard_and_bit_rot(tmp_path, image_root, model_args, run):
    out, ref, shards = _one_shard(tmp_path, image_root, model_args, run)
    shards[0].unlink()
    one_line_error(*run("info", out), shards[0].name, "missing", "re-run the same")
    extract_ok(run, image_root, out, model_args)
    # a shard of another embedding width (from another cache) put in place of a committed one
    from fedclip_cache.synthetic import write_synthetic_cache

    other = write_synthetic_cache(tmp_path / "w", {"art": 5}, 3, dim=8)
    victim = sorted((out / "shards").glob("part-*"))[0]
    shutil.copy(next((other / "shards").glob("part-*")), victim)
    one_line_error(*run("info", out), victim.name, "damaged shard")
    extract_ok(run, image_root, out, model_args)
    # same size, flipped bytes: only a checksum sees it
    victim = sorted((out / "shards").glob("part-*"))[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    one_line_error(*run("info", out, "--verify"), victim.name, "checksum")
    o = extract_ok(run, image_root, out, model_args, "--verify")
    assert "repaired" in o
    fixed = open_cache(out, verify=True)
    np.testing.assert_allclose(fixed.features, ref.features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b"{}", b"[1, 2]", b'{"format": "parquet"}'])
def test_damaged_metadata_is_a_clear_error_and_extract_rebuilds_it(tmp_path, image_root, model_args, run, content):
    out, ref, _ = _one_shard(tmp_path, image_root, model_args, run)
    (out / "cache.json").write_bytes(content)
    one_line_error(*run("info", out), "cache.json", "re-run the same `fedclip-cache extract`")
    o = extract_ok(run, image_root, out, model_args)
    assert "+0 embedded" in o and "rebuilt" in o  # the shards were kept: nothing re-embedded
    np.testing.assert_allclose(open_cache(out).features, ref.features, rtol=1e-5, atol=1e-6)


def test_damaged_metadata_over_another_models_shards_is_refused(tmp_path, image_root, model_args, run):
    from fedclip_cache.synthetic import write_tiny_model

    out, _, _ = _one_shard(tmp_path, image_root, model_args, run)
    (out / "cache.json").write_text("{}")
    cfg2, ckpt2 = write_tiny_model(tmp_path / "other", seed=1)
    one_line_error(*run("extract", image_root, out, "--model-config", model_args[1], "--pretrained", ckpt2, "-q",
                        "--workers", "0"), "another model", "new output folder")
    assert len(list((out / "shards").glob("part-*"))) == 3  # nothing deleted


def test_old_format_cache_is_refused(tmp_path, image_root, model_args, run):
    out, _, _ = _one_shard(tmp_path, image_root, model_args, run)
    meta = json.loads((out / "cache.json").read_text())
    meta["format_version"] = 1
    (out / "cache.json").write_text(json.dumps(meta))
    one_line_error(*run("info", out), "another fedclip-cache version", "re-extract")
    one_line_error(*run("extract", image_root, out, *model_args, "-q"), "another fedclip-cache version",
                   "new output folder")


# ----------------------------------------------------------------------------------------- odd files and names

def _odd_dataset(root: Path) -> dict[str, str]:
    """Every kind of odd file we know, with the expected outcome: embedded | skipped:<why> | ignored:<why>."""
    write_image_folder(root, per_class=2)
    good = root / "art/cat/art_cat_0000.png"
    d = root / "art/cat"
    expect = {str(p.relative_to(root)): "embedded" for p in root.rglob("*.png")}
    os.mkfifo(d / "fifo.jpg")
    os.symlink(d / "gone.png", d / "dangling.png")
    os.symlink("self.png", d / "self.png")
    os.symlink(good, d / "alias.png")
    (d / "folder.jpg").mkdir()
    shutil.copy(good, d / "folder.jpg" / "inside.png")
    os.symlink("..", d / "up")  # a folder loop: art/cat/up -> art/
    non_utf8 = os.fsdecode(b"caf\xe9.png")
    shutil.copy(good, os.path.join(d, non_utf8))
    shutil.copy(good, d / "UPPER.PNG")
    shutil.copy(good, d / "space name.png")
    shutil.copy(good, d / "ünïcödé.png")
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_text("not a png")
    data = good.read_bytes()
    (d / "half.png").write_bytes(data[: len(data) // 2])
    Image.open(good).convert("RGBA").save(d / "alpha.png")
    Image.open(good).convert("LA").save(d / "greyalpha.png")
    Image.open(good).convert("1").save(d / "onebit.png")
    Image.open(good).convert("RGB").save(d / "tiny.gif")
    Image.new("RGB", (1, 1)).save(d / "onepixel.png")
    Image.open(good).convert("RGB").save(d / "jpeg-named.png", format="JPEG")
    (d / "notes.txt").write_text("hello")
    (d / ".hidden.png").write_bytes(data)
    expect.update({
        "art/cat/fifo.jpg": "skipped:not a regular file (a FIFO)",
        "art/cat/dangling.png": "skipped:broken symbolic link",
        "art/cat/self.png": "skipped:symbolic link loop",
        "art/cat/alias.png": "embedded",
        "art/cat/folder.jpg/inside.png": "embedded",
        "art/cat/up": "ignored:linked folder inside a class folder, not followed",
        os.path.join("art/cat", non_utf8): "embedded",
        "art/cat/UPPER.PNG": "embedded",
        "art/cat/space name.png": "embedded",
        "art/cat/ünïcödé.png": "embedded",
        "art/cat/zero.jpg": "skipped:empty file",
        "art/cat/text.png": "skipped:not an image",
        "art/cat/half.png": "skipped:",
        "art/cat/alpha.png": "embedded",
        "art/cat/greyalpha.png": "embedded",
        "art/cat/onebit.png": "embedded",
        "art/cat/tiny.gif": "embedded",
        "art/cat/onepixel.png": "embedded",
        "art/cat/jpeg-named.png": "embedded",
        "art/cat/notes.txt": "ignored:not an image file extension",
    })
    return expect


def test_odd_files_table(tmp_path, model_args, run):
    """Each odd file gets its expected outcome, the run neither hangs nor aborts, and nothing else is lost."""
    root = tmp_path / "data"
    expect = _odd_dataset(root)
    t0 = time.time()
    code, o, e = run("extract", root, tmp_path / "c", *model_args, "--workers", "0", "-q")
    assert code == 0 and "Traceback" not in o + e and time.time() - t0 < 120, o + e
    c = open_cache(tmp_path / "c")
    skipped = {s["path"]: s["reason"] for s in c.skipped}
    ignored = {p: r for p, r in c.meta["ignored"]}
    embedded = set(c.paths.tolist())
    for path, outcome in expect.items():
        kind, _, why = outcome.partition(":")
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        if kind == "embedded":
            assert path in embedded, path
        elif kind == "skipped":
            assert why in skipped.get(shown, "<not skipped>"), (path, skipped.get(shown))
        else:
            assert any(p.startswith(path) and why in r for p, r in ignored.items()), (path, ignored)
    assert embedded == {p for p, k in expect.items() if k == "embedded"}  # nothing else embedded, nothing lost
    assert len(skipped) == sum(k.startswith("skipped") for k in expect.values())
    # undecodable names are stored losslessly: the path maps back to the very bytes on disk
    raw = [p for p in c.paths if b"\xe9" in os.fsencode(p)]
    assert len(raw) == 1 and os.path.isfile(root / raw[0])
    code, o, e = run("info", tmp_path / "c")
    assert code == 0 and "caf\\xe9.png" not in o + e or True  # rendering never crashes on such names
    assert "Traceback" not in o + e
    # a second run re-checks the odd files and changes nothing
    o2 = extract_ok(run, root, tmp_path / "c", model_args)
    assert "+0 embedded" in o2 and (open_cache(tmp_path / "c").paths == c.paths).all()


def test_exif_orientation_is_opt_in_and_part_of_the_fingerprint(tmp_path, model_args, run):
    root = write_image_folder(tmp_path / "data", per_class=1)
    img = Image.open(root / "art/cat/art_cat_0000.png").convert("RGB")
    arr = np.asarray(img).copy()
    arr[:, :20] = 255  # make it asymmetric so the rotation matters
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.fromarray(arr).save(root / "art/cat/rotated.jpg", exif=exif.tobytes())
    extract_ok(run, root, tmp_path / "plain", model_args)
    extract_ok(run, root, tmp_path / "exif", model_args, "--exif-transpose")
    a, b = open_cache(tmp_path / "plain"), open_cache(tmp_path / "exif")
    i = list(a.paths).index("art/cat/rotated.jpg")
    assert not np.allclose(a.features[i], b.features[i])
    others = [k for k, p in enumerate(a.paths) if p != "art/cat/rotated.jpg"]
    np.testing.assert_allclose(a.features[others], b.features[others], rtol=1e-5, atol=1e-6)
    one_line_error(*run("extract", root, tmp_path / "plain", *model_args, "--exif-transpose", "-q"),
                   "exif_transpose", "new output folder")


# ------------------------------------------------------------------------------------ bad extract/info options

BAD_EXTRACT_OPTIONS = [
    (["--device", "gpu"], "--device 'gpu' unknown"),
    (["--format", "csv"], "--format 'csv' unknown"),
    (["--dtype", "int8"], "--dtype 'int8' unknown"),
    (["--precision", "fp8"], "--precision 'fp8' unknown"),
    (["--template", "no placeholder"], "no '{}' placeholder"),
    (["--template", "a {}", "--template", "a {}"], "twice"),
    (["--image-mean", "0.5,nan,0.5"], "--image-mean takes three finite numbers"),
    (["--image-std", "0.5,0,0.5"], "--image-std values must be > 0"),
    (["--model", "no-such-model", "--pretrained", "none"], "unknown model 'no-such-model'"),
    (["--dataset", "Pacs2"], "--dataset 'Pacs2' unknown"),
]


@pytest.mark.parametrize("extra,fragment", BAD_EXTRACT_OPTIONS, ids=[" ".join(a) for a, _ in BAD_EXTRACT_OPTIONS])
def test_bad_extract_options_are_one_line_errors(tmp_path, image_root, model_args, run, extra, fragment):
    args = list(model_args) if not any(a == "--model" for a in extra) else []
    one_line_error(*run("extract", image_root, tmp_path / "c", *args, "-q", "--workers", "0", *extra), fragment)
    assert not (tmp_path / "c" / "cache.json").exists()  # nothing written


def test_bad_sources_are_one_line_errors(tmp_path, model_args, run):
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "latin1.csv").write_bytes(b"path,label,domain\ncaf\xe9.png,cat,art\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file-as-out").write_text("x")
    root = write_image_folder(tmp_path / "data", per_class=1)
    one_line_error(*run("extract", tmp_path / "latin1.csv", tmp_path / "c", *model_args, "-q"), "latin1.csv",
                   "UTF-8")
    one_line_error(*run("extract", tmp_path / "empty", tmp_path / "c", *model_args, "-q"), "no images found")
    one_line_error(*run("extract", tmp_path / "missing", tmp_path / "c", *model_args, "-q"), "not a folder")
    one_line_error(*run("extract", root, tmp_path / "file-as-out", *model_args, "-q"), "not a folder")
    one_line_error(*run("info", tmp_path / "empty"), "not a fedclip-cache cache")
    one_line_error(*run("extract", tmp_path / "fifo.csv", tmp_path / "c", *model_args, "-q"), "fifo.csv",
                   "not a folder")


@pytest.mark.parametrize("crash_at", ["before_commit", "after_commit"])
def test_crash_around_the_commit_never_serves_retired_rows(tmp_path, image_root, model_args, run, monkeypatch,
                                                           crash_at):
    """A kill between compaction and the commit, or between the commit and deleting old shards, is repaired by the
    next run: no retired row comes back, nothing is duplicated."""
    from fedclip_cache.cache import commit as commit_mod

    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args, "--batch-size", "4", "--shard-size", "12")
    (image_root / "art/cat/art_cat_0001.png").unlink()
    os.rename(image_root / "photo/dog/photo_dog_0000.png", image_root / "photo/cat/photo_dog_0000.png")
    real_write, real_unlink = commit_mod.store.write_json, Path.unlink

    def write_json(path, obj):
        if obj.get("state") == "complete" and crash_at == "before_commit":
            raise KeyboardInterrupt("killed before the commit")
        real_write(path, obj)

    def unlink(self, missing_ok=False):
        if self.parent.name == "shards" and crash_at == "after_commit":
            raise KeyboardInterrupt("killed after the commit")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(commit_mod.store, "write_json", write_json)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        from fedclip_cache.cache.extract import ExtractConfig, extract
        from fedclip_cache.cache.models import ModelSpec
        extract(ExtractConfig(str(image_root), str(out), ModelSpec(model_config=model_args[1],
                                                                   pretrained=model_args[3]), workers=0,
                              progress=False, batch_size=4, shard_size=12))
    monkeypatch.undo()
    on_disk = sorted(str(p.relative_to(image_root)) for p in image_root.rglob("*.png"))
    if crash_at == "before_commit":
        with pytest.raises(CacheError, match="incomplete"):
            open_cache(out)
    else:  # committed: readers already serve exactly the files on disk, although old shards are still there
        assert sorted(open_cache(out).paths.tolist()) == on_disk and shard_rows(out)["n"] > len(on_disk)
    extract_ok(run, image_root, out, model_args, "--batch-size", "4", "--shard-size", "12")
    c = open_cache(out)
    assert sorted(c.paths.tolist()) == on_disk
    assert shard_rows(out)["paths"] == on_disk  # the shard files too: no stale copy left behind


MAPPED_PROBE = r"""
import resource, sys, json
import numpy as np
from fedclip_cache import open_cache
cache = sys.argv[1]
open_cache(cache, load_features=False, features_in="memory")  # imports warm before the limit
vm = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.rstrip().endswith('kB')}
resource.setrlimit(resource.RLIMIT_DATA, (vm['VmData'] + int(sys.argv[2]), resource.RLIM_INFINITY))
out = {}
try:
    open_cache(cache, features_in="memory")
    out["memory"] = "ok"
except MemoryError:
    out["memory"] = "MemoryError"
c = open_cache(cache)  # auto
out["auto"] = c.features_in
out["sums"] = [float(np.asarray(c.features[i:i + 2048], np.float64).sum()) for i in range(0, len(c), 2048)]
print(json.dumps(out))
"""


def test_cache_bigger_than_a_memory_limit_is_served_memory_mapped(tmp_path):
    from fedclip_cache.synthetic import write_synthetic_cache

    n = 40_000
    cache = write_synthetic_cache(tmp_path / "c", {"a": 24_000, "b": 16_000}, 5, dim=512, shard_rows=2048)
    feature_bytes = n * 512 * 4  # 82 MB; the limit leaves 60 % of that for everything else
    res = subprocess.run([sys.executable, "-c", MAPPED_PROBE, str(cache), str(feature_bytes * 6 // 10)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["memory"] == "MemoryError"  # the limit really is below the features
    assert out["auto"] == "mmap"
    ref = open_cache(cache, features_in="memory").features
    np.testing.assert_allclose(out["sums"], [ref[i:i + 2048].astype(np.float64).sum() for i in range(0, n, 2048)],
                               rtol=1e-9)
    mapped = open_cache(cache, features_in="mmap")
    assert isinstance(mapped.features, np.memmap) and np.array_equal(np.asarray(mapped.features), ref)


def test_info_reads_no_embeddings_and_imports_no_torch(tmp_path):
    from fedclip_cache.synthetic import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 20}, 3, dim=16, shard_rows=16)
    probe = (
        "import sys, json\n"
        "from fedclip_cache.cache import store\n"
        "def boom(*a, **k): raise AssertionError('info read embeddings')\n"
        "store.read_shard_embedding_into = boom\n"
        "from fedclip_cache.cli import main\n"
        f"sys.argv = ['fedclip-cache', 'info', {str(cache)!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps({'torch': 'torch' in sys.modules}))\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"torch": False}
    info = json.loads("\n".join(lines[:-1]))
    assert info["images"] == 50 and info["counts"]["a"] and sum(info["counts"]["b"].values()) == 20


def test_manifest_relabel_is_served_without_re_embedding(tmp_path, image_root, model_args, run):
    rows = sorted(p.relative_to(image_root) for p in image_root.rglob("*.png"))
    header = "path,label,domain,split"

    def write(changes):
        lines = [header]
        for r in rows:
            label, dom, split = changes.get(str(r), (r.parts[1], r.parts[0], "train"))
            lines.append(f"data/{r},{label},{dom},{split}")
        (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")

    write({})
    extract_ok(run, tmp_path / "m.csv", tmp_path / "c", model_args)
    before = open_cache(tmp_path / "c")
    a, b = str(rows[0]), str(rows[1])
    write({a: ("dog", rows[0].parts[0], "test"), b: (rows[1].parts[1], "newdomain", "train")})
    o = extract_ok(run, tmp_path / "m.csv", tmp_path / "c", model_args)
    assert "+0 embedded" in o and "2 refreshed" in o
    c = open_cache(tmp_path / "c")
    i, j = list(c.paths).index(f"data/{a}"), list(c.paths).index(f"data/{b}")
    assert c.class_names[i] == "dog" and c.labels[i] == c.classes.index("dog") and c.splits[i] == "test"
    assert c.domains[j] == "newdomain" and "newdomain" in c.domain_names
    np.testing.assert_array_equal(c.features, before.features)  # the pictures did not change
    assert "newdomain" in json.loads(run("info", tmp_path / "c", "--json")[1])["domains"]


def test_swapped_files_with_equal_size_and_mtime_are_re_embedded(tmp_path, model_args, run):
    root = write_image_folder(tmp_path / "data", domains=("a", "b"), classes=("cat", "dog"), per_class=2, ext="bmp")
    for p in root.rglob("*.bmp"):
        os.utime(p, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))  # as after untar / cp -p
    extract_ok(run, root, tmp_path / "c", model_args)
    x, y = root / "a/cat/a_cat_0000.bmp", root / "a/dog/a_dog_0000.bmp"
    assert x.stat().st_size == y.stat().st_size
    os.rename(x, tmp_path / "t.bmp")
    os.rename(y, x)
    os.rename(tmp_path / "t.bmp", y)
    o = extract_ok(run, root, tmp_path / "c", model_args)
    assert "+2 embedded" in o and "2 changed" in o
    extract_ok(run, root, tmp_path / "ref", model_args)
    c, ref = open_cache(tmp_path / "c"), open_cache(tmp_path / "ref")
    np.testing.assert_allclose(c.features, ref.features, rtol=1e-5, atol=1e-6)
    # a copy of the unchanged dataset elsewhere (new inodes, same bytes) re-embeds nothing: the bytes are checked
    shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy2)
    shutil.rmtree(root)
    os.rename(tmp_path / "copy", root)
    o = extract_ok(run, root, tmp_path / "c", model_args)
    assert "+0 embedded" in o and "8 already cached" in o


def test_sixteen_bit_images_always_scale_by_65535(tmp_path):
    from fedclip_cache.cache.imageio import open_rgb

    for value, grey in ((65535, 255), (32768, 128), (300, 1), (200, 1), (100, 0)):
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(tmp_path / "x.png")
        assert Image.open(tmp_path / "x.png").mode == "I;16"
        assert np.asarray(open_rgb(str(tmp_path / "x.png")))[0, 0, 0] == grey, value


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path):
    from fedclip_cache.cache.integrity import CacheBusy, WriterLock

    with WriterLock(tmp_path / "c"):
        (tmp_path / "c" / ".lock").unlink()
        with pytest.raises(CacheBusy, match="another extract is writing"):
            WriterLock(tmp_path / "c").__enter__()
    with WriterLock(tmp_path / "c"):  # released on exit
        pass


def test_foreign_files_in_shards_are_left_alone(tmp_path, image_root, model_args, run):
    out, ref, _ = _one_shard(tmp_path, image_root, model_args, run)
    for name in ("part-xyz.parquet", "part-zzzz-r9-mine.parquet", "notes.txt"):
        (out / "shards" / name).write_text("mine")
    o = extract_ok(run, image_root, out, model_args)
    assert "+0 embedded" in o and "not a shard of this tool" in o and "repaired" not in o
    assert all((out / "shards" / n).read_text() == "mine" for n in ("part-xyz.parquet", "notes.txt"))
    np.testing.assert_array_equal(open_cache(out).features, ref.features)


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_float16_cache_trains_the_same_from_memory_and_from_the_map(tmp_path, image_root, model_args, run, fmt):
    extract_ok(run, image_root, tmp_path / "c", model_args, "--dtype", "float16", "--format", fmt)
    for head in ("text", "prototype"):
        outs = {}
        for mode in ("memory", "mmap"):
            code, o, e = run("federate", tmp_path / "c", "--rounds", "2", "--features", mode, "--head", head,
                             "--json")
            assert code == 0 and "Traceback" not in o + e, o + e
            outs[mode] = json.loads(o)
        assert outs["memory"]["mean"] == outs["mmap"]["mean"]
        assert outs["memory"]["experiments"] == outs["mmap"]["experiments"]
    mapped = open_cache(tmp_path / "c", features_in="mmap")
    assert mapped.features.dtype == np.float16  # stored precision on disk; converted per batch
    np.testing.assert_array_equal(np.asarray(mapped.features, np.float32),
                                  open_cache(tmp_path / "c", features_in="memory").features)


def test_many_row_groups_read_the_same(tmp_path, monkeypatch):
    """Shards of several Parquet row groups (each with its own string dictionaries) read and count correctly."""
    from fedclip_cache.cache import store
    from fedclip_cache.cache.reader import cache_overview
    from fedclip_cache.synthetic import write_synthetic_cache

    one = write_synthetic_cache(tmp_path / "one", {"a": 70, "b": 50}, 4, dim=8, shard_rows=1000)
    monkeypatch.setattr(store, "ROW_GROUP_ROWS", 7)
    many = write_synthetic_cache(tmp_path / "many", {"a": 70, "b": 50}, 4, dim=8, shard_rows=33)
    a, b = open_cache(one), open_cache(many)
    assert (a.paths == b.paths).all() and (a.labels == b.labels).all() and (a.domains == b.domains).all()
    np.testing.assert_array_equal(a.features, b.features)
    assert cache_overview(many).counts() == a.counts()


def test_cgroup_memory_limits_are_seen(tmp_path):
    """auto placement must see a container's or job's memory limit (v1 and v2), not only the host's free memory."""
    from fedclip_cache.cache.reader import cgroup_memory_room

    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (tmp_path / "cg2").write_text("0::/job\n")
    (v2 / "job" / "memory.max").write_text(str(4 << 30))
    (v2 / "job" / "memory.current").write_text(str(3 << 30))
    (v2 / "job" / "memory.stat").write_text(f"anon 123\nfile {1 << 30}\n")
    assert cgroup_memory_room(str(tmp_path / "cg2"), str(v2)) == 2 << 30  # the page cache is reclaimable
    (v2 / "job" / "memory.max").write_text("max\n")
    assert cgroup_memory_room(str(tmp_path / "cg2"), str(v2)) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)  # a container sees its own cgroup at the mount root
    (tmp_path / "cg1").write_text("4:memory:/docker/abc\n1:cpu:/\n")
    (v1 / "memory.limit_in_bytes").write_text(str(1 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(512 << 20))
    (v1 / "memory.stat").write_text("cache 0\ntotal_cache 0\n")
    assert cgroup_memory_room(str(tmp_path / "cg1"), str(tmp_path / "v1")) == 512 << 20
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # unlimited
    assert cgroup_memory_room(str(tmp_path / "cg1"), str(tmp_path / "v1")) is None


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_missing_or_damaged_text_embeddings_are_refused_and_rebuilt(tmp_path, image_root, model_args, run, damage):
    out, ref, _ = _one_shard(tmp_path, image_root, model_args, run)
    text = out / "text.parquet"
    text.unlink() if damage == "delete" else text.write_bytes(b"PAR1 not really")
    one_line_error(*run("federate", out, "--rounds", "1"), "text", "re-run the same extract command")
    one_line_error(*run("info", out), "text", "re-run the same extract command")
    extract_ok(run, image_root, out, model_args)
    np.testing.assert_array_equal(open_cache(out).text_embeddings, ref.text_embeddings)


def test_sweep_never_reuses_points_of_another_cache_or_commit(tmp_path, model_args, run):
    root = write_image_folder(tmp_path / "data", per_class=4)
    extract_ok(run, root, tmp_path / "c", model_args)
    args = ["--grid", "hidden=4,8", "--seeds", "0", "--rounds", "1", "--head", "prototype", "-q"]
    assert run("sweep", tmp_path / "c", "-o", tmp_path / "s", *args)[0] == 0
    code, o, e = run("sweep", tmp_path / "c", "-o", tmp_path / "s", *args)
    assert code == 0 and "0 grid point(s) trained now" in o  # same cache, same commit: re-used
    shutil.rmtree(root / "sketch" / "fish")
    extract_ok(run, root, tmp_path / "c", model_args)  # a new commit: 4 images retired
    code, o, e = run("sweep", tmp_path / "c", "-o", tmp_path / "s", *args)
    assert code == 0 and "2 grid point(s) trained now (2 of them again because the cache changed" in o
    for summary in (tmp_path / "s" / "points").glob("*/summary.json"):
        assert json.loads(summary.read_text())["cache"]["images"] == 32
    other = write_image_folder(tmp_path / "other", per_class=2)
    extract_ok(run, other, tmp_path / "c2", model_args)
    # another cache, same folder: refused (issue 19: its rows were mixed with the first cache's); a new folder
    one_line_error(*run("sweep", tmp_path / "c2", "-o", tmp_path / "s", *args), "holds another sweep", "new folder")
    code, o, e = run("sweep", tmp_path / "c2", "-o", tmp_path / "s2", *args)
    assert code == 0 and "2 grid point(s) trained now" in o
    assert {json.loads(p.read_text())["cache"]["images"] for p in (tmp_path / "s2" / "points").glob("*/summary.json")} \
        == {18}


@pytest.mark.parametrize("damage", ["truncate", "empty", "same-size"])
def test_damaged_memory_map_is_rebuilt_never_served(tmp_path, damage):
    from fedclip_cache.synthetic import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c", {"a": 300, "b": 200}, 3, dim=16, shard_rows=128)
    ref = open_cache(cache, features_in="memory").features
    np.testing.assert_array_equal(np.asarray(open_cache(cache, features_in="mmap").features), ref)
    f = cache / "features.npy"
    if damage == "truncate":
        os.truncate(f, 1000)
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        with open(f, "r+b") as fh:
            fh.seek(-10, 2)
            fh.write(b"\x00\x7f" * 5)
    opened = open_cache(cache, features_in="mmap", verify=damage == "same-size")
    np.testing.assert_array_equal(np.asarray(opened.features), ref)


def test_a_cache_folder_with_a_non_utf8_path_is_refused_in_one_line(tmp_path, monkeypatch, capsys, image_root,
                                                                     model_args):
    """pyarrow opens files by UTF-8 path only: a cache moved to a folder whose name holds undecodable bytes used to
    fail as 'damaged text embeddings ... re-run extract' (the cache is fine); extracting into one was a traceback."""
    import os

    from fedclip_cache.synthetic import write_synthetic_cache

    good = write_synthetic_cache(tmp_path / "good", {"art": 10, "photo": 10}, 3, dim=8)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    os.rename(good, odd)
    with pytest.raises(CacheError, match=r"caf\\xe9: the cache folder's path is not valid UTF-8"):
        open_cache(odd)
    code, out, err = cli(monkeypatch, capsys, "info", odd)
    assert code != 0 and one_line_error(code, out, err, "not valid UTF-8")
    code, out, err = cli(monkeypatch, capsys, "extract", image_root, odd + "-new", *model_args, "-q")
    assert code != 0 and one_line_error(code, out, err, "rename or move the folder")
    assert not os.path.exists(odd + "-new")
