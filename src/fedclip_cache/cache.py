"""Reader API: open a cache (Parquet or HDF5) and get numpy arrays, without per-row Python work.

    >>> from fedclip_cache import open_cache
    >>> c = open_cache("cache/pacs")
    >>> c.features.shape, c.labels.shape, c.text_embeddings.shape   # (N, D), (N,), (T, C, D)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import store


@dataclass
class FeatureCache:
    path: Path
    meta: dict
    features: np.ndarray  # (N, D) float32, raw encode_image output (not normalised)
    ids: np.ndarray
    paths: np.ndarray
    domains: np.ndarray  # str per row
    clients: np.ndarray
    class_names: np.ndarray  # str per row
    labels: np.ndarray  # int64 index into `classes`
    splits: np.ndarray  # "" when the source gave none
    classes: list[str]
    templates: list[str]
    text_embeddings: np.ndarray  # (T, C, D) raw encode_text output
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

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


def _dedupe_latest(cols: dict, emb: np.ndarray) -> tuple[dict, np.ndarray]:
    """Keep the newest row per id (shards are read oldest first); re-extracted changed files supersede old rows."""
    ids = cols["id"]
    _, first_from_end = np.unique(ids[::-1], return_index=True)
    if len(first_from_end) == len(ids):
        return cols, emb
    keep = np.sort(len(ids) - 1 - first_from_end)
    return {c: v[keep] for c, v in cols.items()}, emb[keep]


def open_cache(path: str | Path) -> FeatureCache:
    path = Path(path)
    meta = store.read_meta(path)
    fmt = meta["format"]
    cols, emb = store.read_rows(path, fmt)
    templates, classes, text = store.read_text(path, fmt)
    if not cols:
        raise store.CacheError(f"{path}: the cache holds no images yet; run extract to fill it")
    cols, emb = _dedupe_latest(cols, emb)
    ok = cols["skip_reason"] == ""
    skipped = [{"path": p, "reason": r} for p, r in zip(cols["path"][~ok], cols["skip_reason"][~ok])]
    # Canonical order (by relative path) so that caches written by 1 or N processes, in any shard order,
    # give the same arrays.
    order = np.argsort(cols["path"][ok].astype(str), kind="stable")
    sel = np.flatnonzero(ok)[order]
    cls = {c: v[sel] for c, v in cols.items()}
    # Labels come from class names against the cache's current class list: when growth adds a class,
    # earlier rows' indices shift with it.
    lookup = {c: i for i, c in enumerate(classes)}
    names, inv = np.unique(cls["class_name"].astype(str), return_inverse=True)
    labels = np.array([lookup[n] for n in names], np.int64)[inv] if len(names) else np.zeros(0, np.int64)
    return FeatureCache(
        path=path, meta=meta, features=np.ascontiguousarray(emb[sel], dtype=np.float32),
        ids=cls["id"], paths=cls["path"], domains=cls["domain"], clients=cls["client"],
        class_names=cls["class_name"], labels=labels, splits=cls["split"], classes=classes,
        templates=templates, text_embeddings=text.astype(np.float32), skipped=skipped)
