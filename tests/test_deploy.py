"""`fedclip-cache deploy`: a real local Flower deployment (SuperLink + one site per cache -- a SuperNode and its
long-lived ClientApp process -- as separate processes). The two end-to-end tests are marked `slow` (each well under
a minute: start-up is most of it, a round takes ~1-3 s on 2 busy cores)."""
import json
from pathlib import Path
import os

import pytest

pytest.importorskip("flwr")

from fedclip_cache import deploy as dep  # noqa: E402
from fedclip_cache.errors import ConfigError, FedclipCacheError  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

DOMAINS = ("art", "photo", "sketch")


def _sites(tmp_path, domains=DOMAINS):
    # one domain per site, the same classes and (as with one model) the same prompt embeddings
    return [str(write_synthetic_cache(tmp_path / f"site-{d}", {d: 60}, 3, dim=16, seed=1)) for d in domains]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_local_deployment_runs_and_stops_everything(tmp_path):
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    sites = _sites(tmp_path)
    cfg = FederateConfig(rounds=2, hidden=8, heldout=["sketch"]).validate()
    messages = []
    res = dep.deploy(sites, tmp_path / "run", cfg, timeout=240, log=messages.append)
    assert res["status"] == "finished:completed"
    assert res["run_config"] == {"rounds": 2, "hidden": 8, "sites": 3, "heldout": "sketch",
                                 "out": str((tmp_path / "run").resolve()), "poll_interval": 0.1}
    assert any(m.startswith("round 2") for m in messages)
    logs = tmp_path / "run" / "logs"
    for name in ("superlink", "site-art", "site-photo", "site-sketch", "flwr-run"):
        assert (logs / f"{name}.log").stat().st_size > 0
    assert "[ROUND 2]" in (logs / "flwr-run.log").read_text()
    assert json.loads((logs / "deploy.json").read_text())["status"] == "finished:completed"
    # every process it started (and their children: superexec, clientapps, serverapp) is gone
    assert len(res["pids"]) == 5 and all(_group_gone(p) for p in res["pids"])
    # the ServerApp wrote the run folder `federate` writes
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res["summary"] == summary
    assert [(r["fit_results"], r["fit_failures"]) for r in summary["deployment"]["rounds"]] == [(2, 0), (2, 0)]
    assert set(summary["cache"]["sites"]) == {"art", "photo", "sketch"}
    e = summary["experiments"][0]
    assert e["heldout"] == "sketch" and set(e["clients"]) == {"art", "photo"} and e["heldout_size"] == 60
    # ... with the adapter the same clients and strategy give when called in-process (tests/test_flower.py shows
    # that equals `federate` on one cache of all sites)
    import numpy as np
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from fedclip_cache.federated.algorithms import make_algorithm
    from fedclip_cache.flower import AlgorithmStrategy, FedCLIPClient

    clients = [FedCLIPClient.for_site(p, cfg) for p in sites]
    strategy = AlgorithmStrategy(make_algorithm(cfg), ["w1", "b1", "w2", "b2"],
                                 initial_parameters=ndarrays_to_parameters(clients[0].get_parameters({})))
    params = clients[0].get_parameters({})
    for rnd in (1, 2):
        fits = [c.fit(params, {"server_round": rnd}) for c in clients]
        agg, _ = strategy.aggregate_fit(rnd, [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(p), n, m))
                                              for p, n, m in fits], [])
        params = parameters_to_ndarrays(agg)
    deployed = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in zip(["w1", "b1", "w2", "b2"], params):
        np.testing.assert_allclose(deployed[name][0].numpy(), p, rtol=1e-6, atol=1e-7)


def test_deploy_refuses_bad_input_before_starting_anything(tmp_path, monkeypatch):
    sites = _sites(tmp_path, ("art", "photo"))
    cfg = FederateConfig(rounds=1).validate()
    with pytest.raises(ConfigError, match="at least 2"):
        dep.deploy(sites[:1], tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        dep.deploy([sites[0], str(tmp_path / "nope")], tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="none of the sites"):
        dep.deploy(sites, tmp_path / "run", FederateConfig(heldout=["mars"]).validate())
    with pytest.raises(ConfigError, match="--split"):
        dep.deploy(sites, tmp_path / "run", FederateConfig(split=(0.5, 0.3, 0.2)).validate())
    with pytest.raises(ConfigError, match="text only"):
        dep.deploy(sites, tmp_path / "run", FederateConfig(head="prototype").validate())
    merged = str(write_synthetic_cache(tmp_path / "merged", {"a": 20, "b": 20}, 3, dim=8))
    with pytest.raises(ConfigError, match="one domain"):
        dep.deploy([merged, sites[0]], tmp_path / "run", cfg)
    monkeypatch.setattr(dep, "flower_bin_dir", lambda: None)
    with pytest.raises(FedclipCacheError, match=r"pip install 'fedclip-cache\[flower\]'"):
        dep.deploy(sites, tmp_path / "run", cfg)
    assert not (tmp_path / "run").exists()  # nothing written, nothing started


def test_cli_deploy_one_line_error(tmp_path, monkeypatch, capsys):
    from test_cache_integrity import cli, one_line_error

    sites = _sites(tmp_path, ("art",))
    one_line_error(*cli(monkeypatch, capsys, "deploy", sites[0], "-o", tmp_path / "run"), "at least 2")
    one_line_error(*cli(monkeypatch, capsys, "deploy", sites[0], tmp_path / "nope", "-o", tmp_path / "run",
                        "--rounds", "2"), "does not exist")


@pytest.mark.slow
def test_a_supernode_killed_mid_run_does_not_stop_the_run(tmp_path):
    """Kill one training site's SuperNode when round 2 starts: with --keep-going the run finishes, the lost site's
    failures are recorded per round, and the rounds after it average the site that is left."""
    import signal
    import subprocess

    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    sites = _sites(tmp_path)
    cfg = FederateConfig(rounds=4, hidden=8, heldout=["sketch"]).validate()
    killed = []

    def log(message):
        if message.startswith("round 2") and not killed:
            # the photo site: `fedclip-cache site` (its process group holds its SuperNode too)
            pids = subprocess.run(["pgrep", "-f", f"fedclip_cache site {Path(sites[1]).resolve()}"], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                try:
                    os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed.extend(pids)

    res = dep.deploy(sites, tmp_path / "run", cfg, timeout=300, log=log, keep_going=True, round_timeout=5)
    assert killed, "the photo SuperNode was never found to kill"
    assert res["status"] == "finished:completed"
    rounds = res["summary"]["deployment"]["rounds"]
    assert rounds[0]["fit_results"] == 2 and rounds[0].get("fit_failures", 0) == 0
    # after the kill the photo site is missing: a failure, or simply not sampled any more
    later = rounds[1:]
    assert all(r["fit_results"] <= 2 for r in later)
    assert any(r["fit_results"] == 1 or r.get("fit_failures", 0) or r.get("evaluate_failures", 0) for r in later)
    assert all(_group_gone(p) for p in res["pids"])
