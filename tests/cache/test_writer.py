"""The shard writer: a shard once ``shard_size`` images were attempted (embedded or skipped) when rows are added,
each row's columns from the scan and the writer, the skip records in the shard's own metadata."""
import os

import numpy as np

from fedclip_cache.cache import schema, store
from fedclip_cache.cache.sources import scan
from fedclip_cache.cache.writer import RowSource, ShardTarget, ShardWriter
from fedclip_cache.synthetic import write_image_folder


def test_shards_hold_every_attempted_image_once_with_their_columns(tmp_path):
    table = scan(write_image_folder(tmp_path / "data", per_class=1))  # 9 images
    classes = table.classes
    source = RowSource(table, table.ids, np.array([classes.index(c) for c in table.class_name], np.int32),
                       np.array([os.fsencode(p) for p in table.relpath], dtype=object))
    target = ShardTarget(tmp_path / "c", "parquet", "float16", 4, "20260101T000000000000", 0, store.new_cache_id(),
                         {"model": "m"}, 3)
    writer = ShardWriter(target, source)
    emb = np.arange(27, dtype=np.float32).reshape(9, 3)
    writer.add(np.arange(3), emb[:3], np.array(["h0", "h1", "h2"], dtype=object))
    writer.skip(3, "broken", transient=True)
    writer.add(np.arange(4, 5), emb[4:5], np.array(["h4"], dtype=object))  # 4 embedded + 1 skipped >= 4: shard 0
    writer.add(np.arange(5, 9), emb[5:], np.array([f"h{i}" for i in range(5, 9)], dtype=object))  # 4: shard 1
    writer.flush()  # nothing left: no third shard
    shards = store.shard_files(tmp_path / "c", "parquet")
    assert [p.name for p in shards] == [target.shard_name(0), target.shard_name(1)]
    first, second = (store.read_shard(p, schema.stored_columns(), True, 3) for p in shards)
    assert first[0]["id"].tolist() == table.ids[[0, 1, 2, 4]].tolist()
    assert second[0]["id"].tolist() == table.ids[5:].tolist()
    assert first[0]["path"].tolist() == table.relpath[[0, 1, 2, 4]].tolist()
    assert first[0]["content_hash"].tolist() == ["h0", "h1", "h2", "h4"]
    assert second[0]["label"].tolist() == source.labels[5:].tolist()
    assert second[0]["ino"].tolist() == table.ino[5:].tolist()
    assert np.array_equal(second[1], emb[5:].astype(np.float16))  # stored in the cache's dtype
    skipped = store.read_shard_meta(shards[0])["skipped"]
    assert [(r["id"], r["kind"], r["reason"]) for r in skipped] == [(table.ids[3], "transient", "broken")]
    assert store.read_shard_meta(shards[1])["skipped"] == []
