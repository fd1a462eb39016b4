"""Reader API: open a cache (Parquet or HDF5) and get numpy arrays, without per-row Python work.

    >>> from fedclip_cache import open_cache
    >>> c = open_cache("cache/pacs")
    >>> c.features.shape, c.labels.shape, c.text_embeddings.shape   # (N, D), (N,), (T, C, D)

Only a complete cache is served (see ``integrity.py``): an extract that was killed or is still running, a missing
or truncated shard, or damaged metadata is a one-line :class:`~fedclip_cache.store.CacheError` naming the file and
the fix. The feature matrix is read on first use of ``features``, straight into one float32 array (no intermediate
copies), so metadata-only uses (``info``, counts, splits) never touch the embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import integrity, store


@dataclass
class FeatureCache:
    path: Path
    meta: dict
    ids: np.ndarray
    paths: np.ndarray  # str per row; undecodable file-name bytes as surrogate escapes (os.fsencode is lossless)
    domains: np.ndarray  # str per row
    clients: np.ndarray
    class_names: np.ndarray  # str per row
    labels: np.ndarray  # int64 index into `classes`
    splits: np.ndarray  # "" when the source gave none
    classes: list[str]
    templates: list[str]
    text_embeddings: np.ndarray  # (T, C, D) raw encode_text output
    skipped: list[dict] = field(default_factory=list)
    complete: bool = True  # False only when opened with allow_incomplete on an unfinished cache
    incomplete_reason: str = ""
    _features: Optional[np.ndarray] = field(default=None, repr=False)
    _sources: list = field(default_factory=list, repr=False)  # (shard path, source rows, destination rows)

    @property
    def features(self) -> np.ndarray:
        """(N, D) float32, raw encode_image output (not normalised); read from the shards on first use."""
        if self._features is None:
            self._features = self._read_features()
        return self._features

    @features.setter
    def features(self, value: np.ndarray) -> None:
        self._features = value

    def _read_features(self) -> np.ndarray:
        gone = [str(s) for s, *_ in self._sources if not Path(s).is_file()]
        if gone:
            raise store.CacheError(f"{gone[0]}: the cache changed since it was opened (an extract ran); open it "
                                   f"again")
        out = np.empty((len(self.labels), self.dim), np.float32)
        for shard, src, dst, rows in self._sources:
            if not len(src):
                continue
            if len(src) == rows and (np.diff(dst) == 1).all():  # the usual case: straight into place, no copy
                store.read_shard_embedding_into(shard, out[dst[0]:dst[0] + rows])
                continue
            buf = np.empty((rows, self.dim), np.float32)
            store.read_shard_embedding_into(shard, buf)
            out[dst] = buf[src]
        return out

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])

    @property
    def domain_names(self) -> list[str]:
        return sorted(set(self.domains.tolist()))

    @property
    def client_names(self) -> list[str]:
        return sorted(set(self.clients.tolist()))

    @property
    def model_params(self) -> int | None:
        return self.meta.get("model", {}).get("num_params")

    def counts(self) -> dict[str, dict[str, int]]:
        """domain -> class -> image count."""
        out: dict[str, dict[str, int]] = {}
        for d in self.domain_names:
            lab = self.labels[self.domains == d]
            bc = np.bincount(lab, minlength=len(self.classes))
            out[d] = {c: int(n) for c, n in zip(self.classes, bc)}
        return out


_COLUMNS = ("id", "path", "domain", "client", "class_name", "split")


def open_cache(path: str | Path, allow_incomplete: bool = False, verify: bool = False,
               load_features: bool = True) -> FeatureCache:
    """Open a complete cache. ``allow_incomplete`` serves what an unfinished extract has committed so far (newest
    row per image); ``verify`` re-hashes every shard against the checksums of the commit; ``load_features=False``
    reads metadata only and defers the feature matrix to the first use of ``.features`` (an extract that changes
    the cache in between makes that a CacheError: open it again)."""
    path = Path(path)
    meta = store.read_meta(path)
    plan = integrity.plan_read(path, meta, allow_incomplete, verify)
    templates, classes, text = store.read_text(path, meta["format"])
    dim = int(meta["embedding_dim"])
    if text.shape[-1] != dim:
        raise store.CacheError(f"{path}/text{store.FORMATS[meta['format']]}: width {text.shape[-1]}, the cache's is "
                               f"{dim}; re-run the same extract command to rebuild it")
    parts, sizes = [], []
    for shard in plan.shards:
        cols, _ = store.read_shard(shard, _COLUMNS, False, dim)
        parts.append(cols)
        sizes.append(len(cols["id"]))
    cols = {c: (np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, object)) for c in _COLUMNS}
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    row_in_shard = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, np.int64)
    keep = np.arange(len(cols["id"]))
    if plan.dedupe:  # unfinished cache: uncommitted shards may repeat ids; the newest (last) row wins
        _, first_from_end = np.unique(cols["id"][::-1], return_index=True)
        keep = np.sort(len(keep) - 1 - first_from_end)
    elif len(np.unique(cols["id"])) != len(keep):
        raise store.CacheError(f"{path}: the committed shards repeat an image; re-run the same extract command to "
                               f"repair the cache")
    if not len(keep):
        raise store.CacheError(f"{path}: the cache holds no images; run extract to fill it")
    # Canonical order (by relative path) so that caches written by 1 or N processes, in any shard order, give
    # the same arrays.
    sel = keep[np.argsort(cols["path"][keep].astype(str), kind="stable")]
    cls = {c: v[sel] for c, v in cols.items()}
    # Labels come from class names against the cache's current class list.
    lookup = {c: i for i, c in enumerate(classes)}
    names, inv = np.unique(cls["class_name"].astype(str), return_inverse=True)
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise store.CacheError(f"{path}: rows of class {unknown[0]!r} that the cache's class list lacks; re-run the "
                               f"same extract command to repair the cache")
    labels = np.array([lookup[n] for n in names], np.int64)[inv]
    sources = []
    dest_of_row = np.full(len(cols["id"]), -1, np.int64)
    dest_of_row[sel] = np.arange(len(sel))
    for s, shard in enumerate(plan.shards):
        mask = shard_of == s
        d = dest_of_row[mask]
        src = np.flatnonzero(d >= 0)
        sources.append((shard, src, d[src], int(mask.sum())))
    skipped = [{"path": store.display_text(r["path"]), "reason": r["reason"], "kind": r.get("kind", "permanent")}
               for r in meta.get("skipped", [])]
    cache = FeatureCache(
        path=path, meta=meta, ids=cls["id"], paths=cls["path"], domains=cls["domain"], clients=cls["client"],
        class_names=cls["class_name"], labels=labels, splits=cls["split"], classes=classes, templates=templates,
        text_embeddings=text.astype(np.float32), skipped=skipped, complete=plan.complete,
        incomplete_reason=plan.note, _sources=sources)
    if load_features:
        cache.features  # noqa: B018 - read now, while the shards are the ones just checked
    return cache
