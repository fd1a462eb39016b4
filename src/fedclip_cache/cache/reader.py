"""Reader API: open a cache (Parquet or HDF5) and get numpy arrays, without per-row Python work.

    >>> from fedclip_cache import open_cache
    >>> c = open_cache("cache/pacs")
    >>> c.features.shape, c.labels.shape, c.text_embeddings.shape   # (N, D), (N,), (T, C, D)

Only a complete cache is served (see ``integrity.py``): an extract that was killed or is still running, a missing
or truncated shard, or damaged metadata is a one-line :class:`~fedclip_cache.cache.store.CacheError` naming the file and
the fix. The feature matrix is read on first use of ``features``, straight into one float32 array (no intermediate
copies), so metadata-only uses (``info``, counts, splits) never touch the embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from . import integrity, schema, store


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
    features_in: str = "memory"  # or "mmap": features served from a memory-mapped file (caches bigger than RAM)
    verify: bool = False  # opened with verify: checksums of the shards and of a memory-mapped copy are checked
    _features: Optional[np.ndarray] = field(default=None, repr=False)
    _sources: list[ShardRows] = field(default_factory=list, repr=False)  # where each served row's embedding is
    _views: Optional[np.ndarray] = field(default=None, repr=False)  # (k, N, D) once views(k) was read

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
        self._check_unchanged()
        if self.features_in == "mmap":
            return _mapped_features(self)
        out = np.empty((len(self.labels), self.dim), np.float32)
        self._fill(out)
        return out

    def _fill(self, out: np.ndarray) -> None:
        """Write every served row's embedding into ``out`` (N, D), in reader order, streaming one block at a time."""
        for shard, src, dst, rows in self._sources:
            if not len(src):
                continue
            if len(src) == rows and (np.diff(dst) == 1).all():  # the usual case: straight into place
                store.read_shard_embedding_into(shard, out[dst[0]:dst[0] + rows])
            else:
                dest = np.full(rows, -1, np.int64)
                dest[src] = dst
                store.read_shard_embedding_into(shard, out, dest)
            store.release_arrow_memory()  # one shard's buffers at a time, never the whole cache's

    def __len__(self) -> int:
        return len(self.labels)

    def column(self, name: str) -> np.ndarray:
        """Any shard column of ``schema.COLUMNS`` (``path_bytes`` aside: ``paths`` is it, decoded) for the served
        rows, aligned with ``features``, read from the shards now: a column without a named field here is read so."""
        if name not in schema.column_names() or name == "path_bytes":
            raise ValueError(f"{name!r} is not a cache column; columns: {', '.join(schema.stored_columns())}")
        self._check_unchanged()
        out: Optional[np.ndarray] = None
        for shard, src, dst, rows in self._sources:
            if not len(src):
                continue
            values = store.read_shard(shard, (name,), False, self.dim)[0][name]
            if out is None:
                out = np.empty(len(self.labels), values.dtype)
            out[dst] = values[src]
        return out

    def _check_unchanged(self) -> None:
        """Refuse to read shards that an extract retired since this cache was opened."""
        gone = [str(s) for s, *_ in self._sources if not Path(s).is_file()]
        if gone:
            raise store.CacheError(f"{gone[0]}: the cache changed since it was opened (an extract ran); open it "
                                   f"again")

    @property
    def num_views(self) -> int:
        """Views per image (``extract --views K``): view 0 is ``features``, views 1..K-1 are augmented."""
        return int((self.meta.get("views") or {}).get("count", 1))

    def views(self, k: Optional[int] = None) -> np.ndarray:
        """(k, N, D) float32, view-major: ``[0]`` is ``features`` (shared memory, not a copy, when the features
        are read here), ``[v]`` the augmented view v of every row, aligned with the other arrays. ``k`` defaults to
        every view of the cache. Reads the shards' view columns (nothing is read for k = 1); a few vectorised
        copies per shard, never per row."""
        k = self.num_views if k is None else int(k)
        if not 1 <= k <= self.num_views:
            raise store.CacheError(f"{self.path}: {k} views asked for, the cache holds {self.num_views} per image; "
                                   f"re-extract with --views {k}")
        if k == 1:
            return self.features[None]
        if self._views is not None and self._views.shape[0] >= k:
            return self._views[:k]  # view-major: the first k views are a contiguous block
        if not self.complete:
            raise store.CacheError(f"{self.path}: an unfinished cache serves no augmented views (some images may "
                                   f"lack them); finish the extract first")
        listed = self.meta.get("shards") or {}
        short = [s for s, *_ in self._sources if listed.get(Path(s).name, {}).get("views", 1) < self.num_views]
        if short:
            raise store.CacheError(f"{short[0]}: shard holds fewer views than the cache's {self.num_views}; re-run "
                                   f"the same extract command to repair the cache")
        self._check_unchanged()
        out = np.empty((k, len(self.labels), self.dim), np.float32)
        if self._features is not None:
            out[0] = self._features
        else:
            self._fill(out[0])
        for shard, src, dst, rows in self._sources:
            if not len(src):
                continue
            dest = np.full(rows, -1, np.int64)
            dest[src] = dst
            for pos, block in store.iter_shard_embedding(shard, column="views"):
                block = block.reshape(len(block), -1, self.dim)
                d = dest[pos:pos + len(block)]
                keep = d >= 0
                for v in range(1, k):  # one vectorised scatter per view
                    out[v, d[keep]] = block[keep, v - 1]
            store.release_arrow_memory()
        if self.features_in == "memory":
            self._features = out[0]  # one copy of view 0 in memory, not two
        self._views = out
        return out

    def identity(self) -> dict:
        """Which cache, and which commit of it: results computed on another identity are not these results."""
        return {"path": str(Path(self.path).resolve()), **_commit_stamp(self)}

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


def _skipped(meta: dict) -> list[dict]:
    """The committed skip records, as shown to users (undecodable name bytes as \\xNN)."""
    return [{"path": store.display_text(r["path"]), "reason": r["reason"], "kind": r.get("kind", "permanent")}
            for r in meta.get("skipped", [])]


def open_cache(path: str | Path, allow_incomplete: bool = False, verify: bool = False,
               load_features: bool = True, features_in: str = "auto") -> FeatureCache:
    """Open a complete cache. ``allow_incomplete`` serves what an unfinished extract has committed so far (newest
    row per image); ``verify`` re-hashes every shard against the checksums of the commit; ``load_features=False``
    reads metadata only and defers the feature matrix to the first use of ``.features`` (an extract that changes
    the cache in between makes that a CacheError: open it again).

    ``features_in``: ``memory`` reads the features into one float32 array; ``mmap`` serves them from
    ``CACHE/features.npy`` (built from the shards on first use, in the stored dtype, and rebuilt when the cache
    changes), so a cache bigger than RAM trains by gathering batches from the page cache; ``auto`` (default) maps
    when the float32 matrix would take more than half of the memory available to this process (MemAvailable, the
    cgroup memory limit of a container or job, RLIMIT_DATA / RLIMIT_AS)."""
    if features_in not in ("auto", "memory", "mmap"):
        raise ValueError(f"features_in must be auto, memory or mmap (got {features_in!r})")
    path = Path(path)
    meta = store.read_meta(path)
    plan = integrity.plan_read(path, meta, allow_incomplete, verify)
    templates, classes, text = store.read_text(path, meta["format"])
    dim = int(meta["embedding_dim"])
    if text.shape[-1] != dim:
        raise store.CacheError(f"{path}/text{store.FORMATS[meta['format']]}: width {text.shape[-1]}, the cache's is "
                               f"{dim}; re-run the same extract command to rebuild it")
    cols, labels, sources = _read_rows(path, plan, classes)
    cache = FeatureCache(
        path=path, meta=meta, ids=cols["id"], paths=cols["path"], domains=cols["domain"], clients=cols["client"],
        class_names=cols["class_name"], labels=labels, splits=cols["split"], classes=classes, templates=templates,
        text_embeddings=text.astype(np.float32), skipped=_skipped(meta), complete=plan.complete,
        incomplete_reason=plan.note, verify=verify, _sources=sources)
    if features_in == "auto":
        features_in = "mmap" if plan.complete and len(labels) * dim * 4 > available_memory() // 2 else "memory"
    if features_in == "mmap" and not plan.complete:
        raise store.CacheError(f"{path}: an unfinished cache cannot be memory-mapped; finish the extract first, or "
                               f"use --features memory")
    cache.features_in = features_in
    if load_features:
        cache.features  # noqa: B018 - read now, while the shards are the ones just checked
    return cache


class ShardRows(NamedTuple):
    """The rows a reader serves from one shard: its rows ``src`` go to rows ``dst`` of the cache's arrays;
    ``rows`` is the shard's row count."""

    shard: Path
    src: np.ndarray
    dst: np.ndarray
    rows: int


def _read_rows(path: Path, plan: integrity.ReadPlan, classes: list[str]
               ) -> tuple[dict[str, np.ndarray], np.ndarray, list[ShardRows]]:
    """The per-row columns (id, path and the category columns) in canonical order, the labels, and where each
    served row's embedding lives; read from the shards' Arrow tables without per-row Python work."""
    import pyarrow as pa

    tables = [store.read_shard_arrow(shard) for shard in plan.shards]
    sizes = [t.num_rows for t in tables]
    if not sum(sizes):
        raise store.CacheError(f"{path}: the cache holds no images; run extract to fill it")
    table = pa.concat_tables(tables).unify_dictionaries()
    del tables
    sel = _canonical_rows(path, table, plan.dedupe)
    rows = table.take(pa.array(sel)).combine_chunks()
    del table
    cols = {c: store.category_to_numpy(rows.column(c)) for c in schema.column_names(category=True)}
    cols["id"] = rows.column("id").to_numpy(zero_copy_only=False)
    cols["path"] = store.decode_paths(rows.column("path_bytes"))
    labels = _labels(path, rows.column("class_name").combine_chunks(), classes)
    del rows
    store.release_arrow_memory()
    dest_of_row = np.full(sum(sizes), -1, np.int64)
    dest_of_row[sel] = np.arange(len(sel))
    starts = np.concatenate([[0], np.cumsum(sizes)])  # the shards' rows are concatenated in order
    sources = []
    for s, shard in enumerate(plan.shards):
        d = dest_of_row[starts[s]:starts[s + 1]]
        src = np.flatnonzero(d >= 0)
        sources.append(ShardRows(shard, src, d[src], sizes[s]))
    return cols, labels, sources


def _canonical_rows(path: Path, table, dedupe: bool) -> np.ndarray:
    """Rows of the concatenated shards to serve, in canonical order (by the path's bytes) so that caches written
    by 1 or N processes, in any shard order, give the same arrays. ``dedupe`` (an unfinished cache, whose
    uncommitted shards may repeat ids): the newest (last) row of each id; otherwise a repeated id is damage."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    keep = np.arange(n)
    if dedupe:
        ids = table.column("id").to_numpy()
        _, first_from_end = np.unique(ids[::-1], return_index=True)
        keep = np.sort(n - 1 - first_from_end)
    elif pc.count_distinct(table.column("id")).as_py() != n:
        raise store.CacheError(f"{path}: the committed shards repeat an image; re-run the same extract command to "
                               f"repair the cache")
    kept = table.take(pa.array(keep)) if dedupe else table
    return keep[pc.sort_indices(kept, sort_keys=[("path_bytes", "ascending")]).to_numpy()]


def _labels(path: Path, names_col, classes: list[str]) -> np.ndarray:
    """int64 labels from the dictionary-encoded class names, against the cache's current class list."""
    lookup = {c: i for i, c in enumerate(classes)}
    names = names_col.dictionary.to_pylist()
    unknown = [c for c in names if c not in lookup]
    if unknown:
        raise store.CacheError(f"{path}: rows of class {unknown[0]!r} that the cache's class list lacks; re-run the "
                               f"same extract command to repair the cache")
    return np.array([lookup[c] for c in names] + [-1], np.int64)[names_col.indices.to_numpy(zero_copy_only=False)]


@dataclass
class CacheOverview:
    """What ``info`` shows: metadata and counts, read without embeddings and without per-row Python objects."""

    path: Path
    meta: dict
    counts_by: dict[tuple[str, str, str], int]  # (domain, client, class_name) -> rows
    classes: list[str]
    templates: list[str]
    skipped: list[dict]
    complete: bool
    incomplete_reason: str

    def __len__(self) -> int:
        return sum(self.counts_by.values())

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])

    @property
    def domain_names(self) -> list[str]:
        return sorted({d for d, _, _ in self.counts_by})

    @property
    def client_names(self) -> list[str]:
        return sorted({c for _, c, _ in self.counts_by})

    def counts(self) -> dict[str, dict[str, int]]:
        out = {d: {c: 0 for c in self.classes} for d in self.domain_names}
        for (d, _, cl), n in self.counts_by.items():
            out[d][cl] = out[d].get(cl, 0) + n
        return out


def cache_overview(path: str | Path, allow_incomplete: bool = False, verify: bool = False) -> CacheOverview:
    """Metadata and per-(domain, client, class) counts of a cache; reads no embeddings. An unfinished cache (which
    may repeat images until its extract commits) is counted through the full reader."""
    path = Path(path)
    meta = store.read_meta(path)
    plan = integrity.plan_read(path, meta, allow_incomplete, verify)
    skipped = _skipped(meta)
    store.read_text(path, meta["format"])  # small (templates x classes); a missing or damaged one is an error
    if plan.dedupe:
        c = open_cache(path, allow_incomplete=True, load_features=False)
        keys, n = np.unique(np.stack([c.domains.astype(str), c.clients.astype(str), c.class_names.astype(str)], 1),
                            axis=0, return_counts=True)
        counts = {tuple(k): int(v) for k, v in zip(keys.tolist(), n.tolist())}
        classes, templates = c.classes, c.templates
    else:
        counts: dict = {}
        for shard in plan.shards:
            for key, n in store.count_rows(shard, ("domain", "client", "class_name")).items():
                counts[key] = counts.get(key, 0) + n
        classes, templates = list(meta.get("classes", [])), list(meta.get("templates", []))
        unknown = sorted({cl for _, _, cl in counts} - set(classes))
        if unknown:
            raise store.CacheError(f"{path}: rows of class {unknown[0]!r} that the cache's class list lacks; re-run "
                                   f"the same extract command to repair the cache")
    return CacheOverview(path, meta, counts, classes, templates, skipped, plan.complete, plan.note)


# ------------------------------------------------------------------------------------------ mapped features

FEATURES_FILE = store.FEATURES_FILE  # derived from the shards, reader order; deleted by the next extract's commit
FEATURES_STAMP = store.FEATURES_STAMP  # which commit features.npy was built from


def _commit_stamp(cache: FeatureCache) -> dict:
    import hashlib
    import json

    listing = json.dumps(cache.meta.get("shards", {}), sort_keys=True).encode()
    return {"last_session": cache.meta.get("last_session"), "shards_sha256": hashlib.sha256(listing).hexdigest(),
            "rows": len(cache.labels), "dim": cache.dim, "dtype": cache.meta.get("dtype", "float32")}


def _mapped_features(cache: FeatureCache) -> np.ndarray:
    """(N, D) read-only memory map of ``features.npy`` (float32, or float16 for float16 caches: consumers convert
    per batch). Built once per commit, streaming one shard at a time, so building needs no more memory than one
    shard either. A map that does not match the commit, its recorded size or shape (or, with ``verify``, its
    recorded checksum) is rebuilt, never served."""
    import json

    f, stamp_file = Path(cache.path) / FEATURES_FILE, Path(cache.path) / FEATURES_STAMP
    stamp = _commit_stamp(cache)
    dtype = np.float16 if stamp["dtype"] == "float16" else np.float32
    try:
        saved = json.loads(stamp_file.read_text())
        ok = {k: saved.get(k) for k in stamp} == stamp and f.stat().st_size == saved.get("npy_bytes")
        if ok:
            arr = np.load(f, mmap_mode="r")
            ok = arr.shape == (stamp["rows"], stamp["dim"]) and arr.dtype == dtype
        if ok and cache.verify:
            ok = store.file_sha256(f) == saved.get("npy_sha256")
    except (OSError, ValueError, EOFError, AttributeError):
        ok = False
    if not ok:
        def build(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(stamp["rows"], stamp["dim"]))
            cache._fill(out)
            out.flush()
            del out

        try:
            store.atomic_write(f, build)
            store.write_json(stamp_file, {**stamp, "npy_bytes": f.stat().st_size, "npy_sha256": store.file_sha256(f)})
        except OSError as e:
            raise store.CacheError(f"{f}: cannot write the memory-mapped features ({e.strerror or e}); free disk "
                                   f"space or use --features memory") from None
    return np.load(f, mmap_mode="r")


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by RLIMIT_DATA / RLIMIT_AS when set."""
    import resource

    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    status = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                status[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    for limit, used in ((resource.RLIMIT_DATA, status.get("VmData", 0)), (resource.RLIMIT_AS, status.get("VmSize", 0))):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            avail = min(avail, max(0, soft - used))
    room = cgroup_memory_room()
    return avail if room is None else min(avail, room)


def cgroup_memory_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under this process's cgroup memory limit (containers, Slurm, systemd), or None without one.
    cgroup v2 ``memory.max - memory.current``, v1 ``memory.limit_in_bytes - memory.usage_in_bytes``; the page cache
    is part of the usage but reclaimable, so it is not subtracted."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            for base in (Path(root) / rel, Path(root)):
                candidates.append((base / "memory.max", base / "memory.current", base / "memory.stat", "file"))
        elif "memory" in controllers.split(","):  # v1
            for base in (Path(root) / "memory" / rel, Path(root) / "memory"):
                candidates.append((base / "memory.limit_in_bytes", base / "memory.usage_in_bytes", base / "memory.stat",
                                   "total_cache"))
    for limit_f, usage_f, stat_f, cache_key in candidates:
        try:
            raw = limit_f.read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                continue
            used = int(usage_f.read_text())
            cached = 0
            for ln in stat_f.read_text().splitlines():
                k, _, v = ln.partition(" ")
                if k == cache_key:
                    cached = int(v)
            return max(0, int(raw) - used + cached)
        except (OSError, ValueError):
            continue
    return None
