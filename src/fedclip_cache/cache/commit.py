"""The end of an extract: make the shards mirror the dataset on disk, then commit ``cache.json``.

The current scan is the truth. For every image id in it the newest event wins (an embedded row or a skip record);
rows of files that were deleted or moved (a moved file has a new path, hence a new id) are **retired**, and older
rows of re-extracted files are **superseded**. Shards holding rows that are no longer served are rewritten without
them (only those shards: the cost is proportional to what changed), so that anyone reading the shard files
directly also sees exactly the files on disk. The commit is the atomic rename of ``cache.json`` with
``state = complete`` and the list of shards (rows, bytes, sha256); files it no longer lists are deleted after it,
and, should a crash come first, by the next run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema, store
from .integrity import Inventory, add_new_shards, shard_record
from .sources import ImageTable, image_id


@dataclass
class CommitResult:
    images: int
    skipped: int
    retired: list[str]
    superseded: int
    refreshed: int  # rows whose label, domain, client, split or inode/ctime the scan changed (features kept)


def commit(out: Path, meta: dict, inv: Inventory, table: ImageTable, session: str, fp: dict, dim: int, fmt: str,
           dtype: str, run: dict, t0: float) -> CommitResult:
    add_new_shards(out, meta, fp, dim, inv, session)
    scan_row = {i: k for k, i in enumerate(table.ids.tolist())}
    live = scan_row.keys()
    shard_dir = out / store.SHARD_DIR
    label_of = {c: i for i, c in enumerate(meta["classes"])}

    listing, obsolete, retired_paths, superseded, refreshed, seq = {}, [], set(), 0, 0, 0
    for name, stored in inv.shard_cols.items():
        ids = stored["id"]
        gone = ~np.array([i in live for i in ids.tolist()], bool)
        keep = ~gone & np.array([inv.serves(i, name, pos) for pos, i in enumerate(ids.tolist())], bool)
        # Retired: embedded rows of files no longer in the dataset. A skipped file that was deleted was never
        # embedded: its skip record just goes, it is not counted as retired.
        retired_paths.update(stored["path"][gone].tolist())
        superseded += int((~keep & ~gone).sum())
        # The scan is the truth for what it says about a kept row: its label, domain, client and split (a manifest
        # may change them without touching the file), and its inode/ctime (checked by content hash in the plan).
        at = np.array([scan_row[i] for i in ids[keep].tolist()], np.int64)
        current = {c.name: getattr(table, c.scan_field)[at] for c in schema.COLUMNS if c.scan_owned}
        stale = np.zeros(len(at), bool)
        for c in current:
            stale |= np.asarray(stored[c][keep] != current[c], bool)
        refreshed += int(stale.sum())
        if keep.all() and len(keep) and not stale.any():
            listing[name] = inv.listed.get(name) or shard_record(shard_dir / name, len(ids), inv.shard_views[name])
            continue
        obsolete.append(name)
        if keep.any():  # compact: the rows still served move to a new shard of this session, with fresh metadata
            new = store.shard_name(session, 0, seq, fmt, compacted=True)
            seq += 1
            current["label"] = np.array([label_of[c] for c in current["class_name"]], np.int32)
            k = inv.shard_views[name]
            _rewrite(shard_dir / name, shard_dir / new, np.flatnonzero(keep), current, fmt, dtype, fp, session, dim,
                     meta["cache_id"], meta.get("views") if k > 1 else None)
            listing[new] = shard_record(shard_dir / new, int(keep.sum()), k)

    skipped = _skip_records(inv, table, live)
    retired = sorted(retired_paths)
    images = sum(r["rows"] for r in listing.values())
    want = int((meta.get("views") or {}).get("count", 1))
    short = [n for n, r in listing.items() if r.get("views", 1) < want and r["rows"]]
    if short:  # the plan extends every row to the cache's views: a shard without them is a bug, never served
        raise RuntimeError(f"internal error: shard {short[0]} holds fewer than {want} views at commit; re-run the "
                           f"same extract command")
    run = {**run, "retired": len(retired), "superseded": superseded, "refreshed": refreshed,
           "seconds": round(time.perf_counter() - t0, 3)}
    meta.update(state="complete", shards=dict(sorted(listing.items())), last_session=session, skipped=skipped,
                retired={"count": len(retired), "paths": retired[:1000], "session": session},
                counts={"images": images, "skipped": len(skipped)}, updated=run["time"])
    meta["runs"] = meta.get("runs", []) + [run]
    store.write_json(out / store.META_FILE, meta)  # the commit point
    for name in obsolete:
        (shard_dir / name).unlink(missing_ok=True)
    for derived in (store.FEATURES_FILE, store.FEATURES_STAMP):  # the old commit's mapped copy (rebuilt on demand)
        (out / derived).unlink(missing_ok=True)
    return CommitResult(images, len(skipped), retired, superseded, refreshed)


def _skip_records(inv: Inventory, table: ImageTable, live) -> list[dict]:
    """The cache's skip records, by path: files of the dataset whose newest attempt failed, and the names the scan
    could not read (kind "scan": re-checked by every scan, never planned from)."""
    skipped = [r for i, r in inv.skip_records().items() if i in live]
    skipped += [{"id": image_id(p), "path": p, "reason": r, "kind": "scan", "size": 0, "mtime_ns": 0}
                for p, r in table.problems]
    return sorted(skipped, key=lambda r: r["path"])


def _rewrite(src: Path, dst: Path, keep: np.ndarray, updates: dict, fmt: str, dtype: str, fp: dict, session: str,
             dim: int, cache_id: str, views: dict | None = None) -> None:
    cols, emb = store.read_shard(src, schema.stored_columns(), True, dim)
    cols = {c: v[keep] for c, v in cols.items()}  # "path" comes back lossless (from the stored bytes)
    cols.update(updates)
    cols["path_bytes"] = np.array([os.fsencode(p) for p in cols["path"]], dtype=object)
    smeta = {"fingerprint": fp, "session": session, "cache_id": cache_id, "skipped": []}
    extra = None
    if views is not None:  # the augmented views move with their rows
        extra = store.read_shard_views(src, dim)[keep]
        smeta.update(augment=views["augment"], augment_seed=views["seed"])
    store.write_shard(dst, fmt, cols, emb[keep], dtype, smeta, extra)
