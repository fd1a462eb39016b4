"""Parquet files whose image column holds the bytes (the Hugging Face layout of flwrlabs/pacs) as an extract source:
the same cache as the folder of the same images, resumable and incremental by row (a changed row re-embedded, a
removed file's rows retired), bad bytes skipped and listed by file and row, and one-line refusals."""
import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedclip_cache import open_cache
from fedclip_cache.synthetic import folder_images, write_hf_parquet, write_image_folder


def by_hash(cache) -> dict:
    """content hash of the image bytes -> (feature row, label, class name, domain): rows of two caches matched by
    what was embedded (the test images are noise, so no two share bytes)."""
    h = cache.column("content_hash")
    return {d: (cache.features[i], cache.classes[int(cache.labels[i])], str(cache.domains[i]))
            for i, d in enumerate(h.tolist())}


def assert_same_cache(a, b) -> None:
    """Same classes, domains, and for every image bit-identical features and labels."""
    assert a.classes == b.classes and sorted(a.domain_names) == sorted(b.domain_names) and len(a) == len(b)
    ra, rb = by_hash(a), by_hash(b)
    assert ra.keys() == rb.keys()
    for k, (fa, ya, da) in ra.items():
        fb, yb, db = rb[k]
        assert ya == yb and da == db
        np.testing.assert_array_equal(fa, fb)  # bit-identical on CPU


@pytest.fixture
def pacs_like(tmp_path):
    """(folder, Parquet folder in the Hub's data/ layout) of the same 36 images, two files of 5-row row groups."""
    root = write_image_folder(tmp_path / "folder")
    write_hf_parquet(root, tmp_path / "pq" / "data", files=2, row_group_size=5)
    return root, tmp_path / "pq"


def test_pacs_schema_parquet_equals_folder(tmp_path, pacs_like, model_args, run, extract_ok):
    root, pqdir = pacs_like
    schema = pq.read_schema(next((pqdir / "data").glob("*.parquet")))
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["label"]["_type"] == "ClassLabel"
    extract_ok(run, root, tmp_path / "c-folder", model_args)
    extract_ok(run, pqdir, tmp_path / "c-pq", model_args)
    folder, parquet = open_cache(tmp_path / "c-folder"), open_cache(tmp_path / "c-pq")
    assert_same_cache(folder, parquet)
    assert parquet.paths[0].startswith("data/train-00000-of-00002.parquet#")
    # one file, and a glob, are the same source forms
    extract_ok(run, pqdir / "data" / "train-00001-of-00002.parquet", tmp_path / "c-one", model_args)
    assert len(open_cache(tmp_path / "c-one")) == 18
    extract_ok(run, str(pqdir / "data" / "train-*.parquet"), tmp_path / "c-glob", model_args)
    assert_same_cache(folder, open_cache(tmp_path / "c-glob"))


def test_classlabel_order_is_the_label_index(tmp_path, model_args, run, extract_ok):
    """Class names come from the ClassLabel metadata in its order (label = index), even when not sorted and when a
    class has no row; a plain binary image column with string labels and no domain column is one domain."""
    root = write_image_folder(tmp_path / "folder", domains=("art",), classes=("cat", "dog"), per_class=2)
    imgs = folder_images(root)
    names = ["zebra", "dog", "cat"]
    meta = {"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}}
    t = pa.table({"img": [p.read_bytes() for p, _, _ in imgs], "label": [names.index(c) for _, _, c in imgs]})
    pq.write_table(t.replace_schema_metadata({b"huggingface": json.dumps(meta)}), tmp_path / "x.parquet")
    extract_ok(run, tmp_path / "x.parquet", tmp_path / "c", model_args, "--image-column", "img")
    c = open_cache(tmp_path / "c")
    assert c.classes == names and c.domain_names == ["x"]  # named after the file
    assert [c.classes[y] for y in c.labels] == [cl for _, _, cl in imgs]
    (tmp_path / "classes.txt").write_text("dog\ncat\n")  # --classes need not list a ClassLabel name without rows
    extract_ok(run, tmp_path / "x.parquet", tmp_path / "c3", model_args, "--image-column", "img", "--classes",
               tmp_path / "classes.txt")
    assert open_cache(tmp_path / "c3").classes == ["dog", "cat"]
    t2 = pa.table({"img": [p.read_bytes() for p, _, _ in imgs], "label": [c for _, _, c in imgs]})
    pq.write_table(t2, tmp_path / "s.parquet")
    extract_ok(run, tmp_path / "s.parquet", tmp_path / "c2", model_args, "--image-column", "img", "--domain", "clipart")
    c2 = open_cache(tmp_path / "c2")
    assert c2.classes == ["cat", "dog"] and c2.domain_names == ["clipart"]


def test_domain_option_selects_one_domain(tmp_path, pacs_like, model_args, run, extract_ok):
    """With a domain column, --domain extracts only that domain's rows (a site's own cache)."""
    _, pqdir = pacs_like
    extract_ok(run, pqdir, tmp_path / "c", model_args, "--domain", "photo")
    c = open_cache(tmp_path / "c")
    assert c.domain_names == ["photo"] and len(c) == 12 and c.classes == ["cat", "dog", "fish"]


def test_changed_row_is_the_only_one_re_embedded_and_removed_file_retired(tmp_path, pacs_like, model_args, run,
                                                                         extract_ok):
    root, pqdir = pacs_like
    out = tmp_path / "c"
    extract_ok(run, pqdir, out, model_args)
    before = open_cache(out)
    b_paths, b_hash, b_feat = list(before.paths), before.column("content_hash"), before.features
    f = pqdir / "data" / "train-00001-of-00002.parquet"
    t = pq.read_table(f)
    rows = t.column("image").to_pylist()
    rows[3] = {"bytes": (root / "art" / "cat" / "art_cat_0000.png").read_bytes(), "path": "replaced.png"}
    pq.write_table(t.set_column(0, t.schema.field("image"), pa.array(rows, t.schema.field("image").type)), f,
                   row_group_size=5)
    o = extract_ok(run, pqdir, out, model_args)
    assert "+1 embedded" in o and "35 already cached (1 changed" in o, o
    after = open_cache(out)
    changed = f"data/{f.name}#3"
    i, j = b_paths.index(changed), list(after.paths).index(changed)
    a_hash = after.column("content_hash")
    assert a_hash[j] != b_hash[i]
    k = list(after.paths).index("data/train-00000-of-00002.parquet#0")
    assert a_hash[k] == a_hash[j]  # the same image now in two rows: embedded alike in both
    np.testing.assert_allclose(after.features[j], after.features[k], rtol=1e-5, atol=1e-6)  # other batch
    same = [p for p in b_paths if p != changed]
    np.testing.assert_array_equal(b_feat[[b_paths.index(p) for p in same]],
                                  after.features[[list(after.paths).index(p) for p in same]])
    f.unlink()
    o = extract_ok(run, pqdir, out, model_args)
    assert "18 retired" in o, o
    assert len(open_cache(out)) == 18


def test_corrupt_bytes_skip_that_row_only(tmp_path, pacs_like, model_args, run, extract_ok):
    _, pqdir = pacs_like
    f = pqdir / "data" / "train-00000-of-00002.parquet"
    t = pq.read_table(f)
    rows = t.column("image").to_pylist()
    rows[7] = {"bytes": b"\x89PNG\r\n\x1a\n not a png at all", "path": "broken.png"}
    rows[8] = {"bytes": None, "path": "nothing.png"}
    pq.write_table(t.set_column(0, t.schema.field("image"), pa.array(rows, t.schema.field("image").type)), f)
    o = extract_ok(run, pqdir, tmp_path / "c", model_args)
    assert "+34 embedded, 2 skipped" in o, o
    c = open_cache(tmp_path / "c")
    skipped = {s["path"]: s["reason"] for s in c.skipped}
    assert set(skipped) == {f"data/{f.name}#7", f"data/{f.name}#8"}, skipped
    assert "not an image" in skipped[f"data/{f.name}#7"] and "no image bytes" in skipped[f"data/{f.name}#8"]
    o = extract_ok(run, pqdir, tmp_path / "c", model_args)
    assert "+0 embedded" in o  # permanent skips are not retried while the bytes are the same


@pytest.mark.slow  # > 10 s: extract subprocesses, one killed
def test_resume_after_sigkill_mid_parquet(tmp_path, model_args, kill_after_shards, run, extract_ok):
    root = write_image_folder(tmp_path / "folder", per_class=8)  # 72 images
    write_hf_parquet(root, tmp_path / "pq", files=2, row_group_size=7)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedclip_cache", "extract", str(tmp_path / "pq"), str(out), *model_args,
           "--workers", "0", "-q", "--batch-size", "4", "--shard-size", "4"]
    committed = kill_after_shards(cmd, out)
    assert 3 <= committed < 18, "the kill must land mid-run"
    o = extract_ok(run, tmp_path / "pq", out, model_args, "--batch-size", "4", "--shard-size", "4")
    assert f"{4 * committed} already cached" in o or "already cached" in o
    assert len(list((out / "shards").glob("*.parquet"))) == 18  # nothing was extracted twice
    extract_ok(run, root, tmp_path / "clean", model_args, "--batch-size", "4")
    assert_same_cache(open_cache(tmp_path / "clean"), open_cache(out))


def test_views_and_classes_work_on_parquet(tmp_path, pacs_like, model_args, run, extract_ok):
    root, pqdir = pacs_like
    (tmp_path / "classes.txt").write_text("fish\ncat\ndog\nbird\n")
    extract_ok(run, pqdir, tmp_path / "c", model_args, "--views", "2", "--classes", tmp_path / "classes.txt")
    extract_ok(run, root, tmp_path / "f", model_args, "--views", "2", "--classes", tmp_path / "classes.txt")
    c, f = open_cache(tmp_path / "c"), open_cache(tmp_path / "f")
    assert c.classes == ["fish", "cat", "dog", "bird"] and c.num_views == 2
    assert_same_cache(f, c)  # view 0 equal to the folder's


def test_refusals_are_one_line(tmp_path, pacs_like, image_root, model_args, run, one_line_error):
    _, pqdir = pacs_like
    pq.write_table(pa.table({"picture": [b"x"], "label": [1]}), tmp_path / "noimg.parquet")
    one_line_error(*run("extract", tmp_path / "noimg.parquet", tmp_path / "c1", *model_args, "-q"),
                   "noimg.parquet", "no image column 'image'", "--image-column")
    one_line_error(*run("extract", pqdir, tmp_path / "c2", *model_args, "-q", "--label-column", "category"),
                   "no column 'category' for --label-column", "columns: image, domain, label")
    one_line_error(*run("extract", pqdir, tmp_path / "c3", *model_args, "-q", "--domain-column", "site"),
                   "no column 'site' for --domain-column")
    one_line_error(*run("extract", pqdir, tmp_path / "c4", *model_args, "-q", "--domain", "nowhere"),
                   "no row of --domain 'nowhere'")
    one_line_error(*run("extract", image_root, tmp_path / "c5", *model_args, "-q", "--label-column", "y"),
                   "are for Parquet, hf: and WebDataset sources")
    one_line_error(*run("extract", tmp_path / "x" / "*.parquet", tmp_path / "c6", *model_args, "-q"),
                   "match no file")
    one_line_error(*run("extract", pqdir, tmp_path / "c7", *model_args, "-q", "--image-column", ""),
                   "--image-column", "cannot be empty")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    one_line_error(*run("extract", tmp_path / "bad.parquet", tmp_path / "c8", *model_args, "-q"), "bad.parquet")
    for c in ("c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"):
        assert not (tmp_path / c / "shards").exists() or not any((tmp_path / c / "shards").iterdir())


def test_parquet_with_path_column_is_still_a_manifest(tmp_path, image_root, model_args, run, extract_ok):
    rows = sorted(str(p.relative_to(tmp_path)) for p in image_root.rglob("*.png"))
    pq.write_table(pa.table({"path": rows, "label": [r.split("/")[-2] for r in rows],
                             "domain": [r.split("/")[-3] for r in rows]}), tmp_path / "m.parquet")
    extract_ok(run, tmp_path / "m.parquet", tmp_path / "c", model_args)
    c = open_cache(tmp_path / "c")
    assert len(c) == 36 and not any("#" in p for p in c.paths)
    shutil.rmtree(tmp_path / "c")


def test_cache_inside_the_parquet_folder_is_not_data(tmp_path, pacs_like, model_args, run, extract_ok):
    """The cache's own Parquet shards, written inside the source folder, are never read as rows."""
    _, pqdir = pacs_like
    extract_ok(run, pqdir, pqdir / "cache", model_args)
    o = extract_ok(run, pqdir, pqdir / "cache", model_args)
    assert "+0 embedded" in o and "36 already cached" in o, o


def test_a_folder_whose_name_looks_like_a_pattern_is_still_a_folder(tmp_path, model_args, run, extract_ok):
    root = write_image_folder(tmp_path / "PACS [v2]", domains=("art",), per_class=1)
    extract_ok(run, root, tmp_path / "c", model_args)
    assert len(open_cache(tmp_path / "c")) == 3


def test_pipeline_source_key(tmp_path, one_line_error):
    """A pipeline's [pipeline] source names any extract source; relative paths live under --base-dir."""
    from fedclip_cache.errors import FedclipCacheError
    from fedclip_cache.pipeline import load, pipeline_source

    for src in ("hf:flwrlabs/pacs", "pq/data", "wds/{00000..00009}.tar"):
        (tmp_path / "p.toml").write_text(f'[pipeline]\nname = "p"\nsource = "{src}"\n')
        assert load(tmp_path / "p.toml")["pipeline"]["source"] == src
    (tmp_path / "p.toml").write_text('[pipeline]\nname = "p"\nsource = " "\n')
    with pytest.raises(FedclipCacheError, match="source"):
        load(tmp_path / "p.toml")
    assert pipeline_source("hf:flwrlabs/pacs", tmp_path) == "hf:flwrlabs/pacs"
    assert pipeline_source("wds/{0..1}.tar", tmp_path) == str(tmp_path / "wds" / "{0..1}.tar")
    assert pipeline_source(None, tmp_path) is None
