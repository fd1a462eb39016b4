"""Interrupts during `deploy`'s start-up (the zygote started before the option checks, the pre-forked SuperLink): Ctrl-C
or SIGTERM at any point of it, from the CLI or from Python, stops at once, ends every process started so far and leaves
no temporary folder. Real deployments are marked `slow`."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedclip_cache.launch import deploy as dep  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402

SRC = str(Path(dep.__file__).resolve().parents[2])


def _needs_flower():
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")


@pytest.mark.slow
def test_interrupt_while_the_zygote_forks_stops_at_once(tmp_path, monkeypatch, synthetic_sites, wait_gone):
    """Ctrl-C (or any failure) after the run is submitted but before the zygote has forked every site (the longest phase
    of the start-up: the zygote imports torch) stops within 5 s, and every process forked so far is gone: the forked
    children belong to the Deployment at once, so SIGTERM reaches them and stop() does not wait its 10 s grace for the
    zygote (which ignores SIGTERM and ends with its last child)."""
    _needs_flower()
    seen: dict = {}

    def started(self, dpl, limit=120):  # interrupted once the zygote has forked some of its children
        deadline = time.monotonic() + 120
        while len(self.pids) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.update(self.pids, zygote=self.proc.pid)
        seen["t"] = time.monotonic()
        raise KeyboardInterrupt

    monkeypatch.setattr(dep.Zygote, "started", started)
    cfg = FederateConfig(rounds=1, hidden=8, heldout=["sketch"]).validate()
    with pytest.raises(KeyboardInterrupt):
        dep.deploy(synthetic_sites(tmp_path), tmp_path / "run", cfg, log=lambda m: None)
    took = time.monotonic() - seen["t"]
    assert len(seen) >= 4, seen
    assert took < 5, f"deploy took {took:.1f} s to stop after the interrupt"
    assert all(wait_gone(pid, 5) for name, pid in seen.items() if name != "t"), seen


def test_sigterm_while_the_options_are_checked_cleans_up(tmp_path, synthetic_sites):
    """SIGTERM to `fedclip-cache deploy` during its option checks (the first seconds: they import torch; the CLI has
    already made the temporary folder and started the zygote) takes the Ctrl-C path: one line, exit 130, no
    /tmp/fedclip-deploy-* left."""
    sites = synthetic_sites(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import os, signal, sys\nfrom fedclip_cache import cli\nfrom fedclip_cache.launch import deploy\nreal = deploy.check_sites\n"
              "def check(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a, **k)\n"
              "deploy.check_sites = check\nsys.argv = ['fedclip-cache', *sys.argv[1:]]\ncli.main()\n")
    p = subprocess.run([sys.executable, "-c", script, "deploy", *sites, "-o", str(tmp_path / "run"), "--heldout",
                        "sketch", "--rounds", "1"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": SRC, "TMPDIR": str(tmp)})
    assert p.returncode == 130, (p.returncode, p.stdout, p.stderr)
    assert "deploy: interrupted" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp.glob("fedclip-deploy-*")) == []


def test_ctrl_c_while_the_cli_reads_its_options_is_one_line(tmp_path, monkeypatch, synthetic_sites):
    """A KeyboardInterrupt between the Launch and deploy() (the CLI's own option parsing) is deploy's one line and exit
    130 (not click's "Aborted!" and exit 1), and the Launch is aborted."""
    from fedclip_cache import cli

    aborted = []

    class FakeLaunch:
        used = False

        def __init__(self, *a, **k):
            pass

        def abort(self):
            aborted.append(True)

    monkeypatch.setattr(dep, "Launch", FakeLaunch)
    monkeypatch.setattr(cli, "_config_from_flags", _ctrl_c)
    res = _cli_deploy(tmp_path, synthetic_sites)
    assert res.exit_code == 130, res.output
    assert "deploy: interrupted" in res.output and aborted == [True]


def test_sigterm_while_deploy_checks_its_input_cleans_up(tmp_path, synthetic_sites):
    """deploy() called from Python (its own Launch, made before the checks): SIGTERM during the checks is a
    KeyboardInterrupt, the launch is aborted, SIGTERM's handler is restored and no /tmp/fedclip-deploy-* is left."""
    sites = synthetic_sites(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import os, signal, sys\nfrom fedclip_cache.launch import deploy\n"
              "from fedclip_cache.federated.config import FederateConfig\nreal = deploy.check_sites\n"
              "def check(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a, **k)\n"
              "deploy.check_sites = check\ncfg = FederateConfig(rounds=1, heldout=['sketch']).validate()\n"
              "try:\n    deploy.deploy(sys.argv[2:], sys.argv[1], cfg)\nexcept KeyboardInterrupt:\n"
              "    print('interrupted')\n    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), *sites], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC, "TMPDIR": str(tmp)})
    assert p.returncode == 0 and p.stdout.strip() == "interrupted", (p.returncode, p.stdout, p.stderr)
    assert list(tmp.glob("fedclip-deploy-*")) == []


def test_a_launch_deploy_never_took_is_ended_by_the_cli(tmp_path, monkeypatch, synthetic_sites):
    """When the CLI's deploy() call raises before it takes the CLI's Launch, the CLI ends that Launch: its zygote is
    gone and its /tmp/fedclip-deploy-* folder removed."""
    import tempfile

    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs are not installed")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    launches = []
    real = dep.Launch

    def launch(*a, **k):
        launches.append(real(*a, **k))
        return launches[-1]

    monkeypatch.setattr(dep, "Launch", launch)
    monkeypatch.setattr(dep, "deploy", _ctrl_c)
    res = _cli_deploy(tmp_path, synthetic_sites)
    assert res.exit_code == 130 and "deploy: interrupted" in res.output
    assert len(launches) == 1 and launches[0].zygote.proc.poll() is not None
    assert list(tmp.glob("fedclip-deploy-*")) == []


def _ctrl_c(*a, **k):
    raise KeyboardInterrupt


def _cli_deploy(tmp_path, synthetic_sites):
    """``fedclip-cache deploy`` of three synthetic site caches, in-process (typer's runner)."""
    from typer.testing import CliRunner

    from fedclip_cache import cli

    return CliRunner().invoke(cli.app, ["deploy", *synthetic_sites(tmp_path), "-o", str(tmp_path / "run"),
                                        "--heldout", "sketch"])
