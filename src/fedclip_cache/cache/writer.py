"""Writer of the extract stage: buffer embedded rows and skip records, commit a shard every ``shard_size`` images.

Each shard is written whole and atomically (``store.write_shard``); which shards make up the cache is decided at the
end of the run (``commit.py``). The columns of a row come from :mod:`.schema`: a column with a ``scan_field`` is
copied from the scanned :class:`~.sources.ImageTable`, the others are derived here (:meth:`RowSource.columns`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import schema, store
from .sources import ImageTable


@dataclass(frozen=True)
class ShardTarget:
    """Where and how this run writes its shards."""

    out: Path  # the cache folder
    fmt: str  # parquet or hdf5
    dtype: str  # float32 or float16
    shard_size: int  # attempted images per shard
    session: str  # this run's session (shard names sort by it)
    rank: int  # this process's rank in a torchrun group (0 alone)
    cache_id: str
    fingerprint: dict
    dim: int
    views: Optional[dict] = None  # the cache's views record when it holds K > 1 views per image
    delay: float = 0.0  # seconds to sleep after each shard (a test hook that widens the crash window)

    def shard_name(self, seq: int) -> str:
        return store.shard_name(self.session, self.rank, seq, self.fmt)


@dataclass(frozen=True)
class RowSource:
    """The images this process embeds: scanned rows, their ids, labels (class index) and file-name bytes."""

    rows: ImageTable
    ids: np.ndarray
    labels: np.ndarray
    path_bytes: np.ndarray

    def columns(self, idx: np.ndarray, content_hash: np.ndarray) -> dict[str, np.ndarray]:
        """Every shard column (``schema.COLUMNS``) of rows ``idx``, whose bytes hashed to ``content_hash``."""
        derived = {"id": self.ids[idx], "path_bytes": self.path_bytes[idx], "label": self.labels[idx],
                   "content_hash": content_hash}
        return {c.name: getattr(self.rows, c.scan_field)[idx] if c.scan_field else derived[c.name]
                for c in schema.COLUMNS}

    def skip_record(self, i: int, reason: str, transient: bool) -> dict:
        r = self.rows
        return {"id": self.ids[i], "path": str(r.relpath[i]), "reason": reason,
                "kind": "transient" if transient else "permanent", "size": int(r.size[i]),
                "mtime_ns": int(r.mtime_ns[i]), "ino": int(r.ino[i]), "ctime_ns": int(r.ctime_ns[i])}


@dataclass(frozen=True)
class CachedRows:
    """Where cached rows that only get new views live now: for each, its ``shard``, ``position`` in it, the number
    of views it holds (``held``) and the ``content_hash`` that was embedded."""

    shard: np.ndarray  # str
    position: np.ndarray  # int64
    held: np.ndarray  # int64
    content_hash: np.ndarray  # str

    @classmethod
    def empty(cls) -> "CachedRows":
        return cls(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, object))

    def __getitem__(self, sel) -> "CachedRows":
        return CachedRows(self.shard[sel], self.position[sel], self.held[sel], self.content_hash[sel])

    def __len__(self) -> int:
        return len(self.shard)


class ShardWriter:
    """Buffers embedded rows and skip records; commits a shard every ``shard_size`` attempted images. With views,
    each row carries its K-1 augmented views; rows being extended copy their view 0 and older views from the shard
    that holds them (``cached``: where the rows ``n_full``, ``n_full + 1``, ... of ``source`` live)."""

    def __init__(self, target: ShardTarget, source: RowSource, n_full: int = 0,
                 cached: Optional[CachedRows] = None):
        self.target, self.source = target, source
        self.n_full, self.cached = n_full, cached if cached is not None else CachedRows.empty()
        self._old: dict[str, tuple] = {}  # the last shards read for extensions: name -> (embedding, views)
        self.idx: list[np.ndarray] = []
        self.emb: list[np.ndarray] = []
        self.views: list[np.ndarray] = []
        self.digests: list[np.ndarray] = []
        self.skipped: list[dict] = []
        self.embedded = 0
        self.seq = 0

    def add(self, idx: np.ndarray, emb: np.ndarray, digests: np.ndarray, views: np.ndarray | None = None) -> None:
        self.idx.append(idx)
        self.emb.append(emb)
        self.digests.append(digests)
        if self.target.views is not None:
            self.views.append(views)
        self.embedded += len(idx)
        if self.embedded + len(self.skipped) >= self.target.shard_size:
            self.flush()

    def _old_rows(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._old:
            if len(self._old) >= 2:  # rows to extend come in path order, as the shards hold them: keep two
                self._old.pop(next(iter(self._old)))
            path = self.target.out / store.SHARD_DIR / name
            _, emb = store.read_shard(path, (), True, self.target.dim)
            self._old[name] = (emb, store.read_shard_views(path, self.target.dim))
        return self._old[name]

    def extend(self, idx: np.ndarray, new: np.ndarray, digests: np.ndarray) -> int:
        """Rows already cached with fewer views: keep their view 0 and views, append ``new``. A file whose bytes
        no longer match what was embedded is skipped as transient (the next run re-embeds it whole)."""
        where = self.cached[idx - self.n_full]
        same = np.array([not o or d == o for d, o in zip(digests.tolist(), where.content_hash.tolist())], bool)
        for i in idx[~same].tolist():
            self.skip(i, "the file changed while its views were added; re-run to re-embed it", True)
        idx, new, where, digests = idx[same], new[same], where[same], digests[same]
        if not len(idx):
            return 0
        dim = self.target.dim
        emb = np.empty((len(idx), dim), np.float32)
        views = np.empty((len(idx), self.target.views["count"] - 1, dim), np.float32)
        for name in dict.fromkeys(where.shard.tolist()):
            at = np.flatnonzero(where.shard == name)
            old_emb, old_views = self._old_rows(name)
            pos = where.position[at]
            emb[at] = old_emb[pos]
            h = int(where.held[at[0]])
            views[at, :h - 1] = old_views[pos, :h - 1]
            views[at, h - 1:] = new[at]
        self.add(idx, emb, digests, views)
        return len(idx)

    def skip(self, i: int, reason: str, transient: bool) -> None:
        self.skipped.append(self.source.skip_record(i, reason, transient))

    def flush(self) -> None:
        if not self.embedded and not self.skipped:
            return
        t = self.target
        idx = np.concatenate(self.idx) if self.idx else np.zeros(0, np.int64)
        emb = np.concatenate(self.emb) if self.emb else np.zeros((0, t.dim), np.float32)
        digests = np.concatenate(self.digests) if self.digests else np.zeros(0, object)
        smeta = {"fingerprint": t.fingerprint, "session": t.session, "cache_id": t.cache_id, "skipped": self.skipped}
        views = None
        if t.views is not None:
            k = t.views["count"]
            views = np.concatenate(self.views) if self.views else np.zeros((0, k - 1, t.dim), np.float32)
            smeta.update(augment=t.views["augment"], augment_seed=t.views["seed"])
        store.write_shard(t.out / store.SHARD_DIR / t.shard_name(self.seq), t.fmt, self.source.columns(idx, digests),
                          emb, t.dtype, smeta, views)
        self.seq += 1
        self.idx, self.emb, self.views, self.digests, self.skipped, self.embedded = [], [], [], [], [], 0
        if t.delay:
            time.sleep(t.delay)
