"""Reading a cache (open_cache, cache_overview): features served memory-mapped when they do not fit the memory
limit (cgroup v1 and v2 limits seen), float16 caches equal from memory and from the map, a damaged memory map
rebuilt and never served, shards of many row groups read the same, `info` reading no embedding and importing no
torch, and a cache folder whose path is not UTF-8 refused in one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.store import CacheError


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


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_float16_cache_trains_the_same_from_memory_and_from_the_map(tmp_path, image_root, model_args, run, fmt,
                                                                    extract_ok):
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


def test_a_cache_folder_with_a_non_utf8_path_is_refused_in_one_line(tmp_path, monkeypatch, capsys, image_root,
                                                                     model_args, one_line_error, run):
    """pyarrow opens files by UTF-8 path only: a cache in a folder whose path holds undecodable bytes is refused in one
    line saying so (not as damaged text embeddings: the cache is fine), and extracting into one is refused before
    anything is written."""
    import os

    from fedclip_cache.synthetic import write_synthetic_cache

    good = write_synthetic_cache(tmp_path / "good", {"art": 10, "photo": 10}, 3, dim=8)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    os.rename(good, odd)
    with pytest.raises(CacheError, match=r"caf\\xe9: the cache folder's path is not valid UTF-8"):
        open_cache(odd)
    code, out, err = run("info", odd)
    assert code != 0 and one_line_error(code, out, err, "not valid UTF-8")
    code, out, err = run("extract", image_root, odd + "-new", *model_args, "-q")
    assert code != 0 and one_line_error(code, out, err, "rename or move the folder")
    assert not os.path.exists(odd + "-new")
