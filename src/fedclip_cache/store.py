"""The on-disk cache: a folder of atomically committed shards plus metadata.

Layout (identical for both formats, only the shard/text file type differs)::

    CACHE/
      cache.json                  provenance, fingerprint, classes, templates, counts (written atomically)
      text.parquet | text.h5      raw encode_text embeddings, one per (template, class)
      shards/part-<session>-r<rank>-<seq>.parquet | .h5

Each shard holds one row per image *attempted*: embedded images carry their embedding, skipped images carry
``skip_reason`` (and a NaN embedding). A shard is written to a temporary name and renamed into place, so a crash
at any moment leaves only complete shards; resume simply reads which ids are already present.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

META_FILE = "cache.json"
SHARD_DIR = "shards"
FORMATS = {"parquet": ".parquet", "hdf5": ".h5"}
STRING_COLUMNS = ("id", "path", "domain", "client", "class_name", "split", "skip_reason")
INT_COLUMNS = {"label": np.int32, "size": np.int64, "mtime_ns": np.int64}


class CacheError(ValueError):
    """The cache is missing, damaged or incompatible with the request; the message says what to do."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda t: t.write_text(json.dumps(obj, indent=2, sort_keys=False)))


def read_meta(cache: Path) -> dict:
    f = Path(cache) / META_FILE
    if not f.is_file():
        raise CacheError(f"{cache}: not a fedclip-cache cache (no {META_FILE}); create one with "
                         f"`fedclip-cache extract DATA {cache}`")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{f}: damaged metadata ({e}); re-run extract into a new folder") from e


# ----------------------------------------------------------------------------------------------- shards

def _parquet_write(path: Path, cols: dict, emb: np.ndarray, dtype: str, meta: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = emb.shape
    values = pa.array(emb.astype(dtype, copy=False).reshape(-1))
    skipped = np.asarray(cols["skip_reason"], dtype=object) != ""
    emb_arr = pa.FixedSizeListArray.from_arrays(values, d, mask=pa.array(skipped) if skipped.any() else None)
    arrays = {c: pa.array(list(cols[c]), pa.string()) for c in STRING_COLUMNS}
    arrays.update({c: pa.array(np.asarray(cols[c], t)) for c, t in INT_COLUMNS.items()})
    arrays["embedding"] = emb_arr
    table = pa.table(arrays)
    if meta:
        table = table.replace_schema_metadata({"fedclip_cache": json.dumps(meta)})
    pq.write_table(table, path)


def _hdf5_write(path: Path, cols: dict, emb: np.ndarray, dtype: str, meta: dict | None = None) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for c in STRING_COLUMNS:
            f.create_dataset(c, data=np.array(list(cols[c]), dtype=object), dtype=h5py.string_dtype())
        for c, t in INT_COLUMNS.items():
            f.create_dataset(c, data=np.asarray(cols[c], t))
        f.create_dataset("embedding", data=emb.astype(dtype, copy=False))
        if meta:
            f.attrs["fedclip_cache"] = json.dumps(meta)


def write_shard(path: Path, fmt: str, cols: dict, emb: np.ndarray, dtype: str, meta: dict | None = None) -> None:
    writer = _parquet_write if fmt == "parquet" else _hdf5_write
    atomic_write(path, lambda t: writer(t, cols, emb, dtype, meta))


def shard_paths(cache: Path, fmt: str) -> list[Path]:
    d = Path(cache) / SHARD_DIR
    return sorted(d.glob(f"part-*{FORMATS[fmt]}")) if d.is_dir() else []


def _read_parquet_columns(paths: list[Path], columns: list[str] | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not paths:
        return None
    tables = [pq.read_table(p, columns=columns) for p in paths]
    return pa.concat_tables(tables).combine_chunks()


def read_index(cache: Path, fmt: str) -> dict[str, np.ndarray]:
    """The bookkeeping columns of every committed shard (no embeddings): what resume needs."""
    cols = ["id", "path", "size", "mtime_ns", "skip_reason"]
    paths = shard_paths(cache, fmt)
    if fmt == "parquet":
        t = _read_parquet_columns(paths, cols)
        if t is None:
            return {c: np.array([], dtype=object if c not in INT_COLUMNS else np.int64) for c in cols}
        return {c: t.column(c).to_numpy(zero_copy_only=False) for c in cols}
    out = {c: [] for c in cols}
    import h5py

    for p in paths:
        with h5py.File(p, "r") as f:
            for c in cols:
                out[c].append(f[c].asstr()[:] if c in STRING_COLUMNS else f[c][:])
    return {c: (np.concatenate(v) if v else np.array([], dtype=object if c in STRING_COLUMNS else np.int64))
            for c, v in out.items()}


def read_rows(cache: Path, fmt: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All columns of all shards, plus the embedding matrix (NaN rows for skipped images)."""
    paths = shard_paths(cache, fmt)
    if fmt == "parquet":
        import pyarrow.compute as pc

        t = _read_parquet_columns(paths, None)
        if t is None:
            return {}, np.zeros((0, 0), np.float32)
        cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in STRING_COLUMNS + tuple(INT_COLUMNS)}
        emb_col = t.column("embedding")
        d = emb_col.type.list_size
        # Skipped rows are null lists; fill them so the flat values buffer stays N*D long.
        if emb_col.null_count:
            import pyarrow as pa
            fill = pa.scalar([float("nan")] * d, emb_col.type)
            emb_col = pc.fill_null(emb_col, fill)
        flat = emb_col.combine_chunks().flatten() if hasattr(emb_col, "combine_chunks") else emb_col.flatten()
        emb = flat.to_numpy(zero_copy_only=False).reshape(len(t), d)
        return cols, emb
    import h5py

    parts, embs = {c: [] for c in STRING_COLUMNS + tuple(INT_COLUMNS)}, []
    for p in paths:
        with h5py.File(p, "r") as f:
            for c in parts:
                parts[c].append(f[c].asstr()[:] if c in STRING_COLUMNS else f[c][:])
            embs.append(f["embedding"][:])
    if not embs:
        return {}, np.zeros((0, 0), np.float32)
    return {c: np.concatenate(v) for c, v in parts.items()}, np.concatenate(embs)


# ----------------------------------------------------------------------------------------------- text

def write_text(cache: Path, fmt: str, templates: list[str], classes: list[str], emb: np.ndarray) -> None:
    """``emb`` has shape (T, C, D): one raw encode_text output per template and class."""
    path = Path(cache) / f"text{FORMATS[fmt]}"
    t, c, d = emb.shape
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "template": pa.array([tpl for tpl in templates for _ in classes], pa.string()),
            "class_name": pa.array([cl for _ in templates for cl in classes], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).reshape(-1)), d),
        })
        atomic_write(path, lambda p: pq.write_table(table, p))
    else:
        import h5py

        def w(p):
            with h5py.File(p, "w") as f:
                f.create_dataset("templates", data=np.array(templates, dtype=object), dtype=h5py.string_dtype())
                f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=h5py.string_dtype())
                f.create_dataset("embedding", data=emb.astype(np.float32))
        atomic_write(path, w)


def read_text(cache: Path, fmt: str) -> tuple[list[str], list[str], np.ndarray]:
    path = Path(cache) / f"text{FORMATS[fmt]}"
    if not path.is_file():
        raise CacheError(f"{path}: text embeddings missing; re-run the same extract command to rebuild them")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        d = t.column("embedding").type.list_size
        tpl = t.column("template").to_pylist()
        cls = t.column("class_name").to_pylist()
        templates = list(dict.fromkeys(tpl))
        classes = list(dict.fromkeys(cls))
        emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(templates), len(classes), d)
        return templates, classes, emb
    import h5py

    with h5py.File(path, "r") as f:
        return list(f["templates"].asstr()[:]), list(f["classes"].asstr()[:]), f["embedding"][:]
