"""The cache schema: every shard column is declared once in ``cache/schema.py``; a column added there is written by
extract (both formats, and again when commit compacts a shard), by synthetic caches, and read back by the readers,
with no other edit."""
import dataclasses
import os

import numpy as np
import pytest

from fedclip_cache.cache import schema, store
from fedclip_cache.cache.extract import ExtractConfig, extract
from fedclip_cache.cache.models import ModelSpec
from fedclip_cache.cache.reader import open_cache
from fedclip_cache.synthetic import write_image_folder, write_synthetic_cache


def _with_columns(monkeypatch, *extra: schema.Column) -> None:
    monkeypatch.setattr(schema, "COLUMNS", schema.COLUMNS + extra)


def _shard_columns(cache) -> dict[str, np.ndarray]:
    """Every stored column of every shard file, concatenated in file-name order (read with the store)."""
    meta = store.read_meta(cache)
    parts = [store.read_shard(cache / store.SHARD_DIR / n, schema.stored_columns(), False, meta["embedding_dim"])[0]
             for n in sorted(meta["shards"])]
    return {c: np.concatenate([p[c] for p in parts]) for c in schema.stored_columns()}


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_a_column_added_to_the_schema_is_written_compacted_and_read(tmp_path, tiny_model, monkeypatch, fmt):
    _with_columns(monkeypatch,
                  schema.Column("domain_copy", "text", scan_field="domain", scan_owned=True, index=True),
                  schema.Column("size_copy", "int64", scan_field="size", placeholder=-1))
    data = write_image_folder(tmp_path / "data", per_class=2)
    cfg_file, ckpt = tiny_model
    cfg = ExtractConfig(source=str(data), out=str(tmp_path / "c"), format=fmt, device="cpu", workers=0,
                        progress=False, shard_size=7,
                        model=ModelSpec(model="tiny-clip", pretrained=str(ckpt), model_config=str(cfg_file)))
    extract(cfg)
    cols = _shard_columns(tmp_path / "c")
    assert len(cols["id"]) == 18
    assert cols["domain_copy"].tolist() == cols["domain"].tolist()
    assert cols["size_copy"].tolist() == cols["size"].tolist() and cols["size_copy"].dtype == np.int64
    c = open_cache(tmp_path / "c")
    assert c.column("domain_copy").tolist() == c.domains.tolist()
    assert c.column("size_copy").tolist() == [os.path.getsize(data / p) for p in c.paths]

    # A renamed domain folder retires its rows (new paths, new ids): the shards that mixed them with kept rows are
    # compacted, and the new columns travel with every kept row.
    (data / "art").rename(data / "painting")
    extract(cfg)
    cols = _shard_columns(tmp_path / "c")
    assert sorted(set(cols["domain_copy"].tolist())) == ["painting", "photo", "sketch"]
    assert cols["domain_copy"].tolist() == cols["domain"].tolist()
    assert cols["size_copy"].tolist() == cols["size"].tolist()
    assert any(n.split("-")[3].startswith("c") for n in store.read_meta(tmp_path / "c")["shards"])  # compacted

    write_synthetic_cache(tmp_path / "s", {"a": 3, "b": 2}, 2, dim=8, fmt=fmt, shard_rows=2)
    s = open_cache(tmp_path / "s")
    assert s.column("domain_copy").tolist() == [""] * 5  # the placeholder of a row not made from a scan
    assert s.column("size_copy").tolist() == [-1] * 5


def test_shard_files_store_the_schema_columns_in_schema_order(tmp_path):
    write_synthetic_cache(tmp_path / "p", {"a": 3}, 2, dim=8, fmt="parquet")
    write_synthetic_cache(tmp_path / "h", {"a": 3}, 2, dim=8, fmt="hdf5")
    import h5py
    import pyarrow.parquet as pq

    names = [c.name for c in schema.COLUMNS]
    shard = next((tmp_path / "p" / store.SHARD_DIR).iterdir())
    arrow = pq.read_schema(shard)
    assert arrow.names == names + ["embedding"]
    assert [str(arrow.field(c.name).type) for c in schema.COLUMNS] == [str(schema.arrow_type(c))
                                                                        for c in schema.COLUMNS]
    with h5py.File(next((tmp_path / "h" / store.SHARD_DIR).iterdir())) as f:
        assert sorted(f) == sorted(names + ["embedding"])
        assert [f[c.name].dtype for c in schema.COLUMNS if c.is_int] == [np.dtype(c.kind) for c in schema.COLUMNS
                                                                       if c.is_int]


def test_a_scan_owned_column_must_be_an_indexed_scan_field():
    with pytest.raises(ValueError, match="scan-owned"):
        schema.Column("x", "text", scan_owned=True)
    with pytest.raises(ValueError, match="scan-owned"):
        schema.Column("x", "text", scan_field="domain", scan_owned=True)


def test_every_scan_field_is_an_image_table_field():
    from fedclip_cache.cache.sources import ImageTable

    fields = {f.name for f in dataclasses.fields(ImageTable)}
    assert {c.scan_field for c in schema.COLUMNS if c.scan_field} <= fields


def test_unknown_column_is_refused(tmp_path):
    write_synthetic_cache(tmp_path / "s", {"a": 3}, 2, dim=8)
    with pytest.raises(ValueError, match="not a cache column"):
        open_cache(tmp_path / "s").column("nope")
