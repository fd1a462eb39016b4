"""WebDataset tar shards (as img2dataset writes them: ``00000.tar`` holding ``KEY.jpg`` + ``KEY.json`` + ``KEY.txt``).

A sample is the members that share a key (the member's path up to the first '.' of its file name, webdataset's
rule); its image is the member whose extension is an image's (jpg, jpeg, png, webp, ...), its label and domain come
from its ``.json`` (the keys of ``--label-column`` / ``--domain-column``, and ``--client-column`` /
``--split-column`` when given), or the label from a ``.cls`` member. Shards are read sequentially once while
scanning (each image hashed and dropped); the decode workers then read each image by its offset in the shard.
Only uncompressed tar shards are read (a compressed one cannot be read by offset).
"""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Optional

from .bytesources import Columns, RowLabels, RowScan, default_domain, member_path, no_rows, resolve_files
from .sources import IMAGE_EXTENSIONS, FileNote, ImageTable, SourceError, quoted, shown

IMAGE_EXTS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, webdataset's rule: ``dir/KEY.seg.png`` -> (``dir/KEY``, ``seg.png``)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_tars(source: str, columns: Columns) -> ImageTable:
    """The table of every sample of the tar shards ``source`` (a file, a brace pattern, a glob or a '::' list)."""
    root, files = resolve_files(source, ".tar")
    if not files:
        raise SourceError(f"{shown(source)}: no .tar shard found; pass DIR/{{00000..00099}}.tar, a glob or a file")
    scan = RowScan(Path(root), "tar", files=[os.path.abspath(f) for f in files])
    name = Path(root).resolve().name
    for k, f in enumerate(files):
        _scan_shard(scan, k, Path(f), columns, name)
    no_rows(source, scan, columns)
    return scan.table()


def _scan_shard(scan: RowScan, k: int, path: Path, columns: Columns, name: str) -> None:
    rel = os.path.relpath(path, scan.root)
    try:
        with tarfile.open(path, "r:") as tf:
            members, key = {}, None
            count = 0
            for m in tf:
                count += 1
                if not m.isfile():
                    continue
                mkey, ext = split_key(m.name)
                if mkey != key and members:
                    _sample(scan, k, rel, path, tf, key, members, columns, name)
                    members = {}
                key = mkey
                members.setdefault(ext, m)
            if members:
                _sample(scan, k, rel, path, tf, key, members, columns, name)
    except (tarfile.TarError, EOFError) as e:
        raise SourceError(f"{shown(path)}: not a readable uncompressed tar shard ({e}); replace it or leave it out of "
                          f"the pattern") from None
    if not count:
        raise SourceError(f"{shown(path)}: empty tar shard (no sample); remove it or leave it out of the pattern")


def _sample(scan: RowScan, k: int, rel: str, path: Path, tf: tarfile.TarFile, key: str, members: dict,
            columns: Columns, name: str) -> None:
    """One sample: its image bytes hashed, its labels read from its .json / .cls."""
    where = f"{shown(path)}: sample {quoted(key)}"
    image_ext = next((e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if image_ext is None:
        scan.ignored.append(FileNote(member_path(rel, key), "no image member in this sample (expected KEY.jpg, "
                                                             "KEY.png, ...)"))
        return
    meta = _json(tf, members.get("json"), where)
    labels = _labels(tf, meta, members, columns, name, where)
    if labels is None:
        return
    m = members[image_ext]
    scan.add(member_path(rel, key), tf.extractfile(m).read(), labels, k, m.offset_data, m.size)


def _json(tf: tarfile.TarFile, member, where: str) -> dict:
    if member is None:
        return {}
    try:
        data = json.loads(tf.extractfile(member).read())
    except ValueError as e:
        raise SourceError(f"{where}: its .json is not JSON ({str(e)[:120]}); fix the shard") from None
    return data if isinstance(data, dict) else {}


def _labels(tf, meta: dict, members: dict, columns: Columns, name: str, where: str) -> Optional[RowLabels]:
    """The sample's class name (the .json's label key, else its .cls), domain (the .json's domain key, else the one
    domain), client and split; None for a sample of another ``--domain``."""
    label = meta.get(columns.label)
    if label is None and "cls" in members:
        label = tf.extractfile(members["cls"]).read().decode("utf-8", "replace").strip()
    if label is None or label == "":
        raise SourceError(f"{where}: no label (no key {columns.label!r} in its .json, no .cls member); pass "
                          f"--label-column KEY")
    domain = meta.get(columns.domain_column)
    if domain is None and columns.domain_column != Columns().domain_column:
        raise SourceError(f"{where}: no key {columns.domain_column!r} for --domain-column in its .json; pass "
                          f"--domain-column KEY")
    if domain is None:
        domain = default_domain(columns, name, where)
    elif columns.domain is not None and str(domain) != columns.domain:
        return None
    extra = []
    for key, flag in ((columns.client, "--client-column"), (columns.split, "--split-column")):
        if key is not None and key not in meta:
            raise SourceError(f"{where}: no key {key!r} for {flag} in its .json; pass {flag} KEY")
        extra.append("" if key is None or meta[key] is None else str(meta[key]))
    return RowLabels(str(label), str(domain), *extra)
