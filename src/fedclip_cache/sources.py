"""Readers: turn a dataset on disk into one columnar table of image records.

Two inputs are understood:

* the DomainBed folder layout ``ROOT/<domain>/<class>/<image>`` (PACS, VLCS, Office-Home, DomainNet), where the
  class index is the position in the sorted union of class names over all domains;
* a manifest (CSV or Parquet) with columns ``path``, ``label`` (class name), ``domain`` and optional ``client``
  and ``split``; relative paths resolve against the manifest's folder.

Nothing is dropped silently: files that cannot be images (wrong extension, stray files outside a class folder)
are returned in ``ignored`` with the reason.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class SourceError(ValueError):
    """The dataset folder or manifest is unusable; the message names the file and the fix."""


@dataclass
class ImageTable:
    """One row per image; every column is a numpy array of equal length."""

    root: Path
    relpath: np.ndarray  # str: path relative to root (or absolute for manifest rows outside it)
    domain: np.ndarray
    client: np.ndarray
    class_name: np.ndarray
    split: np.ndarray  # "" when the source does not say
    size: np.ndarray  # int64 bytes
    mtime_ns: np.ndarray  # int64
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.relpath)

    @functools.cached_property
    def ids(self) -> np.ndarray:
        return np.array([image_id(p) for p in self.relpath], dtype=object)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.class_name.tolist()))

    def take(self, idx: np.ndarray) -> "ImageTable":
        return ImageTable(self.root, *(getattr(self, c)[idx] for c in COLUMNS), ignored=self.ignored)


COLUMNS = ("relpath", "domain", "client", "class_name", "split", "size", "mtime_ns")


def image_id(relpath: str) -> str:
    """Stable id of an image: a hash of its path relative to the dataset root (same on every machine)."""
    return hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).hexdigest()


def _stat(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.empty(len(paths), np.int64)
    mtimes = np.empty(len(paths), np.int64)
    for i, p in enumerate(paths):
        st = p.stat()
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def scan_folder(root: str | Path) -> ImageTable:
    """Scan ``ROOT/<domain>/<class>/<image>`` (images may sit in sub-folders of a class folder)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder; pass a DomainBed-style ROOT/<domain>/<class>/<image> folder "
                          f"or a manifest .csv/.parquet")
    rel, dom, cls, ignored = [], [], [], []
    for d in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not d.is_dir():
            ignored.append((d.name, "file at dataset root (expected ROOT/<domain>/<class>/<image>)"))
            continue
        for c in sorted(p for p in d.iterdir() if not p.name.startswith(".")):
            if not c.is_dir():
                ignored.append((str(c.relative_to(root)), "file directly in a domain folder (no class folder)"))
                continue
            for dirpath, dirnames, filenames in os.walk(c):
                dirnames.sort()
                for f in sorted(filenames):
                    r = os.path.relpath(os.path.join(dirpath, f), root)
                    if f.startswith("."):
                        continue  # .DS_Store and friends are not data
                    if Path(f).suffix.lower() not in IMAGE_EXTENSIONS:
                        ignored.append((r, "not an image file extension"))
                        continue
                    rel.append(r)
                    dom.append(d.name)
                    cls.append(c.name)
    if not rel:
        raise SourceError(f"{root}: no images found; expected ROOT/<domain>/<class>/<image> with extensions "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    sizes, mtimes = _stat([root / r for r in rel])
    dom_a = np.array(dom, dtype=object)
    return ImageTable(root, np.array(rel, dtype=object), dom_a, dom_a.copy(), np.array(cls, dtype=object),
                      np.full(len(rel), "", dtype=object), sizes, mtimes, ignored)


def scan_manifest(path: str | Path) -> ImageTable:
    """Read a CSV or Parquet manifest with columns path, label, domain[, client][, split]."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: manifest not found")
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in ("path", "label", "domain", "client", "split")}))
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: cannot read manifest ({e}); expected CSV or Parquet") from e
    missing = [c for c in ("path", "label", "domain") if c not in table.column_names]
    if missing:
        raise SourceError(f"{path}: manifest lacks column(s) {', '.join(missing)}; required: path, label, domain "
                          f"(optional: client, split)")

    def col(name, default=None):
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
    splits = col("split")
    splits = np.full(len(paths), "", dtype=object) if splits is None else splits
    root = path.parent.resolve()
    full = [Path(p) if os.path.isabs(p) else root / p for p in paths]
    keep = np.array([f.is_file() for f in full], bool)
    ignored = [(str(p), "listed in manifest but missing on disk") for p, k in zip(paths, keep) if not k]
    bad_ext = np.array([Path(p).suffix.lower() not in IMAGE_EXTENSIONS for p in paths], bool) & keep
    ignored += [(str(p), "not an image file extension") for p in paths[bad_ext]]
    keep &= ~bad_ext
    rel = np.array([os.path.normpath(p) for p in paths[keep]], dtype=object)
    if len(set(rel.tolist())) != len(rel):
        dup = next(p for p in rel if (rel == p).sum() > 1)
        raise SourceError(f"{path}: image {dup} is listed more than once; each image must appear once")
    sizes, mtimes = _stat([f for f, k in zip(full, keep) if k])
    return ImageTable(root, rel, domains[keep], clients[keep], labels[keep], splits[keep], sizes, mtimes, ignored)


def scan(source: str | Path) -> ImageTable:
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".csv", ".parquet", ".tsv"):
        return scan_manifest(source)
    if source.is_file():
        raise SourceError(f"{source}: a manifest must be .csv or .parquet")
    return scan_folder(source)
