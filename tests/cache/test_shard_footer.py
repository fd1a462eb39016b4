"""A shard's footer: what its writer stored (``meta``) and what the file holds (rows, width, views), read apart, so
a shard whose metadata disagrees with its data is treated as damaged (removed, its rows re-embedded)."""
import json
import shutil

import h5py

from fedclip_cache.cache import integrity, store
from fedclip_cache.synthetic import write_synthetic_cache


def _tampered_copy(cache, change: dict, seq: int):
    """A copy of the cache's first shard under an unlisted name of a new session (as a killed run leaves one),
    its stored metadata changed by ``change`` and its data left as it was."""
    src = sorted((cache / "shards").iterdir())[0]
    dst = cache / "shards" / store.shard_name("20991231T000000000000", 0, seq, "hdf5")
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        meta = json.loads(f.attrs[store.META_KEY])
        f.attrs[store.META_KEY] = json.dumps({**meta, **change})
    return dst


def test_footer_reads_stored_shape_apart_from_metadata(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 12, "b": 8}, 3, dim=16, fmt="hdf5")
    shard = sorted((cache / "shards").iterdir())[0]
    footer = store.read_shard_footer(shard)
    assert (footer.rows, footer.dim, footer.views_width) == (20, 16, 0)
    assert footer.meta["rows"] == 20 and not any(k.startswith("_") for k in footer.meta)  # only what was stored
    assert store.read_shard_meta(shard) == footer.meta


def test_a_shard_whose_metadata_disagrees_with_its_data_is_removed(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 12, "b": 8}, 3, dim=16, fmt="hdf5")
    meta = json.loads((cache / "cache.json").read_text())
    more_rows = _tampered_copy(cache, {"rows": 21}, 1)
    views = _tampered_copy(cache, {"views": 2}, 2)
    inv = integrity.take_inventory(cache, meta, meta["fingerprint"], 16)
    removed = dict(inv.removed)
    assert "holds 20 rows of width 16, expected 21" in removed[more_rows.name]
    assert "says 2 views per row but stores 0 view values" in removed[views.name]
    assert not more_rows.exists() and not views.exists()
