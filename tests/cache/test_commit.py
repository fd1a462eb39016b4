"""The commit of an extract (cache.json written last, old shards deleted after it): a kill on either side of it
is repaired by the next run, and no retired row is ever served or left in the shard files."""
import os
from pathlib import Path

import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.store import CacheError


@pytest.mark.parametrize("crash_at", ["before_commit", "after_commit"])
def test_crash_around_the_commit_never_serves_retired_rows(tmp_path, image_root, model_args, run, monkeypatch,
                                                           crash_at, extract_ok, shard_rows):
    """A kill between compaction and the commit, or between the commit and deleting old shards, is repaired by the
    next run: no retired row comes back, nothing is duplicated."""
    from fedclip_cache.cache import commit as commit_mod

    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args, "--batch-size", "4", "--shard-size", "12")
    (image_root / "art/cat/art_cat_0001.png").unlink()
    os.rename(image_root / "photo/dog/photo_dog_0000.png", image_root / "photo/cat/photo_dog_0000.png")
    real_write, real_unlink = commit_mod.store.write_json, Path.unlink

    def write_json(path, obj):
        if obj.get("state") == "complete" and crash_at == "before_commit":
            raise KeyboardInterrupt("killed before the commit")
        real_write(path, obj)

    def unlink(self, missing_ok=False):
        if self.parent.name == "shards" and crash_at == "after_commit":
            raise KeyboardInterrupt("killed after the commit")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(commit_mod.store, "write_json", write_json)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        from fedclip_cache.cache.extract import ExtractConfig, extract
        from fedclip_cache.cache.models import ModelSpec
        extract(ExtractConfig(str(image_root), str(out), ModelSpec(model_config=model_args[1],
                                                                   pretrained=model_args[3]), workers=0,
                              progress=False, batch_size=4, shard_size=12))
    monkeypatch.undo()
    on_disk = sorted(str(p.relative_to(image_root)) for p in image_root.rglob("*.png"))
    if crash_at == "before_commit":
        with pytest.raises(CacheError, match="incomplete"):
            open_cache(out)
    else:  # committed: readers already serve exactly the files on disk, although old shards are still there
        assert sorted(open_cache(out).paths.tolist()) == on_disk and shard_rows(out)["n"] > len(on_disk)
    extract_ok(run, image_root, out, model_args, "--batch-size", "4", "--shard-size", "12")
    c = open_cache(out)
    assert sorted(c.paths.tolist()) == on_disk
    assert shard_rows(out)["paths"] == on_disk  # the shard files too: no stale copy left behind
