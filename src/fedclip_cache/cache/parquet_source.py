"""Parquet files whose image column holds the bytes (a file, a folder of them such as the Hub's ``data/``, a glob),
and ``hf:NAME[:SPLIT]``: a Hugging Face dataset's Parquet files in the local Hub cache, read by the same code.

The Hugging Face layout (``flwrlabs/pacs``, ``flwrlabs/office-home``): ``image`` is ``struct<bytes: binary, path:
string>``, ``domain`` a string, ``label`` an int64 whose class names are the ``ClassLabel`` names in the Arrow
schema metadata key ``huggingface`` (JSON ``{"info": {"features": {"label": {"_type": "ClassLabel", "names":
[...]}}}}``). A plain binary image column and string labels work too. Files are streamed in batches of rows
(``iter_batches``): each row's bytes are hashed and dropped, never all held, never written to disk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .bytesources import (HF_PREFIX, Columns, RowLabels, RowScan, bytes_type, default_domain, image_bytes,
                          member_path, no_rows, resolve_files, value_text)
from .sources import ImageTable, SourceError, quoted, shown

BATCH_ROWS = 256  # rows per streamed batch: a few MB of image bytes, whatever the file's size


def scan_parquet(source: str, columns: Columns, name: Optional[str] = None, root: Optional[Path] = None,
                 files: Optional[list[Path]] = None) -> ImageTable:
    """The table of every row of the Parquet file(s) ``source`` (``root``/``files``: already resolved, by
    :func:`scan_hf`); ``name`` names the one domain of a source without a domain column (default: the folder's or
    file's name)."""
    if files is None:
        root, files = resolve_files(source, ".parquet")
        if not files:
            raise SourceError(f"{shown(source)}: no .parquet file found; pass a Parquet file, a folder of them or "
                              f"a glob")
    name = name or (Path(source).stem if Path(source).is_file() else Path(root).resolve().name)
    scan = RowScan(Path(root), "parquet", columns.image, files=[os.path.abspath(f) for f in files])
    for k, f in enumerate(files):
        _scan_file(scan, k, Path(f), columns, name)
    no_rows(source, scan, columns)
    return scan.table()


def _scan_file(scan: RowScan, k: int, path: Path, columns: Columns, name: str) -> None:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not Parquet, truncated footer
        raise SourceError(f"{shown(path)}: cannot read as Parquet ({str(e).splitlines()[0][:200]}); replace the "
                          f"file") from None
    schema = pf.schema_arrow
    cols = _columns_of(path, schema, columns)
    names = class_label_names(schema, columns.label)
    if scan.class_order is not None and names != scan.class_order:
        raise SourceError(f"{shown(path)}: its ClassLabel names for {columns.label!r} differ from those of "
                          f"{shown(scan.files[0])}; all files of one dataset must share one class list")
    scan.class_order = names if k == 0 else scan.class_order
    scan.domain_from(columns.domain_column in schema.names, shown(path))
    fixed = None if columns.domain_column in schema.names else default_domain(columns, name, shown(path))
    rel = os.path.relpath(path, scan.root)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        data = image_bytes(batch.column(columns.image))
        labels = _labels(scan, path, batch, columns, names, row, fixed)
        for j, (b, lab) in enumerate(zip(data, labels)):
            if lab is not None:  # None: a row of another --domain
                scan.add(member_path(rel, str(row + j)), b, lab, k, row + j)
        row += batch.num_rows


def _columns_of(path: Path, schema, columns: Columns) -> list[str]:
    """The columns to read; a missing image or label column (or a named optional one) is a one-line error."""
    have = schema.names
    listed = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
    if columns.image not in have:
        raise SourceError(f"{shown(path)}: no image column {columns.image!r} (columns: {listed}); pass --image-column "
                          f"NAME (a struct<bytes, path> or binary column), or give a manifest a 'path' column")
    if not bytes_type(schema.field(columns.image).type):
        raise SourceError(f"{shown(path)}: column {columns.image!r} is {schema.field(columns.image).type}, not image "
                          f"bytes (struct<bytes, path> or binary); pass --image-column NAME")
    wanted = [(columns.label, "--label-column"), (columns.client, "--client-column"),
              (columns.split, "--split-column")]
    if columns.domain_column != Columns().domain_column:  # the default is optional: no column -> one domain
        wanted.append((columns.domain_column, "--domain-column"))
    for col, flag in wanted:
        if col is not None and col not in have:
            raise SourceError(f"{shown(path)}: no column {col!r} for {flag} (columns: {listed}); pass {flag} NAME")
    out = [columns.image, columns.label] + [c for c in (columns.client, columns.split) if c]
    return out + ([columns.domain_column] if columns.domain_column in have else [])


def class_label_names(schema, column: str) -> Optional[list[str]]:
    """The ``ClassLabel`` names of ``column`` from the schema's ``huggingface`` metadata, or None."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feat = json.loads(raw).get("info", {}).get("features", {}).get(column, {})
    except (ValueError, AttributeError):
        return None
    names = feat.get("names") if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _labels(scan: RowScan, path: Path, batch, columns: Columns, names: Optional[list[str]], row0: int,
            fixed: Optional[str]) -> list:
    """One :class:`RowLabels` per row of ``batch`` (None for a row of another ``--domain``)."""
    labels = batch.column(columns.label).to_pylist()
    domains = batch.column(columns.domain_column).to_pylist() if fixed is None else [fixed] * batch.num_rows
    clients = batch.column(columns.client).to_pylist() if columns.client else [""] * batch.num_rows
    splits = batch.column(columns.split).to_pylist() if columns.split else [""] * batch.num_rows
    out = []
    for j, (y, d, c, s) in enumerate(zip(labels, domains, clients, splits)):
        where = f"{shown(path)}: row {row0 + j}"
        for col, v in ((columns.label, y), (columns.domain_column, d)):
            if v is None or v == "":
                raise SourceError(f"{where}: column {col!r} is empty; every row needs a label and a domain")
        d = value_text(d, where, f"domain in {columns.domain_column!r}")
        if fixed is None and columns.domain is not None and d != columns.domain:
            out.append(None)
            continue
        y = scan.label(y, where, columns.label) if names is None else class_name(y, names, where, columns.label)
        out.append(RowLabels(y, d, "" if c is None else value_text(c, where, f"client in {columns.client!r}"),
                             "" if s is None else value_text(s, where, f"split in {columns.split!r}")))
    return out


def class_name(value, names: Optional[list[str]], where: str, column: str) -> str:
    """A label value as a class name: an index into the ClassLabel ``names`` when there are some, else its text."""
    if names is None or isinstance(value, str):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
        raise SourceError(f"{where}: label {quoted(value)} in column {column!r} is not an index into its "
                          f"{len(names)} ClassLabel names; fix the file")
    return names[value]


# --------------------------------------------------------------------------------------------- hf:NAME[:SPLIT]

def hub_cache() -> Path:
    """The Hugging Face Hub cache folder, by huggingface_hub's rule: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (read now, so a test's environment counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def parse_hf(source: str) -> tuple[str, Optional[str]]:
    """``hf:NAME[:SPLIT]`` -> (NAME, SPLIT or None); NAME is ``owner/name`` or ``name``."""
    name, _, split = source[len(HF_PREFIX):].partition(":")
    if not name or name.count("/") > 1 or name.startswith("/") or name.endswith("/") or ".." in name:
        raise SourceError(f"{source}: expected hf:NAME[:SPLIT], e.g. hf:flwrlabs/pacs or hf:flwrlabs/pacs:train")
    return name, split or None


def hf_snapshot(name: str) -> Path:
    """The local snapshot folder of dataset ``name``: the one ``refs/main`` names, else the newest one."""
    repo = hub_cache() / f"datasets--{name.replace('/', '--')}"
    fetch = (f"fetch it on a machine with internet (pip install 'fedclip-cache[hf]'; python -c \"import datasets; "
             f"datasets.load_dataset('{name}')\") and copy {repo} here, or set HF_HOME")
    snaps = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) \
        if snaps.is_dir() else []
    if not found:
        raise SourceError(f"hf:{name}: not in the local Hugging Face cache ({repo} has no snapshot); {fetch}")
    return found[-1]


def in_split(rel: str, split: str) -> bool:
    """Whether the Parquet file at ``rel`` (in the snapshot) belongs to ``split``, by the Hub's file-name rule: a
    folder named after the split, or a file name ``SPLIT-...``/``SPLIT_...``/``SPLIT.``."""
    parts = Path(rel).parts
    return split in parts[:-1] or any(parts[-1].startswith(split + sep) for sep in "-_.")


def scan_hf(source: str, columns: Columns) -> ImageTable:
    """The table of ``hf:NAME[:SPLIT]``: its Parquet files in the local Hub cache, read as a Parquet folder (no
    ``datasets`` import, works offline)."""
    name, split = parse_hf(source)
    snap = hf_snapshot(name)
    files = sorted(Path(d) / f for d, _, fs in os.walk(snap, followlinks=True) for f in fs if f.endswith(".parquet"))
    if not files:
        raise SourceError(f"{source}: the cached snapshot {snap} holds no Parquet file (an image dataset in another "
                          f"format); export it to Parquet with datasets (ds.to_parquet) and pass the file")
    if split:
        chosen = [f for f in files if in_split(os.path.relpath(f, snap), split)]
        if not chosen:
            raise SourceError(f"{source}: no Parquet file of split {split!r} in {snap} (files: "
                              f"{', '.join(os.path.relpath(f, snap) for f in files[:6])}); name another split")
        files = chosen
    return scan_parquet(source, columns, name=name.split("/")[-1], root=snap, files=files)
