"""Make the format-3 cache fixture of tests/cache/test_cache_v3.py with the code of commit c2fb9e5 (the last commit that
wrote cache format 3, before every cache got a cache id), so that the test reads caches written by real old code.

    git -C REPO worktree add /tmp/compat-old c2fb9e5
    PYTHONPATH=/tmp/compat-old/src python tests/golden/make_cache_v3.py tests/golden/cache-v3
    git -C REPO worktree remove --force /tmp/compat-old

It writes, under the given folder:

* ``images/``: 8 tiny PNGs (2 domains x 2 classes x 2, 16x16 pixels; ``write_image_folder``, seed 0), each with
  the modification time ``MTIME_NS`` (git does not keep file times: a test that extends the cache sets them again,
  so that the old rows are recognised as the same files and not re-embedded);
* ``parquet/`` and ``hdf5/``: a complete format-3 cache of those images in each format, made by the old CLI
  (``extract --shard-size 3 --batch-size 3``: 3 shards each; its ``.lock`` holder note kept, as a user's cache has
  one) with the tiny random model of ``write_tiny_model`` (seed 0; not committed, 13 MB: the test rebuilds it, and
  skips the tests that extend a cache when it has not the sha256 recorded here);
* ``expected.json``: what the old code's reader (``open_cache``) returned for each cache, as sha256 checksums of
  the features, labels, paths, domains and ids (in reader order), the class list, and the tiny model's sha256.

Run it from the repository root, with the old code first on PYTHONPATH (it refuses otherwise).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedclip_cache.cache import store
from fedclip_cache.cache.reader import open_cache
from fedclip_cache.synthetic import write_image_folder, write_tiny_model

MTIME_NS = 1_700_000_000_000_000_000
SHARD_SIZE = 3
DOMAINS, CLASSES, PER_CLASS, SIZE = ("art", "photo"), ("cat", "dog"), 2, 16


def digest(values) -> str:
    """sha256 of an array's values: numbers as little-endian bytes of their dtype, text as UTF-8 lines."""
    a = np.asarray(values)
    if a.dtype.kind in "OU":
        data = "\n".join(os.fsencode(str(v)).decode("utf-8", "backslashreplace") for v in a.tolist()).encode()
    else:
        data = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
    return hashlib.sha256(data).hexdigest()


def reader_view(cache) -> dict:
    """What a reader gives, as checksums (the same function computes the expected and the observed values)."""
    return {"rows": len(cache.labels), "dim": int(cache.features.shape[1]),
            "features_float32": digest(cache.features.astype(np.float32)), "labels_int64": digest(
                cache.labels.astype(np.int64)), "paths": digest(cache.paths), "domains": digest(cache.domains),
            "ids": digest(cache.ids), "classes": list(cache.classes)}


def set_times(root: Path) -> None:
    for p in sorted(root.rglob("*.png")):
        os.utime(p, ns=(MTIME_NS, MTIME_NS))


def main(out: Path) -> None:
    written = getattr(store, "SHARD_FORMAT_VERSION", None)  # (later code declares it in cache/schema.py: format 4)
    if written != 3:
        sys.exit(f"run with the code of commit c2fb9e5 first on PYTHONPATH (this one writes shard format "
                 f"{written or 4}, not 3)")
    if out.exists():
        shutil.rmtree(out)
    images = write_image_folder(out / "images", DOMAINS, CLASSES, PER_CLASS, SIZE, seed=0)
    set_times(images)
    expected = {"made_by": "tests/golden/make_cache_v3.py with the code of commit c2fb9e5",
                "mtime_ns": MTIME_NS, "caches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ckpt = write_tiny_model(tmp)
        expected["model_sha256"] = store.file_sha256(ckpt)
        for fmt in ("parquet", "hdf5"):
            subprocess.run([sys.executable, "-m", "fedclip_cache", "extract", str(images), str(out / fmt),
                            "--model-config", str(cfg), "--pretrained", str(ckpt), "--format", fmt,
                            "--device", "cpu", "--shard-size", str(SHARD_SIZE), "--batch-size", str(SHARD_SIZE),
                            "--quiet"], check=True)
            cache = open_cache(out / fmt)
            assert cache.meta["format_version"] == 3 and "cache_id" not in cache.meta
            expected["caches"][fmt] = reader_view(cache)
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
