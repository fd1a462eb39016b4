"""Readers: turn a dataset on disk into one columnar table of image records.

Two inputs are understood:

* the DomainBed folder layout ``ROOT/<domain>/<class>/<image>`` (PACS, VLCS, Office-Home, DomainNet), where the
  class index is the position in the sorted union of class names over all domains;
* a manifest (CSV or Parquet) with columns ``path``, ``label`` (class name), ``domain`` and optional ``client``
  and ``split``; relative paths resolve against the manifest's folder.

Nothing is dropped silently: files that cannot be images (wrong extension, stray files outside a class folder)
and folders that are this tool's own outputs (a cache, a run or sweep folder written inside the dataset) are returned
in ``ignored`` with the reason.

Names are checked here, once for both inputs: domain and client names become file and folder names later (a
deployment's ``logs/site-<domain>.log``, a held-out site's cache folder), so they must be one plain path component
(:func:`check_path_name`); class names only become prompt text (:func:`check_label_text`). A source with no usable
image is an error naming why (:func:`scan`), never an empty cache.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import stat
import unicodedata
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import numpy as np
from ..errors import FedclipCacheError

if TYPE_CHECKING:
    from .bytesources import BlobRows, Columns

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class SourceError(FedclipCacheError, ValueError):
    """The dataset folder or manifest is unusable; the message names the file and the fix."""


class FileNote(NamedTuple):
    """A file (or folder) and why it was ignored, skipped, repaired or removed: what reports list."""

    path: str
    reason: str


@dataclass
class ImageTable:
    """One row per image; every column is a numpy array of equal length."""

    root: Path
    relpath: np.ndarray  # str: path relative to root (or absolute for manifest rows outside it); undecodable
    #                      file-name bytes are kept as surrogate escapes (os.fsdecode), so os.fsencode is lossless
    domain: np.ndarray
    client: np.ndarray
    class_name: np.ndarray
    split: np.ndarray  # "" when the source does not say
    size: np.ndarray  # int64 bytes
    mtime_ns: np.ndarray  # int64
    ino: np.ndarray  # int64 inode number and ctime: a rename, swap or copy changes them even when size and mtime
    ctime_ns: np.ndarray  # are equal (then the content hash decides whether the file really changed)
    ignored: list[FileNote] = field(default_factory=list)  # (path, reason): not images, never attempted
    problems: list[FileNote] = field(default_factory=list)  # (path, reason): image names we cannot read
    #                                  (broken link, link loop, FIFO/device, unlistable folder): skipped, re-checked
    #                                  on every scan
    blobs: Optional["BlobRows"] = None  # rows whose image is bytes inside a container file (bytesources.py): where
    #                                     each row's bytes are; None: each row is the file root/relpath
    class_order: Optional[list] = None  # the source's own class list in label order (HF ClassLabel names)

    def __len__(self) -> int:
        return len(self.relpath)

    @functools.cached_property
    def ids(self) -> np.ndarray:
        return np.array([image_id(p) for p in self.relpath], dtype=object)

    @property
    def classes(self) -> list[str]:
        """The class list in label order: the source's own (HF ClassLabel names) when it has one, else sorted."""
        return list(self.class_order) if self.class_order else sorted(set(self.class_name.tolist()))

    @classmethod
    def row_fields(cls) -> tuple[str, ...]:
        """The per-image fields (numpy arrays of equal length), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _TABLE_FIELDS)

    def take(self, idx: np.ndarray) -> "ImageTable":
        """The rows ``idx`` (every per-image field, by name; the ignored and problem lists stay whole)."""
        blobs = self.blobs.take(idx) if self.blobs is not None else None
        return dataclasses.replace(self, **{f: getattr(self, f)[idx] for f in self.row_fields()}, blobs=blobs)


_TABLE_FIELDS = frozenset({"root", "ignored", "problems", "blobs", "class_order"})  # about the whole scan, not per image


def image_id(relpath: str) -> str:
    """Stable id of an image: a hash of its path relative to the dataset root (same on every machine)."""
    return hashlib.blake2b(os.fsencode(relpath), digest_size=8).hexdigest()


def label_text(name: str) -> str:
    """A domain or class name as valid UTF-8 text (undecodable bytes of a folder name become \\xNN)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def shown(path) -> str:
    """A path or name for a one-line message: undecodable bytes as \\xNN, control characters escaped (a folder
    name may hold a newline)."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in label_text(str(path)))


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def stat_image(path: str) -> tuple[os.stat_result | None, str]:
    """``(stat, "")`` for a regular file (links followed), else ``(None, reason)``; never opens the file, so a
    FIFO named ``x.jpg`` cannot hang the scan."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return None, f"broken symbolic link (target {os.readlink(path)!r} missing)"
        return None, "missing on disk"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symbolic link loop"
        return None, f"cannot stat: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return None, f"not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')})"
    return st, ""


# ------------------------------------------------------------------------------------------------ names

# Domain and client names are used as ONE path component (``site-<domain>.log``, ``heldout/<domain>/``), with a
# prefix or suffix of our own: 200 bytes leaves room for those under the 255-byte limit of Linux/macOS file systems.
MAX_NAME_BYTES = 200
_NAME_RULE = "one plain name: not empty, not '.' or '..', no '/' or '\\', no control characters, no leading or trailing " \
             f"spaces, at most {MAX_NAME_BYTES} bytes"


def _text_problem(name: str) -> str:
    """Why ``name`` is unusable even as text (a label, a prompt word), or ""."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if any(0xDC80 <= ord(ch) <= 0xDCFF for ch in name):
        return "is not valid UTF-8"  # undecodable file-name bytes (surrogate escapes)
    bad = next((ch for ch in name if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        return f"holds the control character {bad!r}"
    if name != name.strip():
        return "has leading or trailing spaces (so 'art' and 'art ' would be two names)"
    return ""


def path_name_problem(name: str) -> str:
    """Why ``name`` cannot be used as one path component, or "" when it can (the rule of :func:`check_path_name`)."""
    why = _text_problem(name)
    if why:
        return why
    if name in (".", ".."):
        return "is a path component that means " + ("this folder" if name == "." else "the parent folder")
    sep = next((ch for ch in name if ch in "/\\"), None)
    if sep is not None:
        return f"holds the path separator {sep!r}"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is {len(name.encode('utf-8'))} bytes long"
    return ""


def quoted(name, keep: int = 100) -> str:
    """``repr(name)`` for a one-line message, cut to its first ``keep`` characters when long: a 15 MB manifest cell
    (or a --classes file of zeros) made a 63 MB 'one-line' error."""
    text = repr(name)
    return text if len(text) <= keep + 20 else f"{text[:keep]}… ({len(name):,} characters)"


def check_path_name(kind: str, name: str, where: str) -> None:
    """Refuse a ``kind`` name ("domain", "client", a held-out site ...) that cannot be used as one file or folder name:
    the one rule for every name that ends up in a path. ``where`` says where the name came from (a manifest row
    and column, a folder); the error names it, the name and the rule. Callers that build paths from names read
    from an older cache (``deploy``, ``simulate``) call it too, defensively."""
    why = path_name_problem(name)
    if why:
        raise SourceError(f"{where}: {kind} name {quoted(name)} {why}; {kind} names become file and folder names (e.g. "
                          f"logs/site-<domain>.log), so each must be {_NAME_RULE}: rename it")


def check_label_text(kind: str, name: str, where: str) -> None:
    """Refuse a class name that is unusable as prompt text (empty, control characters, surrounding spaces). Class
    names never become file names, so '/' is allowed ("T-shirt/top", "AC/DC")."""
    why = _text_problem(name)
    if why:
        raise SourceError(f"{where}: {kind} name {quoted(name)} {why}; a {kind} name is prompt text: not empty, no control "
                          f"characters, no leading or trailing spaces")


def _check_column(path: Path, column: str, values: np.ndarray, check, kind: str) -> None:
    """Check each distinct value of a manifest column once; the error names the first row that holds a bad one."""
    for v in dict.fromkeys(values.tolist()):
        try:
            check(kind, v, "")
        except SourceError:
            row = int(np.flatnonzero(values == v)[0]) + 2  # + header line, 1-based
            check(kind, v, f"{shown(path)}: row {row}, column {column!r}")


# ------------------------------------------------------------------------------------- our own outputs

def _json_keys(path: str) -> set:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))  # our records are small; a big file is not ours
        return set(data) if isinstance(data, dict) else set()
    except (OSError, ValueError):
        return set()


def own_output(folder: str, files) -> str:
    """Why ``folder`` (holding the file names ``files``) is one of this tool's own outputs, or "": a cache
    (``cache.json`` with a ``shards/`` folder), a ``federate``/``deploy`` run folder (``config.json`` with a
    ``federate`` record), a sweep (``sweep.json`` with its grid) or a pipeline run (``pipeline.json``). Such a folder
    inside the dataset (``federate -o DATA/runs/x``) holds plots, not data: embedding them would add a domain of
    PNG charts. The JSON is read only when the marker's name is present, so scanning costs nothing more."""
    files = set(files)
    if "cache.json" in files and os.path.isdir(os.path.join(folder, "shards")):
        return "a fedclip-cache cache (cache.json + shards/)"
    for marker, keys, what in (("config.json", {"federate"}, "run folder"), ("sweep.json", {"grid", "base"}, "sweep"),
                               ("pipeline.json", {"pipeline", "resolved"}, "pipeline run")):
        if marker in files and keys <= _json_keys(os.path.join(folder, marker)):
            return f"a fedclip-cache {what} ({marker})"
    return ""


OWN_OUTPUT = "inside the dataset: not data, skipped"  # ends the ``ignored`` reason of our own output folders


def _skip_own(folder: str, files, root: Path, exclude: tuple[str, ...], ignored: list) -> bool:
    """Whether to skip ``folder``: it is one of our outputs, or a folder ``extract`` was told to leave out (its own
    cache folder); if so it is listed in ``ignored`` with the reason."""
    why = "the cache folder of this extract" if exclude and os.path.realpath(folder) in exclude else \
        own_output(folder, files)
    if why:
        ignored.append(FileNote(os.path.relpath(folder, root) + os.sep, f"{why} {OWN_OUTPUT}"))
    return bool(why)


def _stat_row(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


_STAT_FIELDS = ("size", "mtime_ns", "ino", "ctime_ns")  # the order of _stat_row


def _stat_columns(rows: list) -> dict[str, np.ndarray]:
    """size, mtime_ns, ino, ctime_ns as int64 arrays, by field name (inode numbers above 2**63 wrap, consistently)."""
    a = np.array(rows, dtype=np.uint64).reshape(-1, 4).view(np.int64)
    return {name: np.ascontiguousarray(a[:, k]) for k, name in enumerate(_STAT_FIELDS)}


def scan_folder(root: str | Path, exclude: Sequence[str | Path] = ()) -> ImageTable:
    """Scan ``ROOT/<domain>/<class>/<image>`` (images may sit in sub-folders of a class folder). Domain and class
    folders may be symbolic links; linked folders below a class folder are listed as ignored, not followed, so a
    link loop can neither recurse nor re-label images. Folders that are our own outputs (:func:`own_output`) and the
    folders in ``exclude`` are listed as ignored, not scanned."""
    root = Path(root)
    exclude = tuple(os.path.realpath(e) for e in exclude)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder; pass a DomainBed-style ROOT/<domain>/<class>/<image> folder, "
                          f"a manifest .csv/.parquet, hf:NAME[:SPLIT], Parquet file(s) with image bytes or WebDataset "
                          f"shards DIR/{{00000..00099}}.tar")
    found = _FolderScan(root, exclude)
    for d in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not d.is_dir():
            found.ignored.append(FileNote(d.name, "file at dataset root (expected ROOT/<domain>/<class>/<image>)"))
            continue
        entries = sorted(d.iterdir())
        if _skip_own(str(d), (p.name for p in entries), root, exclude, found.ignored):
            continue
        for c in (p for p in entries if not p.name.startswith(".")):
            if not c.is_dir():
                found.ignored.append(FileNote(str(c.relative_to(root)), "file directly in a domain folder (no class folder)"))
                continue
            found.class_folder(d, c)
    dom_a = np.array(found.domain, dtype=object)
    return ImageTable(root=root, relpath=np.array(found.relpath, dtype=object), domain=dom_a, client=dom_a.copy(),
                      class_name=np.array(found.class_name, dtype=object),
                      split=np.full(len(found.relpath), "", dtype=object), **_stat_columns(found.stats),
                      ignored=found.ignored, problems=found.problems)


@dataclass
class _FolderScan:
    """What :func:`scan_folder` has found so far: one entry per image in the lists, and the ignored and unreadable
    names."""

    root: Path
    exclude: tuple[str, ...]
    relpath: list = field(default_factory=list)
    domain: list = field(default_factory=list)
    class_name: list = field(default_factory=list)
    stats: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    _checked: set = field(default_factory=set)  # domain and class folders whose names were checked

    def class_folder(self, d: Path, c: Path) -> None:
        """Every image under the class folder ``c`` of the domain folder ``d``."""
        root = self.root

        def unlistable(e: OSError):
            self.problems.append(FileNote(os.path.relpath(e.filename, root), f"cannot list folder: {e.strerror or e}"))

        domain, class_name = label_text(d.name), label_text(c.name)
        for dirpath, dirnames, filenames in os.walk(c, onerror=unlistable):
            if _skip_own(dirpath, filenames + dirnames, root, self.exclude, self.ignored):
                dirnames.clear()
                continue
            # Linked sub-folders are not followed: inside a dataset they are aliases or loops (a link to ".."
            # would re-label a whole domain). Link the class folder itself, or list files in a manifest.
            for sub in [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]:
                dirnames.remove(sub)
                self.ignored.append(FileNote(os.path.relpath(os.path.join(dirpath, sub), root),
                                     "linked folder inside a class folder, not followed (link the class folder "
                                     "itself, or list the files in a manifest)"))
            dirnames.sort()
            for f in sorted(filenames):
                r = os.path.relpath(os.path.join(dirpath, f), root)
                if f.startswith("."):
                    continue  # .DS_Store and friends are not data
                if Path(f).suffix.lower() not in IMAGE_EXTENSIONS:
                    self.ignored.append(FileNote(r, "not an image file extension"))
                    continue
                fst, why = stat_image(os.path.join(dirpath, f))
                if fst is None:
                    self.problems.append(FileNote(r, why))
                    continue
                self._check_names(d, c)  # only folders that hold images name a domain or a class
                self.relpath.append(r)
                self.domain.append(domain)
                self.class_name.append(class_name)
                self.stats.append(_stat_row(fst))

    def _check_names(self, d: Path, c: Path) -> None:
        if d not in self._checked:
            check_path_name("domain", d.name, f"{shown(d)} (a domain folder)")
            self._checked.add(d)
        if c not in self._checked:
            check_label_text("class", label_text(c.name), f"{shown(c)} (a class folder)")
            self._checked.add(c)


def scan_manifest(path: str | Path) -> ImageTable:
    """Read a CSV or Parquet manifest with columns path, label, domain[, client][, split].

    Rows naming the same file (a relative and an absolute spelling, or a link to it) are one image: the first
    row is kept and the others listed as ignored; if they disagree on label, domain, client or split, that is an
    error. Paths under the manifest's folder are stored relative to it, so the image id does not depend on the
    spelling.
    """
    path = Path(path)
    m = _manifest_columns(path)
    root = path.parent.resolve()
    keep, rel, stats, ignored, problems = [], [], [], [], []
    first_row: dict[str, int] = {}
    for i, p in enumerate(m.path.tolist()):
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))
        if Path(p).suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append(FileNote(p, "not an image file extension"))
            continue
        st, why = stat_image(full)
        if st is None:
            (ignored if why == "missing on disk" else problems).append(
                (p, "listed in manifest but missing on disk" if why == "missing on disk" else why))
            continue
        key = os.path.realpath(full)
        if key in first_row:
            ignored.append(_same_file(path, m, first_row[key], i))
            continue
        first_row[key] = i
        keep.append(i)
        rel.append(full[len(str(root)) + 1:] if full.startswith(str(root) + os.sep) else full)
        stats.append(_stat_row(st))
    k = np.array(keep, np.int64)
    return ImageTable(root=root, relpath=np.array(rel, dtype=object), domain=m.domain[k], client=m.client[k],
                      class_name=m.label[k], split=m.split[k], **_stat_columns(stats), ignored=ignored,
                      problems=problems)


class _Manifest(NamedTuple):
    """A manifest's columns, checked, one str per row (``client`` defaults to the domain, ``split`` to "")."""

    path: np.ndarray
    label: np.ndarray
    domain: np.ndarray
    client: np.ndarray
    split: np.ndarray


def _manifest_columns(path: Path) -> _Manifest:
    """Read the manifest file and check its columns: required ones present and never empty, domain and client
    names usable as one path component, labels usable as prompt text."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SourceError(f"{path}: manifest not found")
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in ("path", "label", "domain", "client", "split")}))
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: cannot read manifest ({str(e).splitlines()[0][:200]}); expected a UTF-8 CSV "
                          f"or a Parquet file") from None
    missing = [c for c in ("path", "label", "domain") if c not in table.column_names]
    if missing:
        raise SourceError(f"{path}: manifest lacks column(s) {', '.join(missing)}; required: path, label, domain "
                          f"(optional: client, split)")

    def col(name):
        if name not in table.column_names:
            return None
        arr = table.column(name).cast(pa.string()).to_numpy(zero_copy_only=False)
        return np.array(["" if v is None else v for v in arr], dtype=object)

    paths, labels, domains = col("path"), col("label"), col("domain")
    for name, arr in (("path", paths), ("label", labels), ("domain", domains)):
        empty = np.flatnonzero(arr == "")
        if len(empty):
            raise SourceError(f"{path}: column {name!r} is empty on row {int(empty[0]) + 2}; every row needs "
                              f"path, label and domain")
    clients = col("client")
    clients = domains.copy() if clients is None else np.where(clients == "", domains, clients)
    _check_column(path, "domain", domains, check_path_name, "domain")
    _check_column(path, "client", clients, check_path_name, "client")
    _check_column(path, "label", labels, check_label_text, "class")
    splits = col("split")
    splits = np.full(len(paths), "", dtype=object) if splits is None else splits
    return _Manifest(paths, labels, domains, clients, splits)


def _same_file(path: Path, m: _Manifest, j: int, i: int) -> tuple[str, str]:
    """The ignored entry for manifest row ``i``, which names the same file as row ``j``; an error when the two
    rows disagree on what the file is."""
    for field_name in ("label", "domain", "client", "split"):
        a = getattr(m, field_name)
        if a[i] != a[j]:
            raise SourceError(f"{path}: rows {j + 2} and {i + 2} name the same file ({m.path[j]} and {m.path[i]}) "
                              f"with different {field_name}; keep one of them")
    return m.path[i], f"same file as manifest row {j + 2} ({m.path[j]}); embedded once"


def scan(source: str | Path, exclude: Sequence[str | Path] = (), columns: Optional["Columns"] = None) -> ImageTable:
    """The image table of a DomainBed folder, a manifest, or a source whose images are bytes inside container files
    (``hf:NAME[:SPLIT]``, Parquet with image bytes, WebDataset tar shards: :mod:`.bytesources`, read with
    ``columns``); ``exclude``: folders not to scan (the cache being written, when it sits inside the dataset). A
    source with no usable image is an error that says why."""
    from .bytesources import Columns, container_kind, scan_containers

    columns = columns or Columns()
    if container_kind(str(source)):
        return scan_containers(str(source), columns)
    if columns != Columns():
        raise SourceError(f"{shown(source)}: --image-column, --label-column, --domain-column, --client-column, "
                          f"--split-column and --domain are for Parquet, hf: and WebDataset sources; a folder or "
                          f"manifest names its own columns (leave them out)")
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".csv", ".parquet", ".tsv"):
        table = scan_manifest(source)
    elif source.is_file():
        raise SourceError(f"{source}: a manifest must be .csv or .parquet")
    else:
        table = scan_folder(source, exclude)
    if not len(table):
        raise SourceError(f"{shown(source)}: {nothing_to_extract(table, source.is_file())}")
    return table


def nothing_to_extract(table: ImageTable, manifest: bool) -> str:
    """Why a scan found no usable image, and the fix (the rest of a one-line error). Also refused when a cache
    exists: an empty source is far more often a typo, an unmounted disk or a manifest cut short than a dataset whose
    every image was deleted, and retiring a whole cache on that guess cannot be undone."""
    found = "; ".join(f"{len(items)} {what}, first: {shown(items[0][0])}: {items[0][1]}"
                      for what, items in (("ignored", table.ignored), ("unreadable", table.problems)) if items)
    if table.problems:
        fix = "fix or replace the unreadable files"
    elif manifest:
        fix = "list existing image files (path, label, domain) in it"
    else:
        fix = f"expected ROOT/<domain>/<class>/<image> with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
    what = "the manifest lists no image" if manifest and found else "the manifest has no rows" if manifest else \
        "no images found"
    return (f"{what}{' that can be embedded (' + found + ')' if found else ''}; {fix} (nothing was extracted; an "
            f"existing cache is left as it was)")
