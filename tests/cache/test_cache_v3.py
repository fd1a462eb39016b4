"""Caches of format 3 (written before every cache had a cache id) keep working: readers serve them exactly as the
old code did, and the next extract upgrades them in place without re-embedding a row. The fixture
(tests/golden/cache-v3) was written by the code of commit c2fb9e5; see tests/golden/make_cache_v3.py."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip_cache import open_cache
from fedclip_cache.cache import store
from fedclip_cache.cache.store import CacheError


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "cache-v3"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
_spec = importlib.util.spec_from_file_location("make_cache_v3", GOLDEN.parent / "make_cache_v3.py")
make_v3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_v3)


def old_cache(tmp_path: Path, fmt: str, name: str = "") -> Path:
    """A copy of the format-3 cache (tests never write into the fixture)."""
    dst = tmp_path / (name or f"cache-{fmt}")
    shutil.copytree(GOLDEN / fmt, dst)
    return dst


def old_images(tmp_path: Path) -> Path:
    """The images the old cache was made from, with the file times it recorded (git does not keep them)."""
    dst = tmp_path / "data"
    shutil.copytree(GOLDEN / "images", dst)
    make_v3.set_times(dst)
    return dst


def as_the_same_files(cache: Path, data: Path) -> None:
    """Make the copy's rows record the inode and ctime of the copied images, as a user's cache records its own
    image files (a copy has new ones: extract would then refresh every row, rewriting every shard with its
    features kept). Each shard stays format 3 (its metadata is rewritten as it was); its record is updated."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads((cache / "cache.json").read_text())
    for name, rec in meta["shards"].items():
        p = cache / "shards" / name
        if p.suffix == ".h5":
            with h5py.File(p, "r+") as f:
                st = [os.stat(data / x) for x in f["path"].asstr()[:]]
                f["ino"][...], f["ctime_ns"][...] = [s.st_ino for s in st], [s.st_ctime_ns for s in st]
        else:
            t = pq.read_table(p)
            st = [os.stat(data / x) for x in t.column("path").to_pylist()]
            for c, v in (("ino", [s.st_ino for s in st]), ("ctime_ns", [s.st_ctime_ns for s in st])):
                t = t.set_column(t.schema.get_field_index(c), c, pa.array(v, pa.int64()))
            pq.write_table(t, p)
        assert store.read_shard_meta(p)["format_version"] == 3
        rec.update(bytes=p.stat().st_size, sha256=store.file_sha256(p))
    (cache / "cache.json").write_text(json.dumps(meta))


def edit_meta(cache: Path, **changes) -> dict:
    meta = json.loads((cache / "cache.json").read_text())
    meta.update(changes)
    (cache / "cache.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture
def old_model(tiny_model):
    """The tiny model the old cache was made with, rebuilt from its seed (its 13 MB of weights are not committed)."""
    cfg, ckpt = tiny_model
    if store.file_sha256(ckpt) != EXPECTED["model_sha256"]:
        pytest.skip("this torch/open_clip builds the seed-0 tiny model with other bytes than the one the format-3 "
                    "fixture was made with; extending the fixture would be refused as another model")
    return ["--model-config", str(cfg), "--pretrained", str(ckpt)]


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_format3_cache_reads_as_the_old_code_read_it(tmp_path, fmt, run):
    cache = old_cache(tmp_path, fmt)
    before = {p.name: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert make_v3.reader_view(open_cache(cache)) == EXPECTED["caches"][fmt]
    assert make_v3.reader_view(open_cache(cache, verify=True, features_in="mmap")) == EXPECTED["caches"][fmt]
    code, out, err = run("info", cache)
    assert code == 0 and "8" in out, out + err
    # reading changed nothing but the memory-mapped copy it may write
    after = {p.name: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert {n: b for n, b in after.items() if not n.startswith("features.")} == before


def test_format3_listing_must_name_plain_shard_files(tmp_path, run, one_line_error):
    cache = old_cache(tmp_path, "parquet")
    meta = json.loads((cache / "cache.json").read_text())
    name = next(iter(meta["shards"]))
    outside = tmp_path / name
    shutil.copy(cache / "shards" / name, outside)
    meta["shards"]["../../" + name] = meta["shards"].pop(name)
    (cache / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="not a shard file name inside shards/"):
        open_cache(cache)
    one_line_error(*run("info", cache), "not a shard file name inside shards/")


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_extract_upgrades_a_format3_cache_in_place_without_re_embedding(tmp_path, fmt, run, old_model):
    cache, data = old_cache(tmp_path, fmt), old_images(tmp_path)
    as_the_same_files(cache, data)
    old_rows = open_cache(cache)
    assert make_v3.reader_view(old_rows) == EXPECTED["caches"][fmt]
    old_shards = {p.name: p.read_bytes() for p in (cache / "shards").iterdir()}
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(data / "art" / "cat" / "new.png")

    code, out, err = run("extract", data, cache, *old_model, "--format", fmt, "--device", "cpu", "--workers", "0",
                         "-q")
    assert code == 0, out + err
    assert "+1 embedded" in out and "8 already cached" in out, out
    assert "upgraded: cache format 3 upgraded in place to 4: given a cache id; its 3 format-3 shard(s)" in out, out
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["format_version"] == 4 and meta["state"] == "complete"
    assert store.CACHE_ID.fullmatch(meta["cache_id"])
    # the old shards are still this cache's, listed and untouched; the one new shard is format 4 with the cache id
    assert set(old_shards) < set(meta["shards"])
    assert all((cache / "shards" / n).read_bytes() == b for n, b in old_shards.items())
    (new,) = set(meta["shards"]) - set(old_shards)
    smeta = store.read_shard_meta(cache / "shards" / new)
    assert smeta["format_version"] == 4 and smeta["cache_id"] == meta["cache_id"]

    now = open_cache(cache, verify=True)
    assert len(now.labels) == 9
    at = {i: k for k, i in enumerate(now.ids.tolist())}
    kept = [at[i] for i in old_rows.ids.tolist()]
    np.testing.assert_array_equal(now.features[kept], old_rows.features)
    np.testing.assert_array_equal(now.paths[kept], old_rows.paths)

    # a second extract finds nothing to do; the cache id stays
    code, out, err = run("extract", data, cache, *old_model, "--format", fmt, "--device", "cpu", "--workers", "0",
                         "-q")
    assert code == 0 and "+0 embedded" in out and "9 already cached" in out, out + err
    assert json.loads((cache / "cache.json").read_text())["cache_id"] == meta["cache_id"]
    if fmt == "parquet":
        code, out, err = run("federate", cache, "-o", tmp_path / "run", "--rounds", "1", "--json")
        assert code == 0, out + err
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["experiments"]


def test_killed_upgrade_keeps_the_listed_format3_shards(tmp_path, run, old_model):
    """What an upgrading extract writes before its first shard (format 4, a cache id, in progress) and nothing
    more: the listed format-3 shards carry no id, yet are still this cache's (readers and the next extract)."""
    cache, data = old_cache(tmp_path, "parquet"), old_images(tmp_path)
    as_the_same_files(cache, data)
    old_shards = {p.name: p.read_bytes() for p in (cache / "shards").iterdir()}
    edit_meta(cache, format_version=4, cache_id=store.new_cache_id(), state="in-progress")
    assert len(open_cache(cache, allow_incomplete=True).labels) == 8
    code, out, err = run("extract", data, cache, *old_model, "--device", "cpu", "--workers", "0", "-q")
    assert code == 0 and "+0 embedded" in out and "8 already cached" in out, out + err
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["state"] == "complete" and set(meta["shards"]) == set(old_shards)
    assert all((cache / "shards" / n).read_bytes() == b for n, b in old_shards.items())


def test_unlisted_format3_shard_is_left_alone_and_its_images_re_embedded(tmp_path, run, old_model):
    """A format-3 shard that cache.json does not list (a killed format-3 run's, or another cache's in a shared
    shards/ folder: without an id nothing tells which) is never adopted, retired or deleted."""
    cache, data = old_cache(tmp_path, "parquet"), old_images(tmp_path)
    as_the_same_files(cache, data)
    meta = json.loads((cache / "cache.json").read_text())
    last = sorted(meta["shards"])[-1]
    rows = meta["shards"].pop(last)["rows"]
    edit_meta(cache, shards=meta["shards"], state="in-progress")  # as a killed format-3 run left it
    stray = (cache / "shards" / last).read_bytes()
    code, out, err = run("extract", data, cache, *old_model, "--device", "cpu", "--workers", "0", "-q")
    assert code == 0, out + err
    assert f"+{rows} embedded" in out and f"{8 - rows} already cached" in out, out
    assert "without a cache id" in out + err and last not in json.loads((cache / "cache.json").read_text())["shards"]
    assert (cache / "shards" / last).read_bytes() == stray
    assert len(open_cache(cache).labels) == 8


@pytest.mark.parametrize("command", ["info", "extract"])
def test_format2_cache_is_still_refused_in_one_line(tmp_path, run, command, old_model, one_line_error):
    cache, data = old_cache(tmp_path, "parquet"), old_images(tmp_path)
    edit_meta(cache, format_version=2)
    args = ("info", cache) if command == "info" else ("extract", data, cache, *old_model, "--device", "cpu", "-q")
    one_line_error(*run(*args), "cache format 2", "new")


def test_simulate_held_out_domain_cache_of_a_format3_cache_is_format4(tmp_path):
    """simulate's single-domain cache of a format-3 cache gets its own id: it must say format 4, not the source's 3
    (a format-3 cache.json with an id and format-4 shards would be neither)."""
    from fedclip_cache.launch.simulate import write_domain_cache

    src = open_cache(old_cache(tmp_path, "hdf5"))
    out = write_domain_cache(src, "art", tmp_path / "art")
    meta = json.loads((out / "cache.json").read_text())
    assert meta["format_version"] == 4 and store.CACHE_ID.fullmatch(meta["cache_id"])
    art = open_cache(out)
    np.testing.assert_array_equal(art.features, src.features[src.domains == "art"])


def test_upgraded_caches_sharing_one_shards_folder_touch_only_their_own(tmp_path, run, old_model):
    """Two format-3 caches whose shards/ is one shared folder (a link), each upgraded by its own extract: each keeps
    its own listed shards and never adopts, retires or deletes the other's (format 3 without an id, or format 4)."""
    data, shared = old_images(tmp_path), tmp_path / "shared"
    shared.mkdir()
    caches = []
    for rank, name in enumerate("ab"):
        cache = old_cache(tmp_path, "parquet", name)
        meta = json.loads((cache / "cache.json").read_text())
        listing = {}
        for shard, rec in meta["shards"].items():  # cache b's shards get other names (another rank)
            listing[shard.replace("-r000-", f"-r{rank:03d}-")] = rec
            (cache / "shards" / shard).rename(shared / shard.replace("-r000-", f"-r{rank:03d}-"))
        (cache / "shards").rmdir()
        (cache / "shards").symlink_to(shared)
        edit_meta(cache, shards=listing)
        as_the_same_files(cache, data)
        caches.append(cache)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(data / "art" / "cat" / "new.png")
    for cache in caches:
        others = {p.name: p.read_bytes() for p in shared.iterdir()
                  if p.name not in json.loads((cache / "cache.json").read_text())["shards"]}
        code, out, err = run("extract", data, cache, *old_model, "--device", "cpu", "--workers", "0", "-q")
        assert code == 0 and "+1 embedded" in out and "8 already cached" in out, out + err
        assert "3 shard(s) without a cache id (cache format 3)" in out, out
        assert all((shared / n).read_bytes() == b for n, b in others.items())  # the other cache's: untouched
    assert "1 shard(s) of another cache" in out, out  # cache a's new format-4 shard, seen by b's extract
    for cache in caches:
        meta = json.loads((cache / "cache.json").read_text())
        assert meta["format_version"] == 4 and len(meta["shards"]) == 4
        assert len(open_cache(cache, verify=True).labels) == 9
    assert len({json.loads((c / "cache.json").read_text())["cache_id"] for c in caches}) == 2
