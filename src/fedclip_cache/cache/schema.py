"""Every per-image column of a cache shard, and the one cache format version.

A shard row is one embedded image: the columns below (in file order: the order is part of the bytes on disk), then
``embedding`` (D values) and, with ``extract --views K``, ``views`` ((K-1) x D values). Each column says

* ``kind``: ``text`` (UTF-8 string; undecodable file-name bytes shown as ``\\xNN``), ``bytes`` (raw binary) or an
  integer numpy dtype name; from it follow the Arrow type (Parquet) and the HDF5 dtype (:func:`arrow_type`,
  :func:`hdf5_dtype`);
* ``scan_field``: the :class:`~fedclip_cache.cache.sources.ImageTable` field it is copied from, or None when the
  writer derives it (``id``, ``path_bytes``, ``label``, ``content_hash``);
* ``scan_owned``: for a cached row the dataset still holds, the current scan's value wins at commit (a manifest may
  relabel a file without touching it), so the shard is rewritten with it;
* ``index``: read back by the writer's inventory (change detection and what the scan may have changed);
* ``category``: few distinct values, so the reader keeps it dictionary-encoded;
* ``placeholder``: the value of rows not made from a scanned file (synthetic caches, a simulated site's cache).

A new column: add it here, fill it in its producer (a scan field of ``sources.ImageTable``, filled by both
scanners, or a writer-derived value in ``writer.py``), read it with ``FeatureCache.column(name)`` (or give it a
named field in ``reader.py``). Shards, compaction at commit, synthetic caches and the readers follow from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

FORMAT_VERSION = 4  # cache.json and every shard: 4 = both carry the cache id
PRE_ID_FORMAT = 3  # before the cache id: read as it is, upgraded in place by the next extract
READ_FORMATS = (PRE_ID_FORMAT, FORMAT_VERSION)


@dataclass(frozen=True)
class Column:
    """One per-image column of a shard (see the module docstring for each attribute)."""

    name: str
    kind: str  # "text", "bytes" or an integer numpy dtype name ("int32", "int64")
    scan_field: Optional[str] = None
    scan_owned: bool = False
    index: bool = False
    category: bool = False
    placeholder: object = ""

    def __post_init__(self) -> None:
        if self.scan_owned and not (self.index and self.scan_field):  # commit compares the stored value with the scan
            raise ValueError(f"column {self.name}: a scan-owned column needs a scan_field and index=True")

    @property
    def is_text(self) -> bool:
        return self.kind == "text"

    @property
    def is_int(self) -> bool:
        return self.kind not in ("text", "bytes")


COLUMNS: tuple[Column, ...] = (
    Column("id", "text", index=True),  # image_id(path): a hash of the path relative to the dataset root
    Column("path", "text", scan_field="relpath", index=True),  # for display; read back lossless from path_bytes
    Column("domain", "text", scan_field="domain", scan_owned=True, index=True, category=True),
    Column("client", "text", scan_field="client", scan_owned=True, index=True, category=True),
    Column("class_name", "text", scan_field="class_name", scan_owned=True, index=True, category=True),
    Column("split", "text", scan_field="split", scan_owned=True, index=True, category=True),
    Column("content_hash", "text", index=True),  # of the bytes that were embedded (imageio.content_hash)
    Column("path_bytes", "bytes"),  # os.fsencode(path): lossless for any file name
    Column("label", "int32", placeholder=0),  # index into the cache's classes when written (the reader re-derives)
    Column("size", "int64", scan_field="size", index=True, placeholder=0),
    Column("mtime_ns", "int64", scan_field="mtime_ns", index=True, placeholder=0),
    Column("ino", "int64", scan_field="ino", scan_owned=True, index=True, placeholder=0),
    Column("ctime_ns", "int64", scan_field="ctime_ns", scan_owned=True, index=True, placeholder=0),
)


def column_names(**where) -> tuple[str, ...]:
    """Names of the columns whose attributes equal ``where`` (e.g. ``scan_owned=True``), in file order."""
    return tuple(c.name for c in COLUMNS if all(getattr(c, k) == v for k, v in where.items()))


def text_columns() -> tuple[str, ...]:
    return column_names(kind="text")


def int_columns() -> dict[str, type]:
    """Integer columns -> their numpy dtype."""
    return {c.name: np.dtype(c.kind).type for c in COLUMNS if c.is_int}


def stored_columns() -> tuple[str, ...]:
    """Every column a shard stores, ``path`` standing for ``path`` and ``path_bytes`` (``store.read_shard`` reads
    the path back from its bytes): what a rewrite reads and writes again."""
    return tuple(c.name for c in COLUMNS if c.name != "path_bytes")


def arrow_type(col: Column):
    import pyarrow as pa

    if col.is_text:
        return pa.string()
    if col.kind == "bytes":
        return pa.binary()
    return pa.from_numpy_dtype(np.dtype(col.kind))


def hdf5_dtype(col: Column):
    import h5py

    if col.is_text:
        return h5py.string_dtype()
    if col.kind == "bytes":
        return h5py.vlen_dtype(np.uint8)
    return np.dtype(col.kind)


def complete_columns(given: dict, n: int) -> dict:
    """``given`` with every other column filled: ``path_bytes`` from ``path``, the rest with its placeholder. For
    caches not made from a scanned dataset (synthetic caches, a simulated site's cache), so that they carry every
    column without naming each."""
    import os

    out = dict(given)
    if "path_bytes" not in out and "path" in out:
        out["path_bytes"] = np.array([os.fsencode(p) for p in out["path"]], dtype=object)
    for c in COLUMNS:
        if c.name not in out:
            out[c.name] = (np.full(n, c.placeholder, np.dtype(c.kind)) if c.is_int
                           else np.full(n, c.placeholder, dtype=object))
    return out
