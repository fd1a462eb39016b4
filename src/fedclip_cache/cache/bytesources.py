"""Sources whose images are bytes inside container files: Parquet (a file, a folder, a glob, a Hugging Face dataset
from the local Hub cache) and WebDataset tar shards. What they share lives here:

* the **row identity**: a row is ``<container path relative to the source root>#<row index or tar key>``, so its
  image id is stable on every machine (:func:`member_path`); whether it changed is told by the content hash of its
  image bytes, computed while the source is scanned (streamed, one batch of rows at a time), and stored in the
  table's ``size`` (the byte count) and ``mtime_ns`` (the first 8 bytes of the hash) columns (:func:`row_stat`),
  so the folder source's planning re-embeds exactly the rows whose bytes changed and retires the rows of a removed
  container (its ids are no longer scanned);
* the **reader** the decode workers use: :class:`BlobRows` (picklable, one entry per row) and
  :meth:`BlobRows.read`, which streams the bytes of one row from its container (a tar member by offset; a Parquet
  row from its row group, the last row group kept per worker): no image is ever written to disk;
* the **columns** a row's label, domain, client and split come from (:class:`Columns`, the extract options
  ``--image-column --label-column --domain-column --client-column --split-column --domain``).

Which form a source is (:func:`container_kind`) is recognised from what is passed; the readers of each form are
:mod:`.parquet_source` (Parquet and ``hf:``) and :mod:`.wds_source` (tar shards).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .sources import FileNote, ImageTable, SourceError, check_label_text, check_path_name, quoted, shown

HF_PREFIX = "hf:"
FORMS = ("a DomainBed folder ROOT/<domain>/<class>/<image>", "a manifest .csv/.parquet with a path column",
         "hf:NAME[:SPLIT] (a dataset in the local Hugging Face cache)",
         "a Parquet file, folder or glob with image bytes", "WebDataset shards DIR/{00000..00099}.tar (a brace "
         "pattern, a glob or a '::'-separated list)")


class Columns(NamedTuple):
    """Where a container row's fields are: Parquet column names, or the keys of a WebDataset sample's ``.json``.
    ``domain``: the one domain of a source without a domain column; with one, only the rows of that domain."""

    image: str = "image"
    label: str = "label"
    domain_column: str = "domain"
    client: Optional[str] = None
    split: Optional[str] = None
    domain: Optional[str] = None


def source_record(source: str) -> str:
    """How a run records its source (``info`` shows it): ``hf:NAME`` as written, paths absolute (a pattern or list
    keeps its braces and wildcards)."""
    if source.startswith(HF_PREFIX):
        return source
    return "::".join(str(Path(p).resolve()) if os.path.exists(p) else os.path.abspath(p) for p in source.split("::"))


def forms_text() -> str:
    return "; ".join(FORMS)


# --------------------------------------------------------------------------------------------- recognising

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """``DIR/{00000..00099}.tar`` -> the 100 names, zero-padded as written (img2dataset's and webdataset's form);
    several ranges multiply out."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    if int(hi) < int(lo):
        raise SourceError(f"{pattern}: the range {{{lo}..{hi}}} counts down; write {{{hi}..{lo}}}")
    out = []
    for k in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[:m.start()] + str(k).zfill(width) + pattern[m.end():])
    return out


def _has_magic(text: str) -> bool:
    return bool(_BRACE.search(text)) or glob.has_magic(text)


def container_kind(source: str) -> str:
    """"hf", "parquet", "tar" or "" (a folder or manifest: :func:`.sources.scan` reads it) for what was passed."""
    if source.startswith(HF_PREFIX):
        return "hf"
    parts = source.split("::")
    if not os.path.exists(source) and (len(parts) > 1 or _has_magic(source)):  # "/data/PACS [v2]" is a folder
        if "" in parts:
            raise SourceError(f"{shown(source)}: an empty name in the '::' list (a leading, trailing or doubled '::'); "
                              f"write NAME::NAME")
        names = [n for p in parts for n in expand_braces(p)]
        exts = {_ext(n) for n in names}
        if exts <= {".tar"}:
            return "tar"
        if exts <= {".parquet"}:
            return "parquet"
        found = sorted({_ext(n) or f"no extension in {quoted(shown(n))}" for n in names})
        raise SourceError(f"{shown(source)}: a pattern or list must name .tar shards or .parquet files, e.g. "
                          f"'d/*.parquet' (found {', '.join(found[:4])}); pass one of: {forms_text()}")
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".tar":
        return "tar"
    if p.is_file() and p.suffix.lower() == ".parquet":
        return "" if _is_manifest(p) else "parquet"
    if p.is_dir() and _parquet_folder(p):
        return "parquet"
    return ""


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _is_manifest(path: Path) -> bool:
    """A Parquet with a ``path`` column and no image-bytes column is a manifest (the existing form)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception:  # unreadable: the manifest reader says why
        return True
    return "path" in names and not any(bytes_type(pq.read_schema(path).field(n).type) for n in names)


def bytes_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return any(t.field(k).name == "bytes" for k in range(t.num_fields))
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _parquet_folder(p: Path) -> bool:
    """A folder holding Parquet files (at any depth, e.g. the Hub's ``data/``) and no image files is a Parquet
    source; a DomainBed folder holds images."""
    from .sources import IMAGE_EXTENSIONS

    found = False
    for _, _, files in _walk(p):
        for f in files:
            e = _ext(f)
            if e in IMAGE_EXTENSIONS:
                return False
            found = found or e == ".parquet"
    return found


def _walk(root: Path):
    """``os.walk`` of a source folder without hidden folders and without this tool's own outputs (a cache written
    inside the folder holds Parquet shards that are not data: :func:`.sources.own_output`)."""
    from .sources import own_output

    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and
                         not own_output(os.path.join(top, d), _listdir(os.path.join(top, d))))
        yield top, dirs, files


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def resolve_files(source: str, ext: str) -> tuple[Path, list[Path]]:
    """(root, container files, sorted) of a file, a folder (searched at any depth), a glob, a brace pattern or a
    '::' list. ``root`` is the folder row paths are relative to: the folder, the file's folder, or the fixed folder
    part of a pattern, so ids do not depend on which shards a pattern happens to name. Names that match nothing
    are one-line errors."""
    parts = source.split("::")
    if len(parts) == 1 and Path(source).is_dir():
        root = Path(source)
        files = sorted(Path(d) / f for d, _, fs in _walk(root) for f in fs if _ext(f) == ext)
        return root, [_regular(f) for f in files]
    files, missing = [], []
    for part in parts:
        for name in expand_braces(part):
            found = sorted(glob.glob(name)) if glob.has_magic(name) else [name] if os.path.lexists(name) else []
            if not found:
                missing.append(name)
            files += [_regular(Path(f)) for f in found if _ext(f) == ext]
    if missing:
        raise SourceError(f"{shown(source)}: {len(missing)} name(s) the pattern stands for match no file (first: "
                          f"{shown(missing[0])}); check the folder and the range")
    root = Path(os.path.commonpath([os.path.abspath(_fixed_dir(p)) for p in parts]))
    return root, sorted(dict.fromkeys(files))


def _regular(path: Path) -> Path:
    """``path`` when it is a regular file (links followed; stat only, never opened: a FIFO cannot hang the scan),
    else a one-line error, whether it was named, globbed or found in a folder."""
    from .sources import stat_image

    st, why = stat_image(str(path))
    if st is None:
        raise SourceError(f"{shown(path)}: {why}; a container must be a regular file: remove it or leave it out of "
                          f"the pattern")
    return path


def _fixed_dir(pattern: str) -> str:
    """The folder part of ``pattern`` before its first wildcard or brace."""
    head = pattern
    for m in (_BRACE.search(pattern), re.search(r"[*?\[]", pattern)):
        if m:
            head = head[:min(len(head), m.start())]
    return os.path.dirname(head) or "."


# --------------------------------------------------------------------------------------------- the rows

def member_path(container_rel: str, member: str) -> str:
    """A row's path in the cache: its container's path relative to the source root, '#', its row index or tar key."""
    return f"{container_rel}#{member}"


def row_stat(data: bytes) -> tuple[str, int, int]:
    """(content hash, size, mtime_ns stand-in) of a row's image bytes: the hash is the one the decode workers record
    (:func:`.imageio.content_hash`); its first 8 bytes stand in for the mtime, so a row whose bytes changed
    differs in the (size, mtime) pair the planner compares, exactly like a rewritten file."""
    from .imageio import content_hash

    digest = content_hash(data)
    return digest, len(data), int.from_bytes(bytes.fromhex(digest[:16]), "little", signed=True)


@dataclass
class BlobRows:
    """Where each row's image bytes are: ``kind`` "parquet" (``locator``: the row's index in its file; the image
    column ``column``, a struct with ``bytes`` or a binary column) or "tar" (``locator``: the member's data offset,
    ``length`` its size). Picklable: the decode workers get a copy; open files are per process."""

    kind: str
    files: list[str]  # absolute container paths
    file_of: np.ndarray  # int32 per row: index into files
    locator: np.ndarray  # int64 per row
    length: np.ndarray  # int64 per row (tar member size; 0 for Parquet)
    column: str = "image"
    _open: dict = field(default_factory=dict, repr=False, compare=False)

    def take(self, idx: np.ndarray) -> "BlobRows":
        return BlobRows(self.kind, self.files, self.file_of[idx], self.locator[idx], self.length[idx], self.column)

    def __len__(self) -> int:
        return len(self.file_of)

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def name(self, i: int) -> str:
        return f"{self.files[int(self.file_of[i])]}#{int(self.locator[i])}"

    def read(self, i: int) -> bytes:
        """The image bytes of row ``i``; :class:`.imageio.BadImage` when they cannot be read."""
        from .imageio import BadImage

        f = int(self.file_of[i])
        try:
            data = self._read_tar(f, i) if self.kind == "tar" else self._read_parquet(f, int(self.locator[i]))
        except OSError as e:
            raise BadImage(f"cannot read {self.kind} container: {e.strerror or e}", transient=True) from None
        if not data:
            raise BadImage("empty image bytes (0 bytes)")
        return data

    def _read_tar(self, f: int, i: int) -> bytes:
        fh = self._open.get(("tar", f))
        if fh is None:
            self._open.clear()  # at most one open shard per worker
            fh = self._open[("tar", f)] = open(self.files[f], "rb")
        fh.seek(int(self.locator[i]))
        return fh.read(int(self.length[i]))

    def _read_parquet(self, f: int, row: int) -> bytes:
        import pyarrow.parquet as pq

        pf = self._open.get(("pf", f))
        if pf is None:
            self._open.clear()
            pf = self._open[("pf", f)] = pq.ParquetFile(self.files[f])
            md = pf.metadata
            self._open[("starts", f)] = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        starts = self._open[("starts", f)]
        g = int(np.searchsorted(starts, row, side="right")) - 1
        key = ("rg", f, g)
        if key not in self._open:  # the last row group read is kept (rows come in order): streamed, never all
            for k in [k for k in self._open if k[0] == "rg"]:
                del self._open[k]
            self._open[key] = image_bytes(pf.read_row_group(g, columns=[self.column]).column(0))
        return self._open[key][row - int(starts[g])] or b""


def image_bytes(col) -> list:
    """The bytes of an image column (HF's ``struct<bytes, path>`` or a plain binary column) as a list of bytes
    (None where null)."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    return col.to_pylist()


# --------------------------------------------------------------------------------------------- building the table

@dataclass
class RowScan:
    """What a container scan has found so far: one entry per row in each list; the table is :meth:`table`."""

    root: Path
    kind: str
    column: str = "image"
    files: list = field(default_factory=list)
    relpath: list = field(default_factory=list)
    domain: list = field(default_factory=list)
    client: list = field(default_factory=list)
    class_name: list = field(default_factory=list)
    split: list = field(default_factory=list)
    size: list = field(default_factory=list)
    mtime: list = field(default_factory=list)
    file_of: list = field(default_factory=list)
    locator: list = field(default_factory=list)
    length: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    class_order: Optional[list] = None
    _checked: set = field(default_factory=set)
    _label_kinds: dict = field(default_factory=dict)  # "whole numbers" / "text" -> where the first such label was
    _domain_from: dict = field(default_factory=dict)  # True (a domain column/key) / False (the one domain) -> where

    def label(self, value, where: str, column: str) -> str:
        """A label value without ClassLabel names as a class name: text, or a whole number (its digits; the class
        list is then in numeric order, :meth:`table`). Any other value, or whole numbers in some rows and text in
        others, is a one-line error."""
        text = value_text(value, where, f"label in {column!r}")
        kind = "text" if isinstance(value, str) else "whole numbers"
        self._label_kinds.setdefault(kind, where)
        if len(self._label_kinds) > 1:
            raise SourceError(f"labels are whole numbers in some rows (first: {self._label_kinds['whole numbers']}) "
                              f"and text in others (first: {self._label_kinds['text']}); one source's labels must be "
                              f"one kind (whole numbers sort as numbers, text as text): fix the files")
        return text

    def domain_from(self, given: bool, where: str) -> None:
        """Note whether this file/sample names its domain (a column or key) or takes the one domain; a source where
        some do and some do not is a one-line error (the others' rows would silently form a domain of their own)."""
        self._domain_from.setdefault(given, where)
        if len(self._domain_from) > 1:
            raise SourceError(f"{self._domain_from[False]}: no domain (no column or key) while {self._domain_from[True]} "
                              f"has one; give every file/sample its domain, or none (then one domain, named by --domain)")

    def add(self, rel: str, data: Optional[bytes], labels: "RowLabels", file_index: int, locator: int,
            length: int = 0) -> None:
        """One row, its image bytes hashed now (and not kept). Null or empty bytes: listed as a problem (skipped)."""
        if not data:
            self.problems.append(FileNote(rel, "no image bytes (null or empty)"))
            return
        self._check(labels, rel)
        _, size, mtime = row_stat(data)
        self.relpath.append(rel)
        self.domain.append(labels.domain)
        self.client.append(labels.client or labels.domain)
        self.class_name.append(labels.class_name)
        self.split.append(labels.split or "")
        self.size.append(size)
        self.mtime.append(mtime)
        self.file_of.append(file_index)
        self.locator.append(locator)
        self.length.append(length)

    def _check(self, labels: "RowLabels", rel: str) -> None:
        for kind, name, check in (("domain", labels.domain, check_path_name), ("client", labels.client, check_path_name),
                                  ("class", labels.class_name, check_label_text)):
            if name and (kind, name) not in self._checked:
                check(kind, name, f"{shown(self.root / rel)}")
                self._checked.add((kind, name))

    def table(self) -> ImageTable:
        n = len(self.relpath)
        if self.class_order is None and set(self._label_kinds) == {"whole numbers"}:  # 2 before 10, not '10' < '2'
            self.class_order = [str(v) for v in sorted({int(c) for c in self.class_name})]
        obj = lambda v: np.array(v, dtype=object)  # noqa: E731
        blobs = BlobRows(self.kind, [str(f) for f in self.files], np.array(self.file_of, np.int32),
                         np.array(self.locator, np.int64), np.array(self.length, np.int64), self.column)
        return ImageTable(root=self.root, relpath=obj(self.relpath), domain=obj(self.domain), client=obj(self.client),
                          class_name=obj(self.class_name), split=obj(self.split), size=np.array(self.size, np.int64),
                          mtime_ns=np.array(self.mtime, np.int64), ino=np.zeros(n, np.int64),
                          ctime_ns=np.zeros(n, np.int64), ignored=self.ignored, problems=self.problems,
                          blobs=blobs, class_order=self.class_order)


def value_text(value, where: str, what: str) -> str:
    """A label, domain, client or split value as text: a string as is, a whole number as its digits; anything else
    (NaN, 1.5, true, a list, a dict) is a one-line error naming ``where`` (file and row, or shard and key)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise SourceError(f"{where}: {what} is {quoted(value, 60)} ({type(value).__name__}); labels, domains, clients and "
                      f"splits must be text or whole numbers: fix the file")


class RowLabels(NamedTuple):
    """A row's class name, domain, client ("" = its domain) and split ("" = not said)."""

    class_name: str
    domain: str
    client: str = ""
    split: str = ""


def scan_containers(source: str, columns: Columns) -> ImageTable:
    """The image table of a Parquet / ``hf:`` / WebDataset source (see :func:`container_kind`)."""
    kind = container_kind(source)
    if kind in ("hf", "parquet"):
        from .parquet_source import scan_hf, scan_parquet

        return scan_hf(source, columns) if kind == "hf" else scan_parquet(source, columns)
    if kind == "tar":
        from .wds_source import scan_tars

        return scan_tars(source, columns)
    raise SourceError(f"{shown(source)}: not a source; pass one of: {forms_text()}")


def default_domain(columns: Columns, name: str, where: str) -> str:
    """The one domain of a source without a domain column: ``--domain``, else ``name`` (the dataset's)."""
    domain = columns.domain or name
    check_path_name("domain", domain, f"{where} (no {columns.domain_column!r} column: one domain, named by --domain "
                                      f"or after the dataset)")
    return domain


def no_rows(source: str, scan: RowScan, columns: Columns) -> None:
    """Refuse a source in which no row is left (every row of another --domain, or no bytes)."""
    if scan.relpath:
        return
    why = f"no row of --domain {quoted(columns.domain)}" if columns.domain else "no row with image bytes"
    first = f" (first problem: {shown(scan.problems[0].path)}: {scan.problems[0].reason})" if scan.problems else ""
    raise SourceError(f"{shown(source)}: {why}{first}; nothing was extracted")
