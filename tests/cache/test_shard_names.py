"""cache/store.py's shard file names: every name the writers produce (extract's shards, the commit's compacted
ones, caches written in one go) is one the readers accept, and names its session."""
import pytest

from fedclip_cache.cache import store
from fedclip_cache.cache.integrity import session_of


@pytest.mark.parametrize("fmt", sorted(store.FORMATS))
@pytest.mark.parametrize("compacted", [False, True])
def test_a_written_shard_name_is_accepted_and_names_its_session(fmt, compacted):
    name = store.shard_name("20260101T120000123456", 3, 42, fmt, compacted)
    assert name == f"part-20260101T120000123456-r003-{'c' if compacted else ''}00042{store.FORMATS[fmt]}"
    assert store.is_shard_name(name, fmt)
    assert not store.is_shard_name(name, next(f for f in store.FORMATS if f != fmt))
    assert session_of(name) == "20260101T120000123456"


def test_the_fixed_session_of_caches_written_in_one_go_is_a_valid_session():
    assert store.is_shard_name(store.shard_name(store.FIXED_SESSION, 0, 0, "parquet"), "parquet")
