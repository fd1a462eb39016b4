"""``extract hf:NAME[:SPLIT]``: a dataset from the local Hugging Face Hub cache, offline. The cache is built in the
test as ``datasets.load_dataset`` leaves it (``hub/datasets--OWNER--NAME/{refs/main, snapshots/<sha>/data/*.parquet}``,
files written by ``datasets`` itself with the ``Image``/``ClassLabel`` features of flwrlabs/pacs): the same cache
as the folder of the same images."""
import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.parquet_source import in_split, parse_hf
from fedclip_cache.synthetic import folder_images, write_image_folder

SHA = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(hf_home, root, name="flwrlabs/pacs", splits=("train",)):
    """The images of ``root`` as ``name``'s Parquet files in a Hub cache under ``hf_home``, made by ``datasets``."""
    datasets = pytest.importorskip("datasets")
    images = folder_images(root)
    classes = sorted({c for _, _, c in images})
    features = datasets.Features({"image": datasets.Image(), "domain": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=classes)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p, _, _ in images],
                                     "domain": [d for _, d, _ in images],
                                     "label": [classes.index(c) for _, _, c in images]}, features=features)
    repo = hf_home / "hub" / f"datasets--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    data = repo / "snapshots" / SHA / "data"
    data.mkdir(parents=True)
    datasets.disable_progress_bars()  # its bars would land in the output the CLI tests read
    for split in splits:
        for k in range(2):
            ds.shard(2, k, contiguous=True).to_parquet(str(data / f"{split}-{k:05d}-of-00002.parquet"),
                                                       batch_size=5)
    datasets.enable_progress_bars()
    return repo


def test_hf_source_equals_folder_offline(tmp_path, model_args, run, extract_ok, monkeypatch):
    root = write_image_folder(tmp_path / "folder")
    write_hub_cache(tmp_path / "hf", root, splits=("train", "test"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    extract_ok(run, root, tmp_path / "c-folder", model_args)
    extract_ok(run, "hf:flwrlabs/pacs:train", tmp_path / "c-hf", model_args)
    a, b = open_cache(tmp_path / "c-folder"), open_cache(tmp_path / "c-hf")
    assert a.classes == b.classes and sorted(a.domain_names) == sorted(b.domain_names) and len(a) == len(b) == 36
    ha, hb = a.column("content_hash").tolist(), b.column("content_hash").tolist()
    order = [hb.index(h) for h in ha]
    np.testing.assert_array_equal(a.features, b.features[order])  # bit-identical on CPU
    assert (a.labels == b.labels[order]).all() and (a.domains == b.domains[order]).all()
    assert b.paths[0].startswith("data/train-00000-of-00002.parquet#")
    assert b.meta["runs"][-1]["source"] == "hf:flwrlabs/pacs:train"
    code, out, err = run("info", tmp_path / "c-hf")
    assert code == 0 and "hf:flwrlabs/pacs:train" in out + err
    o = extract_ok(run, "hf:flwrlabs/pacs", tmp_path / "c-all", model_args)  # every split: train and test
    assert "+72 embedded" in o, o


def test_hf_refusals_are_one_line(tmp_path, model_args, run, one_line_error, monkeypatch):
    root = write_image_folder(tmp_path / "folder", domains=("art",), per_class=1)
    write_hub_cache(tmp_path / "hf", root)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    one_line_error(*run("extract", "hf:flwrlabs/office-home", tmp_path / "c1", *model_args, "-q"),
                   "not in the local Hugging Face cache", "datasets--flwrlabs--office-home", "fedclip-cache[hf]")
    one_line_error(*run("extract", "hf:flwrlabs/pacs:validation", tmp_path / "c2", *model_args, "-q"),
                   "no Parquet file of split 'validation'", "data/train-00000-of-00002.parquet")
    one_line_error(*run("extract", "hf:", tmp_path / "c3", *model_args, "-q"), "expected hf:NAME[:SPLIT]")


def test_split_rule():
    assert parse_hf("hf:flwrlabs/pacs") == ("flwrlabs/pacs", None)
    assert parse_hf("hf:flwrlabs/office-home:train") == ("flwrlabs/office-home", "train")
    assert in_split("data/train-00000-of-00003.parquet", "train")
    assert in_split("default/train/0000.parquet", "train")  # refs/convert/parquet layout
    assert not in_split("data/training-00000.parquet", "train") and not in_split("data/test-0.parquet", "train")
