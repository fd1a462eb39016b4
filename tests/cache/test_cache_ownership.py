"""The cache touches only its own files: temporary files named so only ours match, no extract into someone's folder,
shards that name their cache (a shards/ folder shared by two caches), shard names confined to shards/, a full disk
as one line with a resumable cache, files that respect the umask, and `retired` counting only embedded files."""
import errno
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.store import CacheError
from fedclip_cache.synthetic import write_image_folder, write_synthetic_cache


def _meta(cache: Path) -> dict:
    return json.loads((cache / "cache.json").read_text())


# ------------------------------------------------------------------------------------- temporary files

def test_users_tmp_files_survive_an_extract_and_a_resumed_one(tmp_path, image_root, model_args, run, extract_ok,
                                                              slow_extract, wait_for_shards):
    out = tmp_path / "c"
    proc, _ = slow_extract(image_root, out, model_args, delay="0.3")
    wait_for_shards(out, 1)
    users = {out / ".notes.tmp": "mine", out / "shards" / ".notes.tmp": "mine too",
             out / ".cache.json.x.tmp": "looks like the old pattern, still mine"}
    for p, text in users.items():
        p.write_text(text)
    cid = _meta(out).get("cache_id", "0" * 32)
    ours = [out / ".fedclip-tmp.cache.json.ab12cd34.tmp",  # what a kill during these writes leaves
            out / "shards" / f".fedclip-tmp-{cid}.part-20260101T000000000000-r000-00000.parquet.ab12cd34.tmp"]
    for p in ours:
        p.write_text("{half")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    o = extract_ok(run, image_root, out, model_args)  # the resume
    assert {p: p.read_text() for p in users if p.exists()} == users
    assert not any(p.exists() for p in ours) and "2 left by a killed run, removed" in o
    extract_ok(run, image_root, out, model_args)  # an extract of a complete cache
    assert {p: p.read_text() for p in users} == users and len(open_cache(out)) == 36


def test_a_temporary_file_a_live_process_is_writing_is_never_cleaned(tmp_path):
    """A reader building features.npy takes no writer lock: an extract starting meanwhile removed its half-written
    file as a killed run's, and the reader failed ('No such file ... free disk space')."""
    from fedclip_cache.cache import integrity, store

    cache = write_synthetic_cache(tmp_path / "c", {"a": 30}, 3, dim=8)
    cid, seen = _meta(cache)["cache_id"], {}

    def write(tmp):
        tmp.write_bytes(b"half")
        seen["removed"], seen["alive"] = integrity.clean_temporaries(cache, cid), tmp.exists()
        tmp.write_bytes(b"whole")

    store.atomic_write(cache / "features.npy", write)
    assert seen == {"removed": 0, "alive": True} and (cache / "features.npy").read_bytes() == b"whole"
    (cache / ".fedclip-tmp.features.npy.abcd1234.tmp").write_bytes(b"left by a killed reader")
    assert integrity.clean_temporaries(cache, cid) == 1 and not list(cache.glob(".fedclip-tmp*"))


# ------------------------------------------------------------------------------------- someone's folder

def test_extract_into_someone_elses_folder_is_refused(tmp_path, image_root, model_args, run, extract_ok,
                                                      one_line_error):
    cases = {"notes": {"notes.txt": "mine"}, "json": {"cache.json": '{"my": "settings"}'},
             "subfolder": {"shards/readme.md": "mine"},
             # another tool's folder laid out like a cache: its cache.json was taken for our damaged one, overwritten
             "lookalike": {"cache.json": '{"my": "settings"}', "shards/data-000000.tar": "mine", ".lock": ""}}
    for name, files in cases.items():
        d = tmp_path / name
        for rel, text in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        one_line_error(*run("extract", image_root, d, *model_args, "-q", "--workers", "0"), str(d),
                       "not empty and not a fedclip-cache cache", Path(next(iter(files))).parts[0],
                       "extract into a new or empty folder")
        assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before  # not even a lock written
        assert all((d / rel).read_text() == text for rel, text in files.items())
    # what a killed first run leaves (lock, temporary files, an empty shards/) is still ours: it resumes
    d = tmp_path / "killed"
    (d / "shards").mkdir(parents=True)
    (d / ".lock").write_text("{}")
    (d / ".fedclip-tmp.cache.json.ab12cd34.tmp").write_text("{half")
    extract_ok(run, image_root, d, model_args)
    assert len(open_cache(d)) == 36 and not list(d.glob(".fedclip-tmp*"))


# ------------------------------------------------------------------------------------- a shared shards folder

def test_two_caches_sharing_one_shards_folder_never_take_each_others_shards(tmp_path, model_args, run, capsys,
                                                                            extract_ok, one_line_error):
    shared = tmp_path / "shared"
    shared.mkdir()
    roots, caches = {}, {}
    for name, domains in (("a", ("art", "photo")), ("b", ("sketch",))):
        roots[name] = write_image_folder(tmp_path / f"data-{name}", domains=domains, per_class=2)
        caches[name] = tmp_path / name
        caches[name].mkdir()
        (caches[name] / "shards").symlink_to(shared, target_is_directory=True)  # as a lab might set it up
    extract_ok(run, roots["a"], caches["a"], model_args)
    ref_a = open_cache(caches["a"])
    o = extract_ok(run, roots["b"], caches["b"], model_args)
    assert "+6 embedded" in o and "0 retired" in o and "1 shard(s) of another cache" in o
    assert len(list(shared.glob("part-*"))) == 2
    o = extract_ok(run, roots["a"], caches["a"], model_args)  # and back: nothing adopted, retired or deleted
    assert "+0 embedded" in o and "0 retired" in o and "repaired" not in o
    a, b = open_cache(caches["a"]), open_cache(caches["b"])
    assert len(a) == 12 and len(b) == 6 and set(b.domains.tolist()) == {"sketch"}
    np.testing.assert_array_equal(a.features, ref_a.features)
    assert a.meta["cache_id"] != b.meta["cache_id"]
    # an unfinished cache served with --allow-incomplete: only its own shards
    meta_b = _meta(caches["b"])
    (caches["b"] / "cache.json").write_text(json.dumps({**meta_b, "state": "in-progress"}))
    assert len(open_cache(caches["b"], allow_incomplete=True)) == 6
    # damaged metadata: rebuilt from this cache's shards only (the id survives in what is left of the file) ...
    (caches["b"] / "cache.json").write_text(json.dumps(meta_b, indent=2)[:300])
    o = extract_ok(run, roots["b"], caches["b"], model_args)
    assert "+0 embedded" in o and "rebuilt" in o and "0 retired" in o
    assert len(open_cache(caches["b"])) == 6 and (open_cache(caches["a"]).features == ref_a.features).all()
    # ... and refused when nothing tells which of the shared shards are its own
    (caches["b"] / "cache.json").write_text("{}")
    one_line_error(*run("extract", roots["b"], caches["b"], *model_args, "-q", "--workers", "0"), "cache.json",
                   "cannot be told", "2 caches", "new output folder")
    assert len(list(shared.glob("part-*"))) == 2 and len(open_cache(caches["a"])) == 12


def test_a_copy_of_a_cache_over_the_same_shared_shards_is_refused(tmp_path, image_root, model_args, run, extract_ok,
                                                                  one_line_error):
    """`cp -a` of a cache whose shards/ is a link copies the link: two cache.json with one id over one shards folder.
    Extracting a subset into the copy retired the original's rows and deleted its shard (the original then failed
    with 'shard listed in cache.json is missing')."""
    shared, a = tmp_path / "shared", tmp_path / "a"
    shared.mkdir()
    a.mkdir()
    (a / "shards").symlink_to(shared, target_is_directory=True)
    extract_ok(run, image_root, a, model_args)
    ref = open_cache(a)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy, symlinks=True)  # what cp -a does
    shutil.rmtree(image_root / "sketch")
    before = sorted(p.name for p in shared.iterdir())
    one_line_error(*run("extract", image_root, copy, *model_args, "-q", "--workers", "0"), f"{copy}: a copy of the "
                   f"cache at {a}", "same shards folder", "would delete the other's shards", "new output folder")
    assert sorted(p.name for p in shared.iterdir()) == before
    np.testing.assert_array_equal(open_cache(a).features, ref.features)
    moved = tmp_path / "moved"  # a cache moved (its old folder gone) is the same cache, not a copy
    a.rename(moved)
    o = extract_ok(run, image_root, moved, model_args)
    assert "12 retired" in o and len(open_cache(moved)) == 24 and _meta(moved)["folder"] == str(moved.resolve())
    own = tmp_path / "own"  # a copy with its own shards (cp -rL) is independent
    shutil.copytree(moved, own)
    assert len(open_cache(own)) == 24 and "+0 embedded" in extract_ok(run, image_root, own, model_args)


# ------------------------------------------------------------------------------------- shard names

@pytest.mark.parametrize("bad", ["../../x.parquet", "ABSOLUTE", "sub/part-20260101T000000000000-r000-00000.parquet",
                                 "part-20260101T000000000000-r000-00000.h5"])
def test_shard_names_outside_shards_are_refused_by_every_reader(tmp_path, run, bad, one_line_error):
    cache = write_synthetic_cache(tmp_path / "c", {"art": 20, "photo": 10}, 3, dim=8, shard_rows=16)
    outside = write_synthetic_cache(tmp_path / "evil", {"zzz": 5}, 3, dim=8)
    src = next((outside / "shards").glob("part-*"))
    target = tmp_path / "x.parquet"
    shutil.copy(src, target)
    bad = str(target) if bad == "ABSOLUTE" else bad
    if bad.startswith("sub/") or bad.endswith(".h5"):
        (cache / "shards" / bad).parent.mkdir(exist_ok=True)
        shutil.copy(src, cache / "shards" / bad)
    meta = _meta(cache)
    meta["shards"][bad] = {"rows": 5, "bytes": src.stat().st_size, "sha256": "0" * 64}
    (cache / "cache.json").write_text(json.dumps(meta))
    shown = bad[:60]
    with pytest.raises(CacheError, match="not a shard file name inside shards/"):
        open_cache(cache)
    one_line_error(*run("info", cache), "damaged cache", "not a shard file name", shown, "re-run the same")
    one_line_error(*run("federate", cache, "--rounds", "1"), "damaged cache", shown)
    assert target.read_bytes() == src.read_bytes()


def test_extract_repairs_a_listing_with_a_foreign_name_and_never_touches_that_file(tmp_path, image_root, model_args,
                                                                                    run, extract_ok):
    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args, "--shard-size", "12")
    ref = open_cache(out)
    victim = tmp_path / "x.parquet"
    shutil.copy(next((out / "shards").glob("part-*")), victim)
    meta = _meta(out)
    meta["shards"]["../../x.parquet"] = {"rows": 12, "bytes": victim.stat().st_size, "sha256": "0" * 64}
    (out / "cache.json").write_text(json.dumps(meta))
    unknown = out / "shards" / "part-20200101T000000000000-r000-00000.parquet"  # unlisted, unreadable: whose?
    unknown.write_bytes(b"PAR1 cut short")
    o = extract_ok(run, image_root, out, model_args)
    assert "+0 embedded" in o and "../../x.parquet: not a shard file name inside shards/; dropped" in o
    assert victim.exists() and "../../x.parquet" not in _meta(out)["shards"]
    assert unknown.read_bytes() == b"PAR1 cut short" and "whose it is cannot be told; left alone" in o
    np.testing.assert_array_equal(open_cache(out).features, ref.features)


# ------------------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("at", ["shard", "commit"])
def test_disk_full_is_one_line_and_the_same_command_resumes(tmp_path, image_root, model_args, run, monkeypatch, at,
                                                            extract_ok, one_line_error):
    """ENOSPC as pyarrow raises it (measured on a full 1 MiB tmpfs) at the third shard, or as a file write raises it
    at the commit of cache.json."""
    from fedclip_cache.cache import store

    out = tmp_path / "c"
    args = ("--shard-size", "12", "--batch-size", "4")
    real_parquet, real_write_text, calls = store._parquet_write, Path.write_text, []

    def parquet_write(path, *a, **k):
        calls.append(path)
        if at == "shard" and len(calls) == 3:
            Path(path).write_bytes(b"PAR1 half")
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real_parquet(path, *a, **k)

    def write_text(self, data, *a, **k):
        if at == "commit" and "cache.json" in self.name and self.name.endswith(".tmp") and '"complete"' in data:
            real_write_text(self, data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *a, **k)

    monkeypatch.setattr(store, "_parquet_write", parquet_write)
    monkeypatch.setattr(Path, "write_text", write_text)
    code, o, e = run("extract", image_root, out, *model_args, "--workers", "0", "-q", *args)
    where = "shards/part-" if at == "shard" else "cache.json"
    msg = one_line_error(code, o, e, "disk full writing", f"{out}/{where}",
                         "free space and re-run the same extract; finished shards are kept")
    monkeypatch.undo()
    assert "Errno" not in msg and not list(out.rglob(".fedclip-tmp*"))
    assert _meta(out)["state"] == "in-progress" and len(list((out / "shards").glob("part-*"))) == (2 if at == "shard"
                                                                                                 else 3)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    o = extract_ok(run, image_root, out, model_args, *args)
    assert ("+12 embedded" if at == "shard" else "+0 embedded") in o
    c = open_cache(out, verify=True)
    assert len(c) == 36 and len(set(c.ids.tolist())) == 36


_HDF5_WRITE_FAILS = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from fedclip_cache.cache import schema, store
out, what = Path(sys.argv[1]), sys.argv[2]
n = 64
cols = {c: [f"x{i}" for i in range(n)] for c in schema.text_columns()}
cols["path_bytes"] = [b"abc"] * n
cols.update({c: np.arange(n) for c in schema.int_columns()})
emb = np.random.default_rng(0).random((n, 32), dtype=np.float32)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as a full disk fails them
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    if what == "shard":
        store.write_shard(out / "part-20260101T000000000000-r000-00000.h5", "hdf5", cols, emb, "float32",
                          {"cache_id": "0" * 32})
    else:
        store.write_text(out, "hdf5", ["a {}"], [f"class {i}" for i in range(400)], np.ones((1, 400, 32)))
except OSError as e:
    print("refused", e.errno)
"""


@pytest.mark.parametrize("what,limit", [("shard", 2000), ("shard", 16000), ("text", 20000)])
def test_hdf5_write_failing_midway_raises_cleanly(tmp_path, what, limit):
    """A full disk while HDF5 wrote its own file left half-closed objects whose destructors printed RuntimeErrors
    and then crashed the process (SIGSEGV) after extract's one-line error (measured on a full 2 MiB tmpfs; a
    file-size limit fails the same writes the same way, without mounting anything)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _HDF5_WRITE_FAILS, str(tmp_path), what, str(limit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"refused {errno.EFBIG}", (r.returncode, r.stderr[-2000:])
    assert "RuntimeError" not in r.stderr and os.listdir(tmp_path) == []


def test_an_unwritable_shards_folder_is_one_line_and_resumes(tmp_path, image_root, model_args, run, monkeypatch,
                                                             extract_ok, one_line_error):
    """A shards/ folder shared by a lab but writable only by its owner (or on a read-only mount): the shard write's
    PermissionError/EROFS was a traceback, exit 1 (measured with a read-only bind mount; root ignores modes, so the
    refusal is raised here as the file system raises it)."""
    from fedclip_cache.cache import store

    out, real = tmp_path / "c", store._parquet_write

    def refused(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(store, "_parquet_write", refused)
    msg = one_line_error(*run("extract", image_root, out, *model_args, "--workers", "0", "-q"),
                         f"cannot write in {out}/shards (Read-only file system)", "make it writable",
                         "re-run the same extract")
    assert "Traceback" not in msg and not list(out.rglob(".fedclip-tmp*"))
    monkeypatch.setattr(store, "_parquet_write", real)
    extract_ok(run, image_root, out, model_args)
    assert len(open_cache(out)) == 36


# ------------------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_cache_files_respect_the_umask(tmp_path, umask, mode):
    from fedclip_cache.cache.integrity import WriterLock

    old = os.umask(umask)
    try:
        cache = write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 20}, 3, dim=8, shard_rows=16)
        open_cache(cache, features_in="mmap")  # features.npy + features.json
        with WriterLock(cache):
            pass
    finally:
        os.umask(old)
    files = [p for p in cache.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"cache.json", "text.parquet", ".lock", "features.npy", "features.json"} <= names
    assert len([n for n in names if n.startswith("part-")]) == 4
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


# ------------------------------------------------------------------------------------- retired

def test_retired_counts_only_files_that_were_embedded(tmp_path, image_root, model_args, run, extract_ok):
    broken = image_root / "art/cat/broken.png"
    broken.write_text("not a png")
    out = tmp_path / "c"
    assert "1 skipped" in extract_ok(run, image_root, out, model_args)
    broken.unlink()
    o = extract_ok(run, image_root, out, model_args)
    assert "0 retired" in o, o
    info = json.loads(run("info", out, "--json")[1])
    assert info["retired"]["count"] == 0 and info["skipped"] == []
    (image_root / "art/cat/art_cat_0000.png").unlink()  # an embedded file deleted: that one is retired
    o = extract_ok(run, image_root, out, model_args)
    assert "1 retired" in o and json.loads(run("info", out, "--json")[1])["retired"]["paths"] == [
        "art/cat/art_cat_0000.png"]
