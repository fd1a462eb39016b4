"""Fixtures of the deployment tests: one synthetic site cache per domain, and waiting for a process to be gone."""
import os
import time
from pathlib import Path

import pytest

from fedclip_cache.synthetic import write_synthetic_cache

DOMAINS = ("art", "photo", "sketch")


def _synthetic_sites(tmp_path, domains=DOMAINS):
    # one domain per site, the same classes and (as with one model) the same prompt embeddings
    return [str(write_synthetic_cache(tmp_path / f"site-{d}", {d: 60}, 3, dim=16, seed=1)) for d in domains]


def _wait_gone(pid: int, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def synthetic_sites():
    """``synthetic_sites(tmp_path, domains=("art", "photo", "sketch")) -> [site cache]``: one 60-image synthetic
    cache per domain under ``tmp_path/site-DOMAIN``, all with the same classes and prompt embeddings."""
    return _synthetic_sites


@pytest.fixture(scope="session")
def wait_gone():
    """``wait_gone(pid, limit=10.0) -> bool``: whether the process ended (or is a zombie) within ``limit`` s."""
    return _wait_gone
