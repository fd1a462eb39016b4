"""Deployments that keep to their own files and a multi-machine recipe with TLS and SuperNode authentication
(issue 19, items 8, 9 (deploy's side) and 10)."""
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedclip_cache import deploy as dep  # noqa: E402
from fedclip_cache.errors import ConfigError  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

DOMAINS = ("art", "photo", "sketch")
SITE_PREFIX = "fedclip-site-"  # flower_site.SITE_PREFIX (spelled out: the name users see in /tmp)


def _sites(root, domains=DOMAINS, n=30):
    return [str(write_synthetic_cache(root / f"site-{d}", {d: n}, 3, dim=16, seed=1)) for d in domains]


def _private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary folder of this test's own (this process and every process it starts): what is left in it after
    a command is what the command left."""
    t = tmp_path / "tmp"
    t.mkdir()
    monkeypatch.setenv("TMPDIR", str(t))
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


@pytest.mark.slow
def test_deploy_leaves_no_site_folder_and_deletes_only_its_own_logs(tmp_path, monkeypatch):
    """Every deploy left one /tmp/fedclip-site-* (holding a SuperExec secret) per site: the sites were SIGKILLed,
    so their own clean-up never ran. And `deploy -o RUN` deleted every *.log in RUN/logs/, the user's too."""
    t = _private_tmp(tmp_path, monkeypatch)
    sites = _sites(tmp_path)
    run = tmp_path / "run"
    logs = run / "logs"
    logs.mkdir(parents=True)
    (logs / "notes.txt").write_text("mine")
    (logs / "mine.log").write_text("mine too")
    (logs / "serverapp.log").write_text("[SUMMARY] an earlier run\n")  # deploy's own: replaced by this run's
    cfg = FederateConfig(rounds=1, hidden=8, heldout=["sketch"]).validate()
    res = dep.deploy(sites, run, cfg, timeout=240, log=lambda m: None)
    assert res["status"] == "finished:completed"
    assert sorted(p.name for p in t.iterdir()) == []  # no fedclip-site-*, no fedclip-deploy-*
    assert (logs / "notes.txt").read_text() == "mine" and (logs / "mine.log").read_text() == "mine too"
    assert "an earlier run" not in (logs / "serverapp.log").read_text()
    assert json.loads((logs / dep.LOGS_MANIFEST).read_text()) == sorted(dep.own_logs(list(DOMAINS), "worker"))


def test_only_logs_a_deploy_wrote_are_removed(tmp_path):
    """The logs a run writes and those the last run listed go; a user's files and anything a damaged list names
    outside the folder stay."""
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    for name in ("notes.txt", "mine.log", "serverapp.log", "site-art.log", "site-gone.log", "deploy.json"):
        (logs / name).write_text("x")
    (tmp_path / "run" / "outside.log").write_text("x")
    (logs / dep.LOGS_MANIFEST).write_text(json.dumps(["site-gone.log", "../outside.log", "/etc/passwd", 3]))
    dep.clear_own_logs(logs, dep.own_logs(["art"], "worker"))
    assert sorted(p.name for p in logs.iterdir()) == sorted(["notes.txt", "mine.log", dep.LOGS_MANIFEST])
    assert (tmp_path / "run" / "outside.log").exists()
    (logs / dep.LOGS_MANIFEST).write_text("{damaged")  # a damaged list: this run's own names only
    dep.clear_own_logs(logs, dep.own_logs(["art"], "worker"))
    assert sorted(p.name for p in logs.iterdir()) == sorted(["notes.txt", "mine.log", dep.LOGS_MANIFEST])


def _site_folders(t: Path) -> set:
    return {p for p in t.glob(SITE_PREFIX + "*") if (p / "superexec-secret").exists()}


def _start_site(cache, t: Path, log: Path) -> subprocess.Popen:
    # no SuperLink there: the SuperNode retries, the site runs (with its secret) until stopped
    return subprocess.Popen([sys.executable, "-m", "fedclip_cache", "site", cache, "--superlink", "127.0.0.1:1",
                             "--insecure", "--port", str(dep.free_port())], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "TMPDIR": str(t)})


def _wait_for(what, limit: float = 90.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_site_secret_never_outlives_the_site(tmp_path, monkeypatch):
    """`fedclip-cache site`: its secret is 0600 in a 0700 folder; SIGTERM removes the folder; one left by a site
    killed with kill -9 is removed by the next site (it was kept forever)."""
    t = _private_tmp(tmp_path, monkeypatch)
    cache = _sites(tmp_path, ("art",))[0]
    log = tmp_path / "site.log"
    p = _start_site(cache, t, log)
    try:
        (first,) = _wait_for(lambda: _site_folders(t))
        p.send_signal(signal.SIGTERM)  # at once: while it imports flwr and torch
        p.wait(timeout=30)
        assert not first.exists(), log.read_text()[-2000:]
        p = _start_site(cache, t, log)
        _wait_for(lambda: "worker ready" in log.read_text())  # up: flwr's own signal handlers in place
        (up,) = _site_folders(t)
        assert stat.S_IMODE(up.stat().st_mode) == 0o700
        assert stat.S_IMODE((up / "superexec-secret").stat().st_mode) == 0o600
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not up.exists(), log.read_text()[-2000:]
        p = _start_site(cache, t, log)
        (second,) = _wait_for(lambda: _site_folders(t))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        assert second.exists()  # kill -9: nothing could clean up
        p = _start_site(cache, t, log)
        third = _wait_for(lambda: _site_folders(t) - {second})
        assert not second.exists() and len(third) == 1  # the dead site's folder swept; its own made
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.parametrize("domain", ["../x", "a/b", ".."])
def test_deploy_refuses_domain_names_that_are_not_file_names(tmp_path, domain):
    """A domain "../x" reached `logs/site-../x.log` (FileNotFoundError after start-up): refused first, one line."""
    sites = [str(write_synthetic_cache(tmp_path / f"s{i}", {d: 10}, 3, dim=8, seed=1))
             for i, d in enumerate(["art", domain, "photo"])]
    with pytest.raises(ConfigError, match=r"domain name .* cannot name a file") as ex:
        dep.check_sites(sites, FederateConfig(heldout=["art"]))
    assert "\n" not in str(ex.value)
