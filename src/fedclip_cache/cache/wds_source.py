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
import re
import tarfile
from pathlib import Path
from typing import Optional

from .bytesources import (Columns, RowLabels, RowScan, default_domain, member_path, no_rows, resolve_files,
                          value_text)
from .sources import IMAGE_EXTENSIONS, FileNote, ImageTable, SourceError, quoted, shown

IMAGE_EXTS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, webdataset's rule (``tariterators.base_plus_ext``: the key ends at the
    first '.' of the file name): ``dir/KEY.seg.png`` -> (``dir/KEY``, ``seg.png``); a leading ``./`` (``tar cf s.tar
    .``) is not part of the key."""
    while name.startswith("./"):
        name = name[2:]
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
            count = _scan_members(scan, k, rel, path, tf, columns, name)
    except (tarfile.TarError, EOFError) as e:
        raise SourceError(f"{shown(path)}: not a readable uncompressed tar shard ({e}); replace it or leave it out of "
                          f"the pattern") from None
    if not count:
        raise SourceError(f"{shown(path)}: empty tar shard (no sample); remove it or leave it out of the pattern")


def _scan_members(scan: RowScan, k: int, rel: str, path: Path, tf: tarfile.TarFile, columns: Columns,
                  name: str) -> int:
    """Group the shard's members into samples (consecutive members sharing a key, as webdataset reads them) and
    scan each; a key seen in an earlier sample, or one key + extension twice, is a one-line error (a second sample
    of one key would be dropped: the row id is shard#key). Returns how many members the shard has."""
    members, key, seen, count = {}, None, set(), 0
    for m in tf:
        count += 1
        if not m.isfile():
            continue
        mkey, ext = split_key(m.name)
        if mkey != key:
            if members:
                _sample(scan, k, rel, path, tf, key, members, columns, name)
            if mkey in seen:
                _duplicate(path, mkey, m.name, "a sample of this key came earlier in the shard; a sample's members "
                                               "must be next to each other, as webdataset reads them: build shards "
                                               "with tar --sort=name")
            seen.add(mkey)
            members, key = {}, mkey
        if ext in members:
            _duplicate(path, mkey, m.name, "a second member of one sample with this extension")
        members[ext] = m
    if members:
        _sample(scan, k, rel, path, tf, key, members, columns, name)
    return count


def _duplicate(path: Path, key: str, member: str, why: str) -> None:
    raise SourceError(f"{shown(path)}: key {quoted(key)} twice (member {quoted(member)}: {why}); each sample's key "
                      f"must be unique in its shard (webdataset's key is the name up to the first '.' of the file "
                      f"name): rename the members or rebuild the shard")


def _sample(scan: RowScan, k: int, rel: str, path: Path, tf: tarfile.TarFile, key: str, members: dict,
            columns: Columns, name: str) -> None:
    """One sample: its image bytes hashed, its labels read from its .json / .cls."""
    where = f"{shown(path)}: sample {quoted(key)}"
    images = [e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
    dotted_meta = [e for e in members if "." in e and e.rsplit(".", 1)[-1] in ("json", "cls") and
                   e.rsplit(".", 1)[-1] not in members]
    if len(images) > 1 or dotted_meta:
        names = ", ".join(quoted(members[e].name) for e in (images + dotted_meta)[:4])
        raise SourceError(f"{where}: members {names} are one sample (webdataset's key is the name up to the first '.' "
                          f"of the file name, so {quoted(key)}){' with several images' if len(images) > 1 else ''}; "
                          f"give each image its own key without dots (e.g. x_1.png + x_1.json)")
    image_ext = images[0] if images else None
    if image_ext is None:
        scan.ignored.append(FileNote(member_path(rel, key), "no image member in this sample (expected KEY.jpg, "
                                                             "KEY.png, ...)"))
        return
    meta = _json(tf, members.get("json"), where)
    labels = _labels(scan, tf, meta, members, columns, name, where)
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
    if not isinstance(data, dict):
        raise SourceError(f"{where}: its .json is {type(data).__name__}, not an object of keys (e.g. {{\"label\": "
                          f"\"cat\", \"domain\": \"art\"}}); fix the shard")
    return data


def _labels(scan: RowScan, tf, meta: dict, members: dict, columns: Columns, name: str,
            where: str) -> Optional[RowLabels]:
    """The sample's class name (the .json's label key, else its .cls: a whole number there is a class index),
    domain (the .json's domain key, else the one domain), client and split; None for a sample of another
    ``--domain``."""
    label = meta.get(columns.label)
    if label is None and "cls" in members:
        label = tf.extractfile(members["cls"]).read().decode("utf-8", "replace").strip()
        label = int(label) if re.fullmatch(r"-?[0-9]+", label) else label
    if label is None or label == "":
        raise SourceError(f"{where}: no label (no key {columns.label!r} in its .json, no .cls member); pass "
                          f"--label-column KEY")
    label = scan.label(label, where, columns.label)
    if columns.domain_column in meta and meta[columns.domain_column] in (None, ""):
        raise SourceError(f"{where}: key {columns.domain_column!r} of its .json is empty; every sample needs a domain")
    domain = meta.get(columns.domain_column)
    if domain is None and columns.domain_column != Columns().domain_column:
        raise SourceError(f"{where}: no key {columns.domain_column!r} for --domain-column in its .json; pass "
                          f"--domain-column KEY")
    scan.domain_from(domain is not None, where)
    if domain is None:
        domain = default_domain(columns, name, where)
    else:
        domain = value_text(domain, where, f"domain {columns.domain_column!r}")
        if columns.domain is not None and domain != columns.domain:
            return None
    extra = []
    for key, flag in ((columns.client, "--client-column"), (columns.split, "--split-column")):
        if key is not None and key not in meta:
            raise SourceError(f"{where}: no key {key!r} for {flag} in its .json; pass {flag} KEY")
        extra.append("" if key is None or meta[key] is None else value_text(meta[key], where, f"{flag} key {key!r}"))
    return RowLabels(label, domain, *extra)
