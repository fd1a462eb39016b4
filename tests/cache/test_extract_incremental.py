"""An extract over an existing cache mirrors the source on disk and embeds only what changed: moved and deleted
images retired (and served again when they come back), transient read failures retried and permanent ones kept,
one file under two manifest spellings embedded once, skipped files never in the embedding tables, a manifest
relabel refreshed without re-embedding, swapped files of equal size and mtime re-embedded (and a byte-identical copy
not), and files in shards/ that are not ours left alone."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.synthetic import write_image_folder


def test_moved_and_deleted_images_are_retired(tmp_path, image_root, model_args, run, extract_ok, shard_rows):
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


def test_transient_failures_are_retried_permanent_ones_kept(tmp_path, image_root, model_args, run, monkeypatch,
                                                            extract_ok):
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


def test_manifest_same_file_twice_is_embedded_once(tmp_path, image_root, model_args, run, extract_ok, one_line_error):
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
def test_skipped_files_never_sit_in_the_embedding_tables(tmp_path, image_root, model_args, run, fmt, extract_ok,
                                                         shard_rows):
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


def test_manifest_relabel_is_served_without_re_embedding(tmp_path, image_root, model_args, run, extract_ok):
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


def test_swapped_files_with_equal_size_and_mtime_are_re_embedded(tmp_path, model_args, run, extract_ok):
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


def test_foreign_files_in_shards_are_left_alone(tmp_path, image_root, model_args, run, extract_ok, one_shard):
    out, ref, _ = one_shard(tmp_path, image_root, model_args, run)
    for name in ("part-xyz.parquet", "part-zzzz-r9-mine.parquet", "notes.txt"):
        (out / "shards" / name).write_text("mine")
    o = extract_ok(run, image_root, out, model_args)
    assert "+0 embedded" in o and "not a shard of this tool" in o and "repaired" not in o
    assert all((out / "shards" / n).read_text() == "mine" for n in ("part-xyz.parquet", "notes.txt"))
    np.testing.assert_array_equal(open_cache(out).features, ref.features)
