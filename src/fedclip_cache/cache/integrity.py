"""What a cache contains, whether it is complete, and who may write it.

``cache.json`` is the commit record. Its ``state`` is ``in-progress`` from the moment an extract starts changing the
cache until that extract has finished *and* committed; then ``complete``, with the exact list of shard files that
make up the cache (rows, bytes, sha256 each), the files that were skipped, and what was retired. Readers serve only
a complete cache, and only the listed shards, after checking each is present with its recorded size (``verify``
also re-hashes them). Shards that a killed run committed but never listed are adopted by the next extract; their
rows are not lost. Every shard carries the id of its cache (made by the first extract, kept in ``cache.json``): a
shard is this cache's when ``cache.json`` lists it or when it carries this id, and no other shard (a ``shards/``
folder shared by several caches) is ever adopted, retired or deleted. Listed names must be plain shard file names
inside ``shards/`` (``check_listing``): a reader never opens a path outside the cache.

Caches of format 3 (made before the cache id) are read as they are; the next extract upgrades one in place
(``upgrade``): it gets a cache id, and its listed format-3 shards, which carry no id, stay its own because cache.json
lists them (``owns_listed``). A format-3 shard that cache.json does not list is nobody's we can tell (a killed
format-3 run's, or another cache's in a shared ``shards/``): left alone, never adopted or deleted.

One writer at a time: an extract holds an ``flock`` on ``CACHE/.lock`` (released by the kernel when the process
dies, so a killed run never leaves a stale lock) and writes its pid, host and start time into it.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

from . import schema, store
from .schema import FORMAT_VERSION, PRE_ID_FORMAT, READ_FORMATS
from .store import CacheError, file_sha256
from .sources import FileNote

LOCK_FILE = store.LOCK_FILE


class CacheBusy(CacheError):
    """Another process is writing the cache."""


def shard_record(path: Path, rows: int, views: int = 1) -> dict:
    rec = {"rows": int(rows), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if views > 1:  # single-view shards keep the record they always had
        rec["views"] = int(views)
    return rec


def session_of(name: str) -> str:
    """``part-<session>-r<rank>-<seq>.ext`` -> ``<session>``."""
    return name.split("-")[1] if name.count("-") >= 3 else ""


# ------------------------------------------------------------------------------------------------- the lock

class WriterLock:
    """Exclusive, non-blocking ``flock`` on the cache folder itself for the lifetime of one extract (a lock on a
    file inside could be defeated by deleting that file); ``CACHE/.lock`` only tells who holds it."""

    def __init__(self, cache: Path):
        self.cache = Path(cache)
        self.path = self.cache / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "WriterLock":
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.cache, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise self.unwritable(e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self.busy(read_holder(self.path)) from None
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv[:3]), **self.holder_extra()}
        try:
            store.atomic_write(self.path, lambda t: t.write_text(json.dumps(holder)))
        except OSError as e:
            os.close(fd)
            if store.is_disk_full(e):
                raise  # the extract's one-line "disk full" names the file and the fix
            raise self.unwritable(e) from None
        self.fd = fd
        return self

    # The three things a lock on another kind of folder (a run folder: runfolder.RunLock) words differently.
    def busy(self, holder: dict) -> Exception:
        return CacheBusy(f"{self.cache}: another extract is writing this cache ({describe_holder(holder)}); wait "
                         f"for it to finish, or stop it and re-run this command")

    def unwritable(self, e: OSError) -> Exception:
        return CacheError(f"{self.cache}: cannot write here ({e.strerror or e}); extract needs a writable cache "
                          f"folder")

    def holder_extra(self) -> dict:
        return {}

    def close(self) -> None:
        self.__exit__()

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def read_holder(lock_path: Path) -> dict:
    try:
        return json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(h: dict) -> str:
    if not h:
        return "holder unknown"
    return f"pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}"


def writer_active(cache: Path) -> dict | None:
    """The holder of the writer lock if an extract is running on ``cache`` now, else None. Read-only safe."""
    if store.flock_held(cache, directory=True) is False:
        return None
    return read_holder(Path(cache) / LOCK_FILE) or {"pid": "?"}  # (None, no locks here: counted as held, as ever)


# ------------------------------------------------------------------------------------------------- readers

@dataclass
class ReadPlan:
    shards: list[Path]
    complete: bool
    note: str = ""  # why the cache is incomplete, when it is
    dedupe: bool = False  # uncommitted shards may repeat ids: keep the newest row


def format_refusal(cache: Path, meta: dict) -> str | None:
    """Why a cache of this format cannot be used (the one rule for readers and extract), None when it can."""
    v = meta.get("format_version")
    if v in READ_FORMATS:
        return None
    return (f"{cache}: written by another fedclip-cache version (cache format {v}; this version reads formats "
            f"{' and '.join(map(str, READ_FORMATS))}); re-extract into a new output folder")


def cache_id_or_none(cache: Path, meta: dict) -> str:
    """The cache's id; "" for a format-3 cache, which has none (its shards are its own only by the listing)."""
    return "" if meta.get("format_version") == PRE_ID_FORMAT else store.cache_id_of(cache, meta)


def upgrade(meta: dict) -> dict:
    """A format-3 cache's metadata as format 4: a new cache id, everything else kept (its listed shards stay its
    own: ``owns_listed``). Only the writer calls this, under the lock; the id is on disk with the run's first
    in-progress cache.json, before any shard that carries it."""
    rest = {k: v for k, v in meta.items() if k not in ("format_version", "cache_id")}
    return {"format_version": FORMAT_VERSION, "cache_id": store.new_cache_id(), **rest}  # id near the top


def owns_listed(smeta: dict, cache_id: str) -> bool:
    """Whether a shard that cache.json lists belongs to this cache: it carries the cache's id, or it is a format-3
    shard (no id at all), which the listing alone makes this cache's."""
    if smeta.get("format_version") == PRE_ID_FORMAT:
        return "cache_id" not in smeta
    return smeta.get("cache_id") == cache_id


def plan_read(cache: Path, meta: dict, allow_incomplete: bool = False, verify: bool = False) -> ReadPlan:
    """The shard files a reader may serve; refuses an incomplete or damaged cache with a one-line message."""
    cache = Path(cache)
    refusal = format_refusal(cache, meta)
    if refusal:
        raise CacheError(refusal)
    cid = cache_id_or_none(cache, meta)  # "": format 3, whose unlisted shards are those without an id (as it read)
    listed = check_listing(cache, meta)
    if meta.get("state") != "complete":
        holder = writer_active(cache)
        why = (f"extract is still writing it ({describe_holder(holder)})" if holder
               else "the extract that was writing it stopped before finishing")
        # only this cache's shards: a shards/ folder shared with other caches holds theirs too
        on_disk = [p for p in store.shard_files(cache, meta["format"]) if p.name in listed
                   or store.shard_cache_id(p) in (cid, None)]
        if not allow_incomplete:
            raise CacheError(f"{cache}: incomplete cache: {why}; {len(on_disk)} shard(s) on disk. Re-run the same "
                             f"`fedclip-cache extract` command to finish it, or pass --allow-incomplete to use "
                             f"what is there")
        return ReadPlan(on_disk, False, why, dedupe=True)  # an unreadable one: "damaged shard", named
    out = []
    for name, rec in listed.items():
        p = cache / store.SHARD_DIR / name
        if not p.is_file():
            raise CacheError(f"{p}: shard listed in {store.META_FILE} is missing; re-run the same "
                             f"`fedclip-cache extract` command to re-embed its rows")
        size = p.stat().st_size
        if size != rec.get("bytes"):
            raise CacheError(f"{p}: damaged shard ({size} bytes, {rec.get('bytes')} committed); re-run the same "
                             f"`fedclip-cache extract` command to re-embed its rows")
        if verify and file_sha256(p) != rec.get("sha256"):
            raise CacheError(f"{p}: damaged shard (checksum differs from the committed one); re-run the same "
                             f"`fedclip-cache extract` command to re-embed its rows")
        out.append(p)
    return ReadPlan(sorted(out), True)


def check_listing(cache: Path, meta: dict) -> dict:
    """The committed shard list, each name a plain shard file name inside ``shards/`` (see ``store.is_shard_name``):
    a name with a separator, ``..`` or an absolute path would have readers serve rows from outside the cache."""
    listed, bad = usable_listing(meta)
    if bad:
        what = ("has no record (rows, bytes, sha256)" if store.is_shard_name(bad[0], meta["format"]) else
                f"is not a shard file name inside {store.SHARD_DIR}/ (part-<session>-r<rank>-<seq>"
                f"{store.FORMATS[meta['format']]})")
        raise CacheError(f"{Path(cache) / store.META_FILE}: damaged cache: shard entry {str(bad[0])[:120]!r} {what}; "
                         f"re-run the same `fedclip-cache extract` command to repair it")
    return listed


# ------------------------------------------------------------------------------------------------- the writer

class FileStat(NamedTuple):
    """What tells whether a file changed since it was embedded (see ``extract.plan``)."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int


class RowEvent(NamedTuple):
    """An image embedded in shard ``shard`` at row ``position``, from a file with ``stat`` and ``content_hash``."""

    shard: str
    position: int
    stat: FileStat
    content_hash: str


class SkipEvent(NamedTuple):
    """An image attempted and skipped: ``record`` is its skip record (id, path, reason, kind, size, mtime_ns...)."""

    record: dict


Event = Union[RowEvent, SkipEvent]


class Known(NamedTuple):
    """What the cache knows of one image id, for planning: its file's ``stat`` when last seen; ``kind`` "row"
    (embedded), "permanent" or "transient" (skipped); the ``content_hash`` embedded ("" for a skip); the number of
    ``views`` its row holds (0 for a skip)."""

    stat: FileStat
    kind: str
    content_hash: str
    views: int


@dataclass
class Inventory:
    """Every shard on disk, sorted into what the cache holds, what a killed run left, and what is damaged.

    ``winners`` maps image id -> the newest event for it (a :class:`RowEvent` or a :class:`SkipEvent`). Committed
    content comes first; shards of runs that never committed come after, in session order; a later event for the
    same id supersedes an earlier one (a changed file, a retried skip).
    """

    listed: dict[str, dict] = field(default_factory=dict)  # committed shards still valid: name -> record
    removed: list[FileNote] = field(default_factory=list)  # (file, why) deleted as damaged or leftover
    foreign: list[str] = field(default_factory=list)  # shards of other caches (a shared shards/): left alone
    no_id: list[str] = field(default_factory=list)  # unlisted format-3 shards: whose cannot be told; left alone
    unknown: list[str] = field(default_factory=list)  # unlisted shards too damaged to tell whose: left alone
    shard_cols: dict[str, dict] = field(default_factory=dict)  # name -> schema index columns, in row order
    winners: dict[str, Event] = field(default_factory=dict)
    shard_views: dict[str, int] = field(default_factory=dict)  # name -> views per row (1: view 0 only)

    def add_shard(self, name: str, cols: dict, skipped: list[dict], views: int = 1) -> None:
        ids = cols["id"]
        self.shard_cols[name] = cols
        self.shard_views[name] = int(views)
        stat = zip(cols["size"].tolist(), cols["mtime_ns"].tolist(), cols["ino"].tolist(), cols["ctime_ns"].tolist())
        for pos, (i, st, digest) in enumerate(zip(ids.tolist(), stat, cols["content_hash"].tolist())):
            self.winners[i] = RowEvent(name, pos, FileStat(*st), digest)
        for rec in skipped:
            self.winners[rec["id"]] = SkipEvent(rec)

    def known(self) -> dict[str, Known]:
        """id -> what the cache knows of it (:class:`Known`)."""
        out = {}
        for i, w in self.winners.items():
            if isinstance(w, RowEvent):
                out[i] = Known(w.stat, "row", w.content_hash, self.shard_views.get(w.shard, 1))
            else:
                r = w.record
                out[i] = Known(FileStat(r["size"], r["mtime_ns"], r.get("ino", -1), r.get("ctime_ns", -1)),
                               r.get("kind", "permanent"), "", 0)
        return out

    def serves(self, image_id: str, shard: str, position: int) -> bool:
        """Whether the newest event of ``image_id`` is the row at ``position`` of ``shard``."""
        w = self.winners.get(image_id)
        return isinstance(w, RowEvent) and w.shard == shard and w.position == position

    def skip_records(self) -> dict[str, dict]:
        """id -> skip record, for the ids whose newest event is a skip."""
        return {i: w.record for i, w in self.winners.items() if isinstance(w, SkipEvent)}


def _read_and_check(path: Path, fp: dict, dim: int, cache_id: str, views: dict | None = None,
                    listed: bool = False) -> tuple[dict, dict]:
    footer = store.read_shard_footer(path)
    meta = footer.meta
    if not (owns_listed(meta, cache_id) if listed else meta.get("cache_id") == cache_id):
        raise CacheError(f"{path}: shard of another cache (cache id {meta.get('cache_id')})")
    if meta.get("fingerprint") != fp:
        raise CacheError(f"{path}: shard written with another model/preprocessing")
    k = int(meta.get("views", 1))
    if footer.views_width != (k - 1) * dim:
        raise CacheError(f"{path}: shard says {k} views per row but stores {footer.views_width} view values "
                         f"per row")
    if k > 1 and (meta.get("augment") != (views or {}).get("augment")
                  or meta.get("augment_seed") != (views or {}).get("seed")):
        raise CacheError(f"{path}: shard's views were made with another augmentation recipe or seed")
    rows, dim_on_disk = footer.rows, footer.dim if footer.dim is not None else meta.get("dim")
    if rows != meta.get("rows") or meta.get("dim") != dim or dim_on_disk != dim:
        raise CacheError(f"{path}: shard holds {rows} rows of width {dim_on_disk}, expected {meta.get('rows')} "
                         f"of width {dim}")
    cols, _ = store.read_shard(path, schema.column_names(index=True), False, dim)
    return meta, cols


def take_inventory(cache: Path, meta: dict, fp: dict, dim: int, verify: bool = False) -> Inventory:
    """Sort the shards on disk before a run plans; damaged and leftover ones of this cache are deleted (their rows
    are then simply not cached, so the run re-embeds them). A shard is this cache's when cache.json lists it, or
    when its own metadata names this cache's id; any other (a ``shards/`` folder shared with other caches) is never
    read further, adopted, retired or deleted. Only ever called by the one writer, under the lock."""
    views, cid = meta.get("views"), meta["cache_id"]
    cache = Path(cache)
    inv = Inventory()
    listed, bad = usable_listing(meta)
    inv.removed += [FileNote(str(n)[:120], "listed without a valid record; dropped from the listing"
                     if store.is_shard_name(n, meta["format"]) else
                     f"not a shard file name inside {store.SHARD_DIR}/; dropped from the listing (that path was never "
                     f"read or touched)") for n in bad]
    last = meta.get("last_session") or ""
    for rec in meta.get("skipped", []):  # committed skip records are the oldest events; shards refine them
        if rec.get("kind") != "scan":
            inv.winners[rec["id"]] = SkipEvent(rec)
    for p in store.shard_files(cache, meta["format"]):
        name, rec = p.name, listed.get(p.name)
        if rec is None:  # not in this cache's commit record: ours only if the shard itself says so
            owner = store.shard_cache_id(p)
            if owner != cid:
                (inv.unknown if owner is None else inv.no_id if owner == "" else inv.foreign).append(name)
                continue
            if session_of(name) <= last:
                # A shard the last commit retired but a crash left on disk: never serve it again.
                p.unlink()
                inv.removed.append(FileNote(name, "left over from an earlier run's compaction"))
                continue
        try:
            if rec is not None and (p.stat().st_size != rec.get("bytes") or
                                    (verify and file_sha256(p) != rec.get("sha256"))):
                raise CacheError(f"{p}: size or checksum differs from the committed one")
            smeta, cols = _read_and_check(p, fp, dim, cid, views, listed=rec is not None)
        except CacheError as e:
            p.unlink()
            inv.removed.append(FileNote(name, f"damaged: {str(e).split(': ', 1)[-1]}"))
            continue
        inv.add_shard(name, cols, smeta.get("skipped", []), int(smeta.get("views", 1)))
        if rec is not None:  # unlisted shards that pass are a killed run's: adopted as the newest events
            inv.listed[name] = rec
    gone = {n for n, _ in inv.removed}
    inv.removed += [FileNote(n, "listed in cache.json but missing on disk") for n in listed if n not in inv.listed
                    and n not in gone]
    return inv


def usable_listing(meta: dict) -> tuple[dict, list]:
    """(the committed shards: plain shard file names of the cache's format, each with a record; the entries that
    are not). Readers refuse a cache with any of the latter (``check_listing``); extract drops them."""
    raw = meta.get("shards") or {}
    if not isinstance(raw, dict):
        return {}, [raw]
    ok = {n: r for n, r in raw.items() if store.is_shard_name(n, meta["format"]) and isinstance(r, dict)}
    return ok, [n for n in raw if n not in ok]


def add_new_shards(cache: Path, meta: dict, fp: dict, dim: int, inv: Inventory, session: str) -> list[str]:
    """Add the shards this run wrote (the files of its session not yet in ``inv``) as the newest events."""
    new = []
    for p in store.shard_files(cache, meta["format"]):
        if p.name not in inv.shard_cols and session_of(p.name) == session:
            smeta, cols = _read_and_check(p, fp, dim, meta["cache_id"], meta.get("views"))
            inv.add_shard(p.name, cols, smeta.get("skipped", []), int(smeta.get("views", 1)))
            new.append(p.name)
    return new


def clean_temporaries(cache: Path, cache_id: str) -> int:
    """Remove the half-written temporary files a killed run of this cache left (only ever called under the writer
    lock): only names of our temporary pattern (``store.TMP_NAME``) for a file this cache owns, and in ``shards/``
    only those that carry this cache's id; never one a live process is still writing (a reader's features.npy). A
    user's ``.notes.tmp``, or another cache's file in a shared ``shards/``, is never touched."""
    n = 0
    for folder, owners, ours in ((Path(cache), ("", cache_id), store.ROOT_FILES.__contains__),
                                 (Path(cache) / store.SHARD_DIR, (cache_id,), store.SHARD_NAME.fullmatch)):
        if folder.is_dir():
            for stale in folder.glob(f"{store.TMP_PREFIX}*.tmp"):
                tmp = store.temporary_of(stale.name)
                if tmp and tmp[0] in owners and ours(tmp[1]) and not store.temporary_in_use(stale):
                    stale.unlink(missing_ok=True)
                    n += 1
    return n


def check_not_a_copy(out: Path, meta: dict) -> None:
    """Refuse to write a cache that is a copy of another over the same shard files. ``cp -a`` of a cache whose
    ``shards/`` is a link (a shards folder shared by caches) copies the link: two cache.json files with one cache id
    over one folder of shards, so extracting either retires, supersedes and deletes the other's shards (and its
    temporary files). ``cache.json`` records the folder it was last written in (``folder``); when that folder still
    holds a cache of the same id whose ``shards/`` is this one's, this folder is the copy. A moved cache (the old
    folder gone) or a copy with its own shards (``cp -rL``) is not refused; its record then follows it."""
    was, here = meta.get("folder"), os.path.realpath(out)
    if not isinstance(was, str) or was == here:
        return
    try:
        if os.path.samefile(was, here):
            return  # the same folder by another path (a second mount of the same file system, a bind mount)
        twin = os.path.samefile(os.path.join(was, store.SHARD_DIR), os.path.join(here, store.SHARD_DIR)) and \
            store.read_meta(Path(was)).get("cache_id") == meta.get("cache_id")
    except (OSError, CacheError):
        return  # the old folder is gone or not a cache: moved, not copied
    if twin:
        raise CacheError(f"{out}: a copy of the cache at {store.display_text(was)} (the same cache id) over the same "
                         f"shards folder ({store.display_text(os.path.realpath(os.path.join(here, store.SHARD_DIR)))}"
                         f"): extracting into either would delete the other's shards; extract into a new output "
                         f"folder (copy a cache with its own shards: cp -rL)")


def check_output_folder(out: Path) -> None:
    """Extract writes into a new or empty folder, into a cache, or into what a killed first extract left there (its
    lock, temporary files, an empty ``shards/``); anything else is someone's folder, refused before a file is
    written into it. A ``shards/`` that holds only shard files (a folder, or a link to one, shared with other
    caches) is a cache folder being set up."""
    out = Path(out)
    try:
        names = sorted(os.listdir(out)) if out.is_dir() else []
    except OSError:
        return  # unreadable: the writer lock says so in one line ("cannot write here")
    if store.META_FILE in names:
        try:
            store.read_meta(out)
            return
        except CacheError:
            if _damaged_but_ours(out, names):
                return  # our cache, damaged metadata: extract rebuilds it
        others = [store.META_FILE]
    else:
        others = [n for n in names if not _leftover(out, n)]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise CacheError(f"{out}: not empty and not a fedclip-cache cache (it holds "
                         f"{store.display_text(others[0])!r}{more}); extract into a new or empty folder, or into "
                         f"an existing cache's folder")


def _damaged_but_ours(out: Path, names: list[str]) -> bool:
    """Whether a folder whose ``cache.json`` cannot be read is one of our caches: our lock's holder note, a shard or
    temporary file of ours in ``shards/``, or our keys in what is left of the file. A ``cache.json`` beside a
    ``shards/`` folder is not enough: another tool's folder may be laid out so (its cache.json was overwritten)."""
    holder = read_holder(out / LOCK_FILE) if LOCK_FILE in names else {}
    if isinstance(holder, dict) and {"pid", "command"} <= set(holder):
        return True
    try:
        if any(store.SHARD_NAME.fullmatch(n) or store.temporary_of(n) for n in os.listdir(out / store.SHARD_DIR)):
            return True
    except OSError:
        pass
    try:
        with open(out / store.META_FILE, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return b'"cache_id"' in head or b'"fingerprint"' in head


def _leftover(out: Path, name: str) -> bool:
    if name == LOCK_FILE:
        return True
    tmp = store.temporary_of(name)
    if tmp:
        return tmp[1] in store.ROOT_FILES
    d = out / name
    if name != store.SHARD_DIR or not d.is_dir():
        return False
    try:
        entries = os.listdir(d)
    except OSError:
        return False
    for entry in entries:
        tmp = store.temporary_of(entry)
        if not (store.SHARD_NAME.fullmatch(entry) or (tmp and store.SHARD_NAME.fullmatch(tmp[1]))):
            return False
    return True
