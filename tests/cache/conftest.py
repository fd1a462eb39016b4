"""Fixtures of the stage-1 tests: what the shard files hold when read directly, extracts slowed down (to be killed or
raced mid-run), and a cache of three shards to damage."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def _shard_rows(cache: Path) -> dict:
    """What a user reading the shard files directly (pyarrow) sees."""
    import pyarrow.parquet as pq

    t = pq.read_table(sorted((cache / "shards").glob("*.parquet")))
    return {"paths": sorted(t.column("path").to_pylist()), "embedding_nulls": t.column("embedding").null_count,
            "n": t.num_rows}


def _slow_extract(root, out, model_args, delay="0.4"):
    """A quiet extract subprocess of 4-image shards, each commit delayed by ``delay`` s: (Popen, command)."""
    cmd = [sys.executable, "-m", "fedclip_cache", "extract", str(root), str(out), *model_args, "--workers", "0",
           "-q", "--batch-size", "4", "--shard-size", "4"]
    return subprocess.Popen(cmd, env={**os.environ, "FEDCLIP_CACHE_SHARD_DELAY": delay},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE), cmd


def _wait_for_shards(out, n, timeout=120):
    """Wait until ``out/shards`` holds ``n`` Parquet shards (or ``timeout`` s passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "shards").glob("*.parquet"))) < n:
        time.sleep(0.02)


def _kill_after_shards(cmd: list, out, shards: int = 3, delay: float = 0.3) -> int:
    """Run an extract command with a per-shard delay, SIGKILL it once ``shards`` shards are committed; returns how
    many shards were committed when it died."""
    proc = subprocess.Popen(cmd, env={**os.environ, "FEDCLIP_CACHE_SHARD_DELAY": str(delay)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.parquet"))) < shards:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list((out / "shards").glob("*.parquet")))


def _torchrun_extract_equals(src, one, two, model_args):
    """Extract ``src`` into ``two`` with a two-process gloo torchrun; both ranks wrote shards and the cache equals the
    single-process one at ``one``. Returns (open_cache(one), open_cache(two))."""
    from fedclip_cache import open_cache
    from fedclip_cache.launch.procs import free_port

    # a free port, not a fixed one: a fixed port failed when another torchrun (a parallel test run) held it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "fedclip_cache", "extract", str(src), str(two), *model_args,
           "--workers", "0", "-q", "--batch-size", "5", "--device", "cpu"]
    env = {**os.environ, "FEDCLIP_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    shards = sorted(p.name for p in (two / "shards").glob("*.parquet"))
    assert any("-r000-" in s for s in shards) and any("-r001-" in s for s in shards)
    a, b = open_cache(one), open_cache(two)
    assert (a.paths == b.paths).all() and (a.labels == b.labels).all()
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
    return a, b


@pytest.fixture(scope="session")
def shard_rows():
    """``shard_rows(cache) -> {"paths", "embedding_nulls", "n"}`` of the Parquet shard files read with pyarrow."""
    return _shard_rows


@pytest.fixture(scope="session")
def slow_extract():
    """``slow_extract(root, out, model_args, delay="0.4") -> (Popen, command)``: an extract subprocess whose
    4-image shards are each committed ``delay`` s apart."""
    return _slow_extract


@pytest.fixture(scope="session")
def wait_for_shards():
    """``wait_for_shards(out, n, timeout=120)``: until ``out/shards`` holds ``n`` Parquet shards."""
    return _wait_for_shards


@pytest.fixture(scope="session")
def kill_after_shards():
    """``kill_after_shards(cmd, out, shards=3, delay=0.3) -> shards committed``: SIGKILL an extract mid-run."""
    return _kill_after_shards


@pytest.fixture(scope="session")
def torchrun_extract_equals():
    """``torchrun_extract_equals(src, one, two, model_args) -> (cache one, cache two)``: a two-process gloo torchrun
    extract of ``src`` into ``two`` whose ranks both wrote shards and whose rows equal the cache at ``one``."""
    return _torchrun_extract_equals


@pytest.fixture
def one_shard(extract_ok):
    """``one_shard(tmp_path, image_root, model_args, run, fmt="parquet") -> (cache, open_cache of it, shard
    files)``: the 36 test images extracted into three shards of 12."""
    from fedclip_cache import open_cache

    def make(tmp_path, image_root, model_args, run, fmt="parquet"):
        out = tmp_path / "c"
        extract_ok(run, image_root, out, model_args, "--shard-size", "12", "--batch-size", "4", "--format", fmt)
        ref = open_cache(out)
        return out, ref, sorted((out / "shards").glob("part-*"))

    return make
