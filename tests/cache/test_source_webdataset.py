"""WebDataset tar shards (img2dataset's KEY.<image> + KEY.json + KEY.txt) as an extract source: the same cache as the
folder of the same images, rows keyed by shard and sample key, a removed shard's rows retired, bad bytes skipped
and listed by shard and key, and one-line refusals (empty shard, a brace pattern that matches nothing)."""
import io
import json
import tarfile

import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.bytesources import expand_braces
from fedclip_cache.cache.wds_source import split_key
from fedclip_cache.synthetic import folder_images, write_image_folder, write_wds_shards


def by_hash(cache) -> dict:
    """content hash of the image bytes -> (feature row, class name, domain)."""
    return {d: (cache.features[i], cache.classes[int(cache.labels[i])], str(cache.domains[i]))
            for i, d in enumerate(cache.column("content_hash").tolist())}


def assert_same_cache(a, b) -> None:
    assert a.classes == b.classes and sorted(a.domain_names) == sorted(b.domain_names) and len(a) == len(b)
    ra, rb = by_hash(a), by_hash(b)
    assert ra.keys() == rb.keys()
    for k, (fa, ya, da) in ra.items():
        assert (ya, da) == rb[k][1:]
        np.testing.assert_array_equal(fa, rb[k][0])  # bit-identical on CPU


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_shards_equal_folder(tmp_path, model_args, run, extract_ok, ext):
    root = write_image_folder(tmp_path / "folder", ext=ext)
    write_wds_shards(root, tmp_path / "wds", shards=3)
    extract_ok(run, root, tmp_path / "c-folder", model_args)
    extract_ok(run, str(tmp_path / "wds" / "{00000..00002}.tar"), tmp_path / "c-wds", model_args)
    folder, wds = open_cache(tmp_path / "c-folder"), open_cache(tmp_path / "c-wds")
    assert_same_cache(folder, wds)
    assert wds.paths[0] == "00000.tar#000000000"
    assert open_cache(tmp_path / "c-wds").meta["runs"][-1]["source"].endswith("wds/{00000..00002}.tar")
    # a glob and a '::' list of the same shards are the same source (same root, same row ids)
    extract_ok(run, str(tmp_path / "wds" / "*.tar"), tmp_path / "c-wds", model_args)
    o = extract_ok(run, "::".join(str(tmp_path / "wds" / f"0000{k}.tar") for k in range(3)), tmp_path / "c-wds",
                   model_args)
    assert "+0 embedded" in o and "36 already cached" in o, o


def test_removed_shard_retires_its_rows_and_corrupt_bytes_skip_one_sample(tmp_path, model_args, run, extract_ok):
    root = write_image_folder(tmp_path / "folder")
    write_wds_shards(root, tmp_path / "wds", shards=2)
    pattern = str(tmp_path / "wds" / "*.tar")
    with tarfile.open(tmp_path / "wds" / "00002.tar", "w") as tf:  # a third shard: cls labels, one broken image
        add(tf, "a.png", (root / "art" / "cat" / "art_cat_0001.png").read_bytes()[:60])
        add(tf, "a.cls", b"cat")
        add(tf, "a.json", json.dumps({"domain": "art"}).encode())
        add(tf, "b.png", (root / "art" / "dog" / "art_dog_0001.png").read_bytes())
        add(tf, "b.cls", b"dog")
        add(tf, "b.json", json.dumps({"domain": "art"}).encode())
        add(tf, "c.txt", b"a caption without an image")
    o = extract_ok(run, pattern, tmp_path / "c", model_args)
    assert "+37 embedded, 1 skipped" in o, o
    c = open_cache(tmp_path / "c")
    assert [s["path"] for s in c.skipped] == ["00002.tar#a"]
    assert "00002.tar#c" in c.meta["ignored"][0][0]
    (tmp_path / "wds" / "00000.tar").unlink()
    o = extract_ok(run, pattern, tmp_path / "c", model_args)
    assert "18 retired" in o and "+0 embedded" in o, o
    c = open_cache(tmp_path / "c")
    assert len(c) == 19 and not any(p.startswith("00000.tar#") for p in c.paths)


def test_refusals_are_one_line(tmp_path, model_args, run, one_line_error):
    root = write_image_folder(tmp_path / "folder", domains=("art",), per_class=2)
    write_wds_shards(root, tmp_path / "wds", shards=2)
    with tarfile.open(tmp_path / "wds" / "00002.tar", "w"):
        pass
    one_line_error(*run("extract", tmp_path / "wds" / "00002.tar", tmp_path / "c1", *model_args, "-q"),
                   "00002.tar", "empty tar shard")
    one_line_error(*run("extract", str(tmp_path / "wds" / "{00000..00009}.tar"), tmp_path / "c2", *model_args,
                        "-q"), "match no file", "00003.tar")
    one_line_error(*run("extract", str(tmp_path / "wds" / "{00000..00001}.tar"), tmp_path / "c3", *model_args,
                        "-q", "--label-column", "category"), "no label", "'category'", "--label-column")
    one_line_error(*run("extract", str(tmp_path / "wds" / "{00000..00001}.tar"), tmp_path / "c4", *model_args,
                        "-q", "--client-column", "site"), "no key 'site' for --client-column")
    (tmp_path / "wds" / "00003.tar").write_bytes(b"not a tar at all" * 40)
    one_line_error(*run("extract", tmp_path / "wds" / "00003.tar", tmp_path / "c5", *model_args, "-q"),
                   "00003.tar", "not a readable uncompressed tar shard")
    one_line_error(*run("extract", str(tmp_path / "wds" / "{00000..00001}.zip"), tmp_path / "c6", *model_args, "-q"),
                   "must name .tar shards or .parquet files")


def test_json_keys_client_split_and_one_domain(tmp_path, model_args, run, extract_ok):
    root = write_image_folder(tmp_path / "folder", domains=("art",), classes=("cat", "dog"), per_class=2)
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "00000.tar", "w") as tf:
        for i, (p, _, c) in enumerate(folder_images(root)):
            add(tf, f"s{i}.png", p.read_bytes())
            add(tf, f"s{i}.json", json.dumps({"y": c, "who": f"site{i % 2}", "part": "train"}).encode())
    extract_ok(run, tmp_path / "wds" / "00000.tar", tmp_path / "c", model_args, "--label-column", "y",
               "--client-column", "who", "--split-column", "part", "--domain", "clipart")
    c = open_cache(tmp_path / "c")
    assert c.domain_names == ["clipart"] and c.classes == ["cat", "dog"]
    assert sorted(set(c.clients.tolist())) == ["site0", "site1"] and set(c.splits.tolist()) == {"train"}


def test_key_and_brace_rules():
    assert split_key("dir/000001.seg.png") == ("dir/000001", "seg.png")
    assert split_key("000001.JPG") == ("000001", "jpg")
    assert expand_braces("d/{08..11}.tar") == ["d/08.tar", "d/09.tar", "d/10.tar", "d/11.tar"]
    assert expand_braces("{0..1}-{0..1}") == ["0-0", "0-1", "1-0", "1-1"]


@pytest.mark.slow  # > 10 s: a two-process torchrun
def test_torchrun_shards_the_rows(tmp_path, model_args, run, extract_ok, torchrun_extract_equals):
    root = write_image_folder(tmp_path / "folder")
    write_wds_shards(root, tmp_path / "wds", shards=2)
    src = str(tmp_path / "wds" / "{00000..00001}.tar")
    extract_ok(run, src, tmp_path / "one", model_args, "--batch-size", "5")
    torchrun_extract_equals(src, tmp_path / "one", tmp_path / "two", model_args)


@pytest.mark.slow  # > 10 s: an extract subprocess slowed down to be raced
def test_writer_lock_holds_for_shards(tmp_path, model_args, run, one_line_error, slow_extract, wait_for_shards):
    root = write_image_folder(tmp_path / "folder")
    write_wds_shards(root, tmp_path / "wds", shards=2)
    src, out = str(tmp_path / "wds" / "*.tar"), tmp_path / "c"
    proc, _ = slow_extract(src, out, model_args)
    wait_for_shards(out, 1)
    try:
        one_line_error(*run("extract", src, out, *model_args, "--workers", "0", "-q"),
                       "another extract is writing this cache", f"pid {proc.pid}")
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert len(open_cache(out)) == 36
