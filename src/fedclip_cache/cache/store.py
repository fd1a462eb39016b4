"""The on-disk files of a cache: shards, text embeddings and metadata, in Parquet or HDF5.

Layout (identical for both formats, only the shard/text file type differs)::

    CACHE/
      cache.json                  cache id, provenance, fingerprint, state, committed shard list, skipped files
      text.parquet | text.h5      raw encode_text embeddings, one per (template, class)
      shards/part-<session>-r<rank>-<seq>.parquet | .h5   (each names its cache's id in its metadata)
      .lock                       held (flock) by the one extract writing the cache
      .fedclip-tmp[-<id>].<name>.<random>.tmp   a file being written (renamed into place when complete)

A shard holds only **embedded** images, one row each, so pandas/duckdb/h5py users of the shard files see no junk
rows. The files that were attempted and skipped travel in the shard's own key-value metadata (so they commit
atomically with it) and end up in ``cache.json``. Every file is written to a temporary name and renamed into
place. Which shards make up the cache, and whether it is complete, is decided by ``integrity.py``; this module only
reads and writes files, and turns every unreadable file into a one-line :class:`CacheError` naming it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import schema
from ..errors import FedclipCacheError

META_FILE = "cache.json"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"
FORMATS = {"parquet": ".parquet", "hdf5": ".h5"}
FEATURES_FILE, FEATURES_STAMP = "features.npy", "features.json"  # the memory-mapped copy (cache.py)
# The files of a cache folder besides shards/: what a killed run's temporary files may stand for (never others).
ROOT_FILES = frozenset({META_FILE, LOCK_FILE, FEATURES_FILE, FEATURES_STAMP, *(f"text{e}" for e in FORMATS.values())})
# Format 3 (before the cache id) is still read: the same layout without ``cache_id``. Such a shard is its cache's
# only because that cache's cache.json lists it (``integrity.owns_listed``); nothing else can tell whose it is.
# The columns and the format version are declared once, in schema.py.
META_KEY = "fedclip_cache"
ROW_GROUP_ROWS = 8192


class CacheError(FedclipCacheError, ValueError):
    """The cache is missing, damaged or incompatible with the request; the message says what to do."""


# Temporary files: ``.fedclip-tmp[-<cache id>].<final name>.<8 random>.tmp``. Only names of this exact pattern, for a
# final name the cleaner owns, are ever removed (a user's ``.notes.tmp`` beside a cache is not ours); shards carry
# their cache's id in it, so that a shards folder shared by two caches never has one cache remove the other's.
TMP_PREFIX = ".fedclip-tmp"
CACHE_ID_PATTERN = "[0-9a-f]{32}"  # what new_cache_id makes; the one pattern every reader of an id uses
TMP_NAME = re.compile(rf"{re.escape(TMP_PREFIX)}(?:-(?P<owner>{CACHE_ID_PATTERN}))?"
                      rf"\.(?P<target>.+)\.[a-z0-9_]{{8}}\.tmp")


def temporary_of(name: str) -> tuple[str, str] | None:
    """``(owner cache id or "", final name)`` of one of our temporary files, None for any other name."""
    m = TMP_NAME.fullmatch(name)
    return (m["owner"] or "", m["target"]) if m else None


class DiskFull(OSError):
    """No space left (or over quota) while writing ``filename``: what was written before is intact; the file being
    written was removed."""


def is_disk_full(e: BaseException) -> bool:
    # pyarrow and h5py both raise OSError with errno 28 (measured on a full 1 MiB tmpfs); h5py puts it in the text.
    text = str(e)
    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
                                       or "Disk quota exceeded" in text)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which races with
    files other threads create meanwhile); Linux >= 4.7 shows it in /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None], owner: str = "") -> None:
    """Write via ``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half.
    The file gets the permissions any new file gets (0666 less the umask: a cache shared by a lab group stays
    readable by it; ``mkstemp`` alone makes 0600). A full disk is a :class:`DiskFull` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{'-' + owner if owner else ''}.{path.name}.", suffix=".tmp",
                               dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # "being written": an extract's clean-up leaves it (temporary_in_use)
    except OSError:
        pass  # a file system without locks: the clean-up then goes by the name alone
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, 0o666 & ~current_umask())
        except OSError:
            pass  # a file system without Unix modes (vfat, some network mounts) applies its own; not worth failing
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    finally:
        os.close(fd)


def temporary_in_use(path: Path) -> bool:
    """Whether a live process is writing this temporary file: :func:`atomic_write` holds a lock on it until it is
    renamed. A reader building ``features.npy`` takes no writer lock, so an extract starting meanwhile must not
    remove its half-written file as a killed run's (the reader then failed with 'No such file')."""
    return flock_held(path) is True  # (None, no locks on this file system: the name alone decides)


def flock_held(path: Path, directory: bool = False) -> bool | None:
    """Whether a live process holds an exclusive ``flock`` on ``path`` (the writer lock on a cache or run folder:
    ``directory=True``; a temporary file being written): False when it cannot be opened (gone) or nobody holds one,
    None when the file system has no locks (each caller decides what that means)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    # ensure_ascii keeps undecodable file-name bytes (surrogate escapes) lossless and the file valid UTF-8.
    atomic_write(path, lambda t: t.write_text(json.dumps(obj, indent=2, ensure_ascii=True)))


def check_cache_path(cache: Path) -> None:
    """pyarrow opens files by UTF-8 paths only: a cache folder whose path holds undecodable bytes (a surrogate-
    escaped str) would fail deep inside a read or write with a misleading error -- refuse it in one line instead."""
    try:
        str(Path(cache).absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise CacheError(f"{display_text(str(cache))}: the cache folder's path is not valid UTF-8, which pyarrow "
                         f"cannot open; rename or move the folder to a UTF-8 path") from None


def read_meta(cache: Path) -> dict:
    """``cache.json`` as a dict; a missing, unreadable or malformed file is a one-line CacheError."""
    check_cache_path(cache)
    f = Path(cache) / META_FILE
    if not f.is_file():
        raise CacheError(f"{cache}: not a fedclip-cache cache (no {META_FILE}); create one with "
                         f"`fedclip-cache extract DATA {cache}`")
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{f}: damaged metadata ({type(e).__name__}); re-run the same `fedclip-cache extract` "
                         f"command to rebuild it from the shards") from None
    missing = [k for k in ("format", "embedding_dim", "fingerprint") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CacheError(f"{f}: not a valid cache description (missing {', '.join(missing)}); re-run the same "
                         f"`fedclip-cache extract` command to rebuild it from the shards")
    if meta["format"] not in FORMATS:
        raise CacheError(f"{f}: unknown format {meta['format']!r}; re-run the same `fedclip-cache extract` "
                         f"command to rebuild it")
    return meta


def display_text(s: str) -> str:
    """A str that is valid UTF-8: undecodable file-name bytes (surrogate escapes) become ``\\xNN``."""
    return os.fsencode(s).decode("utf-8", "backslashreplace") if _has_surrogates(s) else s


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# ----------------------------------------------------------------------------------------------- identity

CACHE_ID = re.compile(CACHE_ID_PATTERN)


def new_cache_id() -> str:
    """A cache's identity, made once at its first extract and written into cache.json and into every shard: shards
    of another cache (a ``shards/`` folder two caches share) are then never adopted, retired or deleted."""
    return uuid.uuid4().hex


def cache_id_of(cache: Path, meta: dict) -> str:
    """The id in ``cache.json``; a missing or malformed one is damaged metadata (re-running extract rebuilds it)."""
    cid = meta.get("cache_id")
    if not isinstance(cid, str) or not CACHE_ID.fullmatch(cid):
        raise CacheError(f"{Path(cache) / META_FILE}: damaged metadata (no valid cache_id); re-run the same "
                         f"`fedclip-cache extract` command to rebuild it from the shards")
    return cid


def shard_cache_id(path: Path) -> str | None:
    """The id of the cache a shard belongs to, from its footer; "" for a shard without one (format 3, written before
    the cache id, or not ours), None when the shard cannot be read (its owner is unknown)."""
    try:
        cid = read_shard_meta(path, check_version=False).get("cache_id")
    except CacheError:
        return None
    return cid if isinstance(cid, str) and CACHE_ID.fullmatch(cid) else ""


# ----------------------------------------------------------------------------------------------- shards

def write_shard(path: Path, fmt: str, cols: dict, emb: np.ndarray, dtype: str, meta: dict,
                views: np.ndarray | None = None) -> None:
    """Write embedded rows (``cols``: one array per column of ``schema.COLUMNS``) and ``meta`` atomically.
    ``views`` (rows, K-1, D): the augmented views of each row (``extract --views K``), stored beside view 0 in the
    same row, so an image and its views are committed, superseded and retired together."""
    if not CACHE_ID.fullmatch(str(meta.get("cache_id"))):
        raise ValueError(f"internal error: shard {path.name} written without its cache's id")
    meta = {**meta, "format_version": schema.FORMAT_VERSION, "rows": int(len(emb)), "dim": int(emb.shape[1])}
    if views is not None:
        meta["views"] = int(views.shape[1]) + 1
    writer = _parquet_write if fmt == "parquet" else _hdf5_write
    atomic_write(path, lambda t: writer(t, cols, emb, dtype, meta, views), owner=meta["cache_id"])


def _text_column(values) -> list[str]:
    return [display_text(v) for v in values]


def _arrow_values(col: schema.Column, values):
    """What ``pa.array`` is given for one column of a shard."""
    if col.is_text:
        return _text_column(values)
    if col.kind == "bytes":
        return list(values)
    return np.asarray(values, col.kind)


def _hdf5_values(col: schema.Column, values) -> np.ndarray:
    """What ``create_dataset`` is given for one column of a shard (file-system bytes as uint8 arrays: lossless)."""
    if col.is_text:
        return np.array(_text_column(values), dtype=object)
    if col.kind == "bytes":
        raw = np.empty(len(values), dtype=object)
        raw[:] = [np.frombuffer(b, np.uint8) for b in values]
        return raw
    return np.asarray(values, col.kind)


def _parquet_write(path: Path, cols: dict, emb: np.ndarray, dtype: str, meta: dict, views=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = emb.shape[1]
    arrays = {c.name: pa.array(_arrow_values(c, cols[c.name]), schema.arrow_type(c)) for c in schema.COLUMNS}
    pa_type = pa.float16() if dtype == "float16" else pa.float32()
    arrays["embedding"] = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(emb, dtype=dtype).reshape(-1), pa_type), d)
    if views is not None:  # one fixed-size list of (K-1) * D values per row: views 1..K-1, view-major
        arrays["views"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(views, dtype=dtype).reshape(-1), pa_type), views.shape[1] * d)
    table = pa.table(arrays).replace_schema_metadata({META_KEY: json.dumps(meta, ensure_ascii=True)})
    # Small row groups: a reader streaming the embedding decodes one group (16 MiB at 512-d) at a time.
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


def _hdf5_file(path: Path, fill: Callable) -> None:
    """Write an HDF5 file built by ``fill(h5py.File)``: built in memory, then written with one plain file write.
    HDF5 writing to disk itself cannot fail cleanly: a full disk (or a file-size limit) during its flush leaves
    half-closed objects whose destructors print a screen of RuntimeErrors and then crash the process (SIGSEGV, exit
    -11, measured with h5py 3 on a full tmpfs) after our one-line error. A shard is at most --shard-size rows, a few
    MB to tens of MB, so one copy in memory is cheap."""
    import io

    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    with open(path, "wb") as out:
        out.write(buf.getbuffer())


def _hdf5_write(path: Path, cols: dict, emb: np.ndarray, dtype: str, meta: dict, views=None) -> None:
    _hdf5_file(path, lambda f: _hdf5_fill(f, cols, emb, dtype, meta, views))


def _hdf5_fill(f, cols: dict, emb: np.ndarray, dtype: str, meta: dict, views=None) -> None:
    for c in schema.COLUMNS:
        f.create_dataset(c.name, data=_hdf5_values(c, cols[c.name]), dtype=schema.hdf5_dtype(c))
    f.create_dataset("embedding", data=np.ascontiguousarray(emb, dtype=dtype))
    if views is not None:
        f.create_dataset("views", data=np.ascontiguousarray(views, dtype=dtype))  # (rows, K-1, D)
    f.attrs[META_KEY] = json.dumps(meta, ensure_ascii=True)


SHARD_NAME = re.compile(r"part-\d{8}T\d{12}-r\d{3}-c?\d{5}\.(parquet|h5)")
# The session of a cache written in one go rather than by extract (synthetic caches, simulate's held-out copy).
FIXED_SESSION = "00000000T000000000000"


def shard_name(session: str, rank: int, seq: int, fmt: str, compacted: bool = False) -> str:
    """The file name of shard ``seq`` of ``session`` written by process ``rank`` (``compacted``: rewritten by the
    commit without its retired rows): ``part-<session>-r<rank>-[c]<seq>.ext``, the names :data:`SHARD_NAME`
    accepts (they sort by session, then rank)."""
    return f"part-{session}-r{rank:03d}-{'c' if compacted else ''}{seq:05d}{FORMATS[fmt]}"


def is_shard_name(name, fmt: str) -> bool:
    """Whether ``name`` is a shard file name of a ``fmt`` cache: a plain name inside ``shards/`` of our pattern (no
    separator, no ``..``, not absolute). The one rule for shard files on disk and for names listed in cache.json."""
    return isinstance(name, str) and bool(SHARD_NAME.fullmatch(name)) and name.endswith(FORMATS[fmt])


def shard_files(cache: Path, fmt: str) -> list[Path]:
    """Every shard file this tool wrote, committed or not, oldest session first (names sort chronologically); a
    ``shards/`` folder shared by several caches holds theirs too (see ``integrity.take_inventory``). Files of other
    names in ``shards/`` are not ours: never read, never deleted (see :func:`foreign_files`)."""
    d = Path(cache) / SHARD_DIR
    return sorted(p for p in d.glob(f"part-*{FORMATS[fmt]}") if is_shard_name(p.name, fmt)) if d.is_dir() else []


def foreign_files(cache: Path) -> list[str]:
    d = Path(cache) / SHARD_DIR
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and not SHARD_NAME.fullmatch(p.name)) \
        if d.is_dir() else []


def _damaged(path: Path, e: BaseException) -> BaseException:
    if isinstance(e, MemoryError):  # pyarrow's ArrowMemoryError is one: out of memory is not a damaged file
        return MemoryError(f"{path}: not enough memory to read it ({e}); free memory, or use --features mmap")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CacheError(f"{path}: damaged shard ({type(e).__name__}: {msg[:160]}); re-run the same "
                      f"`fedclip-cache extract` command to re-embed its rows")


class ShardFooter(NamedTuple):
    """A shard's footer: the metadata its writer stored, and what the file itself holds (read from the data's own
    shapes, so a shard whose metadata disagrees with its contents is caught by ``integrity``)."""

    meta: dict  # rows, dim, fingerprint, session, cache_id, views, skipped files, format_version, ...
    rows: int  # rows stored (-1: an HDF5 shard without an embedding dataset)
    dim: Optional[int]  # HDF5: the stored embedding width (-1: none); Parquet: None (the list type carries it)
    views_width: int  # values per row in the views column (0: no views; -1: a views dataset of another length)


def read_shard_footer(path: Path, check_version: bool = True) -> ShardFooter:
    """The shard's footer (its metadata and stored shape), without reading its rows. ``check_version=False``: also a
    shard of another format (to tell whose it is)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            arrow_schema = pq.read_schema(path)
            raw = (arrow_schema.metadata or {}).get(META_KEY.encode())
            meta = json.loads(raw) if raw else {}
            rows, dim = pq.ParquetFile(path).metadata.num_rows, None
            views_width = arrow_schema.field("views").type.list_size if "views" in arrow_schema.names else 0
        else:
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get(META_KEY)
                meta = json.loads(raw) if raw else {}
                rows = int(f["embedding"].shape[0]) if "embedding" in f else -1
                dim = int(f["embedding"].shape[1]) if "embedding" in f else -1
                v = f["views"].shape if "views" in f else None
                views_width = int(v[1] * v[2]) if v is not None and v[0] == rows else (0 if v is None else -1)
    except Exception as e:  # pyarrow / h5py raise assorted errors on truncated or garbage files
        raise _damaged(path, e) from None
    if check_version and meta.get("format_version") not in schema.READ_FORMATS:
        raise CacheError(f"{path}: shard written by another fedclip-cache format "
                         f"({meta.get('format_version', 'unknown')}, this version reads "
                         f"{' and '.join(map(str, schema.READ_FORMATS))}); re-extract into a new folder")
    return ShardFooter(meta, rows, dim, views_width)


def read_shard_meta(path: Path, check_version: bool = True) -> dict:
    """The metadata a shard's writer stored (rows, dim, fingerprint, session, cache_id, skipped files), from its
    footer only (see :func:`read_shard_footer` for what the file itself holds)."""
    return read_shard_footer(path, check_version).meta


def decode_paths(arrow_binary) -> np.ndarray:
    """File-system bytes -> str (surrogate escapes for undecodable bytes, exactly as ``os.fsdecode``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:  # the common case, every name valid UTF-8: one vectorised cast
        return pc.cast(arrow_binary, pa.string()).to_numpy(zero_copy_only=False).astype(object)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return np.array([os.fsdecode(v) for v in arrow_binary.to_pylist()], dtype=object)


def read_shard(path: Path, columns: tuple[str, ...], with_embedding: bool, dim: int
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Selected columns (``path`` comes back lossless, decoded from ``path_bytes``) and optionally the embedding."""
    want = ["path_bytes" if c == "path" else c for c in columns]
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(path, columns=want + (["embedding"] if with_embedding else []))
            cols = {}
            for c in columns:
                if c == "path":
                    cols[c] = decode_paths(t.column("path_bytes"))
                else:
                    cols[c] = t.column(c).to_numpy(zero_copy_only=False)
            emb = None
            if with_embedding:
                col = t.column("embedding")
                if col.type.list_size != dim:
                    raise CacheError(f"{path}: embedding width {col.type.list_size}, the cache's is {dim}; delete "
                                     f"the shard and re-run the same extract command, or re-extract")
                flat = col.combine_chunks().flatten() if col.num_chunks != 1 else col.chunk(0).flatten()
                emb = flat.to_numpy(zero_copy_only=False).reshape(len(t), dim)
            return cols, emb
        import h5py

        with h5py.File(path, "r") as f:
            cols = {}
            for c in columns:
                if c == "path":
                    cols[c] = np.array([os.fsdecode(bytes(b)) for b in f["path_bytes"][:]], dtype=object)
                elif c in schema.text_columns():
                    cols[c] = f[c].asstr()[:].astype(object)
                else:
                    cols[c] = f[c][:]
            emb = None
            if with_embedding:
                if f["embedding"].shape[1] != dim:
                    raise CacheError(f"{path}: embedding width {f['embedding'].shape[1]}, the cache's is {dim}; "
                                     f"delete the shard and re-run the same extract command, or re-extract")
                emb = f["embedding"][:]
            return cols, emb
    except CacheError:
        raise
    except Exception as e:
        raise _damaged(path, e) from None


def read_shard_arrow(path: Path):
    """The reader's columns of a shard as an Arrow table: ``id`` (string), ``path_bytes`` (binary) and the
    dictionary-encoded category columns of the schema: ``domain``, ``client``, ``class_name`` and ``split`` (few
    distinct values: no per-row strings until the reader wants them)."""
    import pyarrow as pa

    categories = schema.column_names(category=True)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=["id", "path_bytes", *categories], read_dictionary=list(categories))
        import h5py

        with h5py.File(path, "r") as f:
            arrays = {"id": pa.array(f["id"].asstr()[:].tolist(), pa.string()),
                      "path_bytes": pa.array([bytes(b) for b in f["path_bytes"][:]], pa.binary())}
            for c in categories:
                arrays[c] = pa.array(f[c].asstr()[:].tolist(), pa.string()).dictionary_encode()
        return pa.table(arrays)
    except Exception as e:
        raise _damaged(path, e) from None


def category_to_numpy(col) -> np.ndarray:
    """A dictionary-encoded Arrow column -> numpy object array whose elements share one str per distinct value."""
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    values = np.array(arr.dictionary.to_pylist() + [""], dtype=object)
    idx = arr.indices.to_numpy(zero_copy_only=False)
    return values[idx] if not arr.null_count else values[np.where(arr.is_null().to_numpy(False), -1, idx)]


def release_arrow_memory() -> None:
    """Hand pyarrow's freed buffers back to the OS: its allocator keeps them resident otherwise, which after reading
    a large cache costs as much memory as the features themselves."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass


def count_rows(path: Path, by: tuple[str, ...]) -> dict[tuple, int]:
    """Row counts per distinct value combination of ``by`` (string columns), without building Python objects per
    row: what ``info`` needs from a shard."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(path, columns=list(by), read_dictionary=list(by))
            if not t.num_rows:
                return {}
            t = t.unify_dictionaries().combine_chunks()  # one dictionary per column across row groups
            g = t.group_by(list(by)).aggregate([([], "count_all")])
            cols = [g.column(c).to_pylist() for c in by]
            return {key: int(n) for key, n in zip(zip(*cols), g.column("count_all").to_pylist())}
        import h5py

        with h5py.File(path, "r") as f:
            arrays = [f[c].asstr()[:].astype(str) for c in by]
        if not len(arrays[0]):
            return {}
        keys, counts = np.unique(np.stack(arrays, axis=1), axis=0, return_counts=True)
        return {tuple(k): int(n) for k, n in zip(keys.tolist(), counts.tolist())}
    except Exception as e:
        raise _damaged(path, e) from None


def iter_shard_embedding(path: Path, batch_rows: int = 16_384, column: str = "embedding"):
    """Yield ``(first row, (rows, D) array)`` blocks of a shard's embedding in stored dtype, so that reading a shard
    never holds more than one block besides its destination. ``column="views"``: blocks of the augmented views,
    (rows, (K-1) * D)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pos = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=[column]):
                col = batch.column(0)
                block = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
                yield pos, block
                pos += len(col)
        else:
            import h5py

            with h5py.File(path, "r") as f:
                ds = f[column]
                for pos in range(0, ds.shape[0], batch_rows):
                    block = ds[pos:pos + batch_rows]
                    yield pos, block.reshape(len(block), -1)
    except CacheError:
        raise
    except Exception as e:
        raise _damaged(path, e) from None


def read_shard_embedding_into(path: Path, out: np.ndarray, dest: np.ndarray | None = None,
                              column: str = "embedding") -> None:
    """Write the shard's embedding rows into ``out``: row i goes to ``out[i]``, or to ``out[dest[i]]`` when ``dest``
    is given (``dest[i] < 0``: row not wanted). Streams in blocks and converts the dtype on assignment.
    ``column="views"`` with ``out`` (N, V, D): the first V augmented views of each row."""
    n = 0
    for pos, block in iter_shard_embedding(path, column=column):
        if out.ndim == 3:  # views: (rows, (K-1) * D) -> (rows, K-1, D), the first V of them
            block = block.reshape(len(block), -1, out.shape[2])[:, :out.shape[1]]
        if dest is None:
            out[pos:pos + len(block)] = block
        else:
            d = dest[pos:pos + len(block)]
            keep = d >= 0
            out[d[keep]] = block[keep] if not keep.all() else block
        n = pos + len(block)
    expected = len(out) if dest is None else len(dest)
    if n != expected:
        raise _damaged(path, ValueError(f"{n} {column} rows, expected {expected}"))


def read_shard_views(path: Path, dim: int) -> np.ndarray:
    """(rows, K-1, D) augmented views of a shard, in stored dtype ((rows, 0, D) for a shard without views)."""
    footer = read_shard_footer(path)
    meta = footer.meta
    if int(meta.get("views", 1)) == 1:
        return np.zeros((footer.rows, 0, dim), np.float32)
    blocks = [block.reshape(len(block), -1, dim) for _, block in iter_shard_embedding(path, column="views")]
    return np.concatenate(blocks) if blocks else np.zeros((0, int(meta["views"]) - 1, dim), np.float32)


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

        def fill(f):
            f.create_dataset("templates", data=np.array(templates, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("embedding", data=emb.astype(np.float32))
        atomic_write(path, lambda p: _hdf5_file(p, fill))


def read_text(cache: Path, fmt: str) -> tuple[list[str], list[str], np.ndarray]:
    path = Path(cache) / f"text{FORMATS[fmt]}"
    if not path.is_file():
        raise CacheError(f"{path}: text embeddings missing; re-run the same extract command to rebuild them")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            d = t.column("embedding").type.list_size
            templates = list(dict.fromkeys(t.column("template").to_pylist()))
            classes = list(dict.fromkeys(t.column("class_name").to_pylist()))
            emb = t.column("embedding").combine_chunks().flatten().to_numpy()
            return templates, classes, emb.reshape(len(templates), len(classes), d)
        import h5py

        with h5py.File(path, "r") as f:
            return list(f["templates"].asstr()[:]), list(f["classes"].asstr()[:]), f["embedding"][:]
    except Exception as e:
        raise CacheError(f"{path}: damaged text embeddings ({type(e).__name__}); re-run the same extract "
                         f"command to rebuild them") from None
