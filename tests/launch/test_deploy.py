"""`fedclip-cache deploy`: a real local Flower deployment (SuperLink + one site per cache -- a SuperNode and its
long-lived ClientApp process -- as separate processes). The two end-to-end tests are marked `slow` (each well under
a minute: start-up is most of it, a round takes ~1-3 s on 2 busy cores)."""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import os

import pytest

pytest.importorskip("flwr")

from fedclip_cache.launch import deploy as dep  # noqa: E402
from fedclip_cache.errors import ConfigError, FedclipCacheError  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402
from fedclip_cache.launch.procs import CAN_DIE_WITH_PARENT  # noqa: E402

DOMAINS = ("art", "photo", "sketch")


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_local_deployment_runs_and_stops_everything(tmp_path, synthetic_sites, run_sites):
    """A real deployment (--head prototype: class sums and counts from the training sites first) writes the run
    folder of the same rounds run in-process, and stops every process it started."""
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    sites = synthetic_sites(tmp_path)
    cfg = FederateConfig(rounds=2, hidden=8, heldout=["sketch"], head="prototype").validate()
    messages = []
    res = dep.deploy(sites, tmp_path / "run", cfg, timeout=240, log=messages.append)
    assert res["status"] == "finished:completed"
    assert res["run_config"] == {"rounds": 2, "hidden": 8, "head": "prototype", "sites": 3, "heldout": "sketch",
                                 "out": str((tmp_path / "run").resolve()), "poll_interval": 0.2}
    assert any(m.startswith("round 2") for m in messages)
    logs = tmp_path / "run" / "logs"
    for name in ("superlink", "serverapp", "site-art", "site-photo", "site-sketch"):
        assert (logs / f"{name}.log").stat().st_size > 0
    assert "[ROUND 2]" in (logs / "serverapp.log").read_text()
    assert not (logs / "flwr-run.log").exists()  # the run is started in-process (flwr_cli.start_run)
    assert json.loads((logs / "deploy.json").read_text())["status"] == "finished:completed"
    # every process it started (the zygote and what it forked: SuperLink, ServerApp, 3 sites) is gone
    assert len(res["pids"]) == 6 and all(_group_gone(p) for p in res["pids"])
    # the ServerApp wrote the run folder `federate` writes, plots included
    assert (tmp_path / "run" / "plots" / "accuracy_vs_round.png").stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res["summary"] == summary
    assert [(r["fit_results"], r["fit_failures"]) for r in summary["deployment"]["rounds"]] == [(2, 0), (2, 0)]
    assert set(summary["cache"]["sites"]) == {"art", "photo", "sketch"}
    e = summary["experiments"][0]
    assert e["heldout"] == "sketch" and set(e["clients"]) == {"art", "photo"} and e["heldout_size"] == 60
    # ... with the adapter and numbers of the same rounds in-process (tests/flower/test_flower.py shows that equals
    # `federate` on one cache of all sites)
    import numpy as np
    import torch

    from fedclip_cache.federated.recorder import RunRecorder
    from fedclip_cache.flower.client_app import SiteClient

    co = run_sites([SiteClient(p, cfg) for p in sites], cfg, RunRecorder(cfg, None))
    here = co.finish()
    deployed = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in co.current.items():
        np.testing.assert_allclose(deployed[name].numpy(), p.numpy(), rtol=1e-6, atol=1e-7)
    assert here["experiments"] == summary["experiments"] and here["mean"] == summary["mean"]


def test_deploy_refuses_bad_input_before_starting_anything(tmp_path, monkeypatch, synthetic_sites):
    sites = synthetic_sites(tmp_path, ("art", "photo"))
    cfg = FederateConfig(rounds=1).validate()
    with pytest.raises(ConfigError, match="at least 2"):
        dep.deploy(sites[:1], tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        dep.deploy([sites[0], str(tmp_path / "nope")], tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="none of the sites"):
        dep.deploy(sites, tmp_path / "run", FederateConfig(heldout=["mars"]).validate())
    with pytest.raises(ConfigError, match="--protocol lodo needs --heldout"):
        dep.deploy(sites, tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="--train-views 2: the cache .* holds 1 view"):  # a site's own check
        dep.deploy(sites, tmp_path / "run", FederateConfig(protocol="personal", train_views="2").validate())
    with pytest.raises(ConfigError, match="--template '7': give an index below 1"):
        dep.deploy(sites, tmp_path / "run", FederateConfig(protocol="personal", template="7").validate())
    assert dep.run_config(FederateConfig(split=(0.5, 0.3, 0.2), heldout=["art"]).validate(), 2,
                          tmp_path)["split"] == "0.5,0.3,0.2"  # passed on (Flower's run config holds scalars)
    merged = str(write_synthetic_cache(tmp_path / "merged", {"a": 20, "b": 20}, 3, dim=8))
    with pytest.raises(ConfigError, match="one domain"):
        dep.deploy([merged, sites[0]], tmp_path / "run", cfg)
    monkeypatch.setattr(dep, "flower_bin_dir", lambda: None)
    with pytest.raises(FedclipCacheError, match=r"pip install 'fedclip-cache\[flower\]'"):
        dep.deploy(sites, tmp_path / "run", cfg)
    assert not (tmp_path / "run").exists()  # nothing written, nothing started


def test_cli_deploy_one_line_error(tmp_path, monkeypatch, capsys, synthetic_sites, one_line_error, run):
    sites = synthetic_sites(tmp_path, ("art",))
    one_line_error(*run("deploy", sites[0], "-o", tmp_path / "run"), "at least 2")
    one_line_error(*run("deploy", sites[0], tmp_path / "nope", "-o", tmp_path / "run",
                        "--rounds", "2"), "does not exist")
    sites = synthetic_sites(tmp_path, ("art", "photo"))
    one_line_error(*run("deploy", *sites, "-o", tmp_path / "run", "--protocol", "personal",
                        "--device", "cuda"), "--device cuda: not supported")


@pytest.mark.slow
def test_a_site_killed_mid_run_is_recorded_and_rejoins(tmp_path, monkeypatch, synthetic_sites):
    """Kill one training site (SuperNode and worker: one process) after round 2, and start it again on the same
    cache: the run finishes, the rounds it missed record one adapter fewer and a failure, and once back (a new
    node) it is sampled, trains and evaluates again."""
    import re
    import signal
    import subprocess
    import sys

    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    monkeypatch.setenv("FEDCLIP_FLOWER_ROUND_DELAY", "1")  # rounds left for the restarted site to come back
    sites = synthetic_sites(tmp_path)
    cfg = FederateConfig(rounds=10, hidden=8, heldout=["sketch"]).validate()
    state: dict = {}

    def log(message):
        m = re.search(r"SuperLink on (127\.0\.0\.1:\d+)", message)
        if m:
            state["superlink"] = m.group(1)
        m = re.search(r"site photo \(pid (\d+)\)", message)
        if m:
            state["photo"] = m.group(1)
        if message.startswith("round 2") and "restarted" not in state:
            pids = [state["photo"]]  # the photo site: SuperNode and worker, one process
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            state["killed"] = pids
            state["restarted"] = subprocess.Popen(
                [sys.executable, "-m", "fedclip_cache", "site", sites[1], "--superlink", state["superlink"],
                 "--port", str(dep.free_port()), "--insecure"], stdout=open(tmp_path / "rejoin.log", "wb"),
                stderr=subprocess.STDOUT, start_new_session=True)

    try:
        res = dep.deploy(sites, tmp_path / "run", cfg, timeout=300, log=log, keep_going=True, round_timeout=8)
    finally:
        if "restarted" in state:
            os.killpg(state["restarted"].pid, signal.SIGKILL)
            state["restarted"].wait()
    assert state.get("killed"), "the photo site was never found to kill"
    assert res["status"] == "finished:completed"
    rounds = res["summary"]["deployment"]["rounds"]
    fits = [r["fit_results"] for r in rounds]
    assert fits[:2] == [2, 2]
    missed = [i for i, r in enumerate(rounds) if r["fit_results"] == 1 and r["fit_failures"] == 1]
    assert missed, rounds  # the round(s) while it was gone
    assert fits[-1] == 2 and any(i < len(fits) - 1 for i in missed), rounds  # trained again after coming back
    import pyarrow.parquet as pq

    m = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pandas()
    assert 10 in set(m[(m["client"] == "photo") & (m["split"] == "val")]["round"])  # evaluates again
    assert "train.round" in (tmp_path / "rejoin.log").read_text()
    assert all(_group_gone(p) for p in res["pids"])


def test_sites_with_different_class_lists_or_dims_fail_before_start(tmp_path):
    """Site caches with another class list (the held-out site would be scored on other classes) or another feature dim
    are one-line errors before anything starts."""
    cfg = FederateConfig(rounds=1, heldout=["sketch"]).validate()
    a, b = (str(write_synthetic_cache(tmp_path / f"s-{d}", {d: 20}, 3, dim=16, seed=1)) for d in ("art", "photo"))
    classes = str(write_synthetic_cache(tmp_path / "s-sketch4", {"sketch": 20}, 4, dim=16, seed=1))
    dim = str(write_synthetic_cache(tmp_path / "s-sketch32", {"sketch": 20}, 3, dim=32, seed=1))
    with pytest.raises(ConfigError, match="class list"):
        dep.check_sites([a, b, classes], cfg)
    with pytest.raises(ConfigError, match="feature dimension"):
        dep.check_sites([a, b, dim], cfg)
    assert dep.check_sites([a, b, str(write_synthetic_cache(tmp_path / "s-sketch", {"sketch": 20}, 3, dim=16,
                                                            seed=1))], cfg) == ["art", "photo", "sketch"]


def test_run_folder_that_is_a_file_is_a_one_line_error(tmp_path, synthetic_sites):
    """`deploy -o FILE` (and `simulate -o FILE`) is a one-line error before anything runs, not a NotADirectoryError
    traceback."""
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "run"):
        with pytest.raises(ConfigError, match="is a file"):
            dep.check_run_folder(out)
    dep.check_run_folder(tmp_path / "new" / "run")  # not there yet: fine
    if dep.flower_bin_dir() is not None:
        with pytest.raises(ConfigError, match="is a file"):
            dep.deploy(synthetic_sites(tmp_path), f, FederateConfig(rounds=1, heldout=["sketch"]).validate())


@pytest.mark.skipif(not CAN_DIE_WITH_PARENT, reason="PR_SET_PDEATHSIG is Linux-only")
def test_processes_started_by_deploy_die_with_it(tmp_path, wait_gone):
    """A child started as deploy starts its zygote, SuperLink, ServerApp process, sites and `flwr run` (each in its own
    session) ends when deploy is killed with `kill -9`."""
    import signal
    import subprocess
    import sys

    script = ("import subprocess, sys, time\nfrom fedclip_cache.launch.procs import dies_with_us\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True, "
              "preexec_fn=dies_with_us())\nprint(p.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(Path(dep.__file__).resolve().parents[2])})
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(child, 10), "the child outlived its killed parent"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not CAN_DIE_WITH_PARENT, reason="PR_SET_PDEATHSIG is Linux-only")
def test_kill_9_of_deploy_ends_every_process_it_started(tmp_path, synthetic_sites, wait_gone):
    import re
    import signal
    import subprocess
    import sys
    import time

    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    sites = synthetic_sites(tmp_path)
    cmd = [sys.executable, "-m", "fedclip_cache", "deploy", *sites, "-o", str(tmp_path / "run"), "--heldout",
           "sketch", "--rounds", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(dep.__file__).resolve().parents[2])})
    pids, lines = [], []
    try:
        for line in p.stdout:
            lines.append(line)
            pids += [int(x) for x in re.findall(r"\(pid (\d+)\)", line)]
            if line.startswith("round 1"):
                break
        assert len(pids) == 3, "".join(lines)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t = time.monotonic()
        assert all(wait_gone(pid, 10) for pid in pids), f"sites still running {time.monotonic() - t:.1f} s after"
        assert not (tmp_path / "run" / "summary.json").exists()
    finally:
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("kw,match", [({"round_timeout": float("nan")}, "round_timeout nan"),
                                      ({"round_timeout": -5}, "round_timeout -5"),
                                      ({"round_timeout": 0}, "round_timeout 0"),
                                      ({"min_results": 0}, "min_results 0"),
                                      ({"min_results": 4}, "min_results 4")])
def test_fault_tolerance_options_fail_before_start(tmp_path, kw, match, synthetic_sites):
    """--round-timeout nan or -5 and --min-results 0 or more than the sites are one-line errors before start-up (not a
    timeout that never expires, nor a failure inside the ServerApp)."""
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs are not installed")
    with pytest.raises(ConfigError, match=match):
        dep.deploy(synthetic_sites(tmp_path), tmp_path / "run", FederateConfig(rounds=1, heldout=["sketch"]).validate(),
                   **kw)
    assert not (tmp_path / "run").exists()


def test_interrupted_deploy_says_so_in_one_line(tmp_path, monkeypatch, synthetic_sites):
    """Ctrl-C of `deploy` exits 130 saying so in one line."""
    from typer.testing import CliRunner

    from fedclip_cache import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dep, "deploy", interrupted)
    res = CliRunner().invoke(cli.app, ["deploy", *synthetic_sites(tmp_path), "-o", str(tmp_path / "run"), "--heldout",
                                       "sketch"])
    assert res.exit_code == 130
    assert "deploy: interrupted" in res.output and "Traceback" not in res.output


def test_second_deploy_into_a_busy_run_folder_is_a_one_line_error(tmp_path, synthetic_sites):
    """A second `deploy -o SAME` while one runs is a one-line error (never two runs sharing RUN/logs and outputs); a
    re-run into a completed run folder that is killed leaves it incomplete, never looking complete with the old
    summary.json."""
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs are not installed")
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "summary.json").write_text("{}")  # an earlier run's
    # and its logs: appended to, deploy read the old run id and the old "[SUMMARY]" (end of run) from them
    (out / "logs" / "flwr-run.log").write_text("Successfully started run 123\n")
    (out / "logs" / "serverapp.log").write_text("[SUMMARY] 3 replies\n")
    held = dep._lock_run_folder(out)  # as a running deploy holds it
    dep.clear_own_logs(out / "logs", dep.own_logs(list(DOMAINS), "worker"))  # what deploy does next
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "logs").iterdir()) == [dep.LOGS_MANIFEST]
    assert json.loads((out / "state.json").read_text())["state"] == "in-progress"
    try:
        with pytest.raises(ConfigError, match="in use by another deploy"):
            dep.deploy(synthetic_sites(tmp_path), out, FederateConfig(rounds=1, heldout=["sketch"]).validate())
    finally:
        held.close()
    dep._lock_run_folder(out).close()  # free again


def test_site_checks_its_cache_and_port_before_start(tmp_path, synthetic_sites):
    """`site MERGED_CACHE` (three domains) and `site --port 0` are one-line errors before a SuperNode starts."""
    from typer.testing import CliRunner

    from fedclip_cache import cli

    merged = str(write_synthetic_cache(tmp_path / "merged", {"a": 10, "b": 10}, 3, dim=8))
    for args, match in (([merged], "holds one domain"), ([synthetic_sites(tmp_path)[0], "--port", "0"], "--port 0")):
        res = CliRunner().invoke(cli.app, ["site", *args, "--superlink", "127.0.0.1:1", "--insecure"])
        assert isinstance(res.exception, ConfigError) and match in str(res.exception), res.output


def test_stale_temporary_folders_of_dead_deploys_are_swept(tmp_path):
    """A deploy killed with kill -9 cannot remove its temporary folder (app, FLWR_HOME, the SuperExec secret): the
    next deploy removes the folders whose owner is gone, and keeps those of running deploys."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {}
    for name, owner in (("dead", str(dead.pid)), ("alive", str(os.getpid())), ("fresh-no-owner", None),
                        ("old-no-owner", None), ("garbage-owner", "not a pid")):
        d = tmp_path / f"{dep.TMP_PREFIX}{name}"
        (d / "home").mkdir(parents=True)
        if owner is not None:
            (d / "owner").write_text(owner)
        folders[name] = d
    old = time.time() - 2 * 86400
    os.utime(folders["old-no-owner"], (old, old))
    (tmp_path / f"{dep.TMP_PREFIX}a-file").write_text("not a folder")
    gone = dep.sweep_stale_folders(tmp_path)
    assert sorted(p.name for p in gone) == sorted(folders[n].name for n in ("dead", "old-no-owner"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([folders[n].name for n in ("alive", "fresh-no-owner", "garbage-owner")]
                          + [f"{dep.TMP_PREFIX}a-file"])


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_deploy_timeout_must_be_a_positive_number(tmp_path, monkeypatch, capsys, value, synthetic_sites):
    """--timeout must be a positive number: -1 (and the other bad values) is a one-line error before anything starts."""
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs are not installed")
    from fedclip_cache.cli import main

    before = set(Path(tempfile.gettempdir()).glob(dep.TMP_PREFIX + "*"))
    monkeypatch.setattr(sys, "argv", ["fedclip-cache", "deploy", *synthetic_sites(tmp_path), "-o",
                                      str(tmp_path / "run"), "--heldout", "sketch", "--timeout", value])
    with pytest.raises(SystemExit) as ex:
        main()
    out, err = capsys.readouterr()
    assert ex.value.code == 2 and "Traceback" not in out + err
    assert err.strip().startswith("error:") and "--timeout" in err and "\n" not in err.strip(), err
    assert set(Path(tempfile.gettempdir()).glob(dep.TMP_PREFIX + "*")) <= before  # its folder is gone
    assert not (tmp_path / "run").exists()
