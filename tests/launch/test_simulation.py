"""`fedclip-cache simulate`: the Flower ServerApp/ClientApp of a deployment run in Flower's simulation engine (Ray).
The two end-to-end runs start a local Ray instance and are marked `slow` (~15-25 s each on 2 busy cores: Ray's
start-up and its actors importing torch are most of it); they are skipped without the `[simulation]` extra."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclip_cache.errors import ConfigError, FedclipCacheError
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.synthetic import write_synthetic_cache

DOMAINS = {"art": 60, "photo": 50, "sketch": 40}
# hard enough that accuracies differ between rounds and clients (easy synthetic data is 100 % everywhere)
HARD = dict(dim=16, seed=4, class_sep=0.6, domain_shift=0.5)


def _needs_ray():
    pytest.importorskip("flwr")
    pytest.importorskip("ray")


@pytest.fixture(scope="session")
def same_run(same_scores, same_metrics):
    """``same_run(sim, fed, summary_sim, summary_fed)``: a simulated run folder equals `federate`'s: selection,
    accuracies, clients, metrics table, adapter."""
    def check(sim: Path, fed: Path, summary_sim: dict, summary_fed: dict) -> None:
        a_exp, b_exp = summary_sim["experiments"][0], summary_fed["experiments"][0]
        for key in ("experiment", "heldout", "seed", "clients", "heldout_size"):
            assert a_exp[key] == b_exp[key], key
        same_scores(a_exp, b_exp)
        assert summary_sim["mean"] == pytest.approx(summary_fed["mean"], abs=1e-12)
        assert summary_sim["communication"] == summary_fed["communication"]
        assert json.loads((sim / "summary.json").read_text()) == summary_sim
        _, m_fed = same_metrics(sim, fed)
        # the accuracies are not all one number (the comparison would then prove little)
        assert m_fed["accuracy"].nunique() > 3
        sim_ad, fed_ad = torch.load(sim / "adapter.pt"), torch.load(fed / "adapter.pt")
        assert set(sim_ad) == set(fed_ad)
        for name in fed_ad:
            np.testing.assert_allclose(sim_ad[name].numpy(), fed_ad[name].numpy(), rtol=1e-5, atol=1e-5)

    return check


def _ray_gone() -> bool:
    import ray

    return not ray.is_initialized()


@pytest.mark.slow
def test_simulation_of_a_shared_cache_equals_federate(tmp_path, same_run):
    """One shared cache: one virtual SuperNode per training client (partition-id) and one for the held-out domain;
    the run folder equals in-process `federate` on the same cache and seed."""
    _needs_ray()
    from fedclip_cache.federated.results import federate
    from fedclip_cache.launch.simulate import simulate

    cache = write_synthetic_cache(tmp_path / "c", DOMAINS, 4, **HARD)
    cfg = FederateConfig(rounds=3, lr=1e-2, hidden=8, batch_size=8, heldout=["sketch"], seed=1,
                         split=(0.5, 0.3, 0.2)).validate()  # a non-default split travels in the run config too
    fed = federate(str(cache), cfg, out=tmp_path / "fed")
    messages = []
    res = simulate([str(cache)], tmp_path / "sim", cfg, num_cpus=2, log=messages.append)
    assert len(res["nodes"]) == 3 and res["nodes"][2]["cache"].endswith("sketch")  # 2 trainers + the held-out
    assert res["run_config"]["cache"] == str(cache.resolve()) and res["run_config"]["heldout"] == "sketch"
    same_run(tmp_path / "sim", tmp_path / "fed", res["summary"], fed)
    assert [(r["fit_results"], r["fit_failures"]) for r in res["summary"]["deployment"]["rounds"]] == [(2, 0)] * 3
    assert res["summary"]["experiments"][0]["heldout_size"] == DOMAINS["sketch"]
    # the held-out site's cache is the shared cache (it evaluated a temporary copy of its rows, now deleted)
    held = json.loads((tmp_path / "sim" / "summary.json").read_text())["cache"]["sites"]["sketch"]
    assert held["path"] == str(cache.resolve()) and "temporary copy" in held["note"]
    assert json.loads(held["identity"])["path"] == str(cache.resolve())
    # that edit of summary.json is in the run folder's commit record: complete, not a mixed folder
    from fedclip_cache.federated.runfolder import check_readable

    assert json.loads((tmp_path / "sim" / "state.json").read_text())["state"] == "complete"
    assert check_readable(tmp_path / "sim", "deploy") == []
    # nothing of Ray's in the run folder; its session folder and the held-out copy are gone; Ray is shut down
    names = {p.name for p in (tmp_path / "sim").iterdir()}
    assert {"summary.json", "metrics.parquet", "adapter.pt", "config.json", "simulation.json"} <= names
    assert not any("ray" in n for n in names)
    assert not Path(res["backend_config"]["init_args"]["_temp_dir"]).exists()
    assert res["backend_config"]["init_args"]["address"] == "local"
    assert _ray_gone()


@pytest.mark.slow
def test_simulation_of_per_site_caches_equals_federate_on_all_their_images(tmp_path, monkeypatch, capsys, run,
                                                                          same_run):
    """Per-site caches (node K gets cache=SITE_K), through the CLI: the run folder equals `federate` on one cache
    of all sites' images; `report` renders it."""
    _needs_ray()
    from fedclip_cache.cache.reader import open_cache
    from fedclip_cache.federated.results import federate
    from fedclip_cache.launch.simulate import write_domain_cache

    merged = write_synthetic_cache(tmp_path / "merged", DOMAINS, 4, **HARD)
    fc = open_cache(merged)
    sites = [str(write_domain_cache(fc, d, tmp_path / f"site-{d}")) for d in DOMAINS]
    assert [open_cache(s).domain_names for s in sites] == [[d] for d in DOMAINS]
    cfg = FederateConfig(rounds=2, lr=1e-2, hidden=8, batch_size=8, heldout=["photo"]).validate()
    fed = federate(str(merged), cfg, out=tmp_path / "fed")
    code, out, err = run("simulate", *sites, "-o", tmp_path / "sim", "--rounds", "2", "--lr",
                         "1e-2", "--hidden", "8", "--batch-size", "8", "--heldout", "photo", "--num-cpus", "2")
    assert code == 0, out + err
    assert "node photo: held out" in out and "run folder:" in out
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    same_run(tmp_path / "sim", tmp_path / "fed", summary, fed)
    assert set(summary["cache"]["sites"]) == set(DOMAINS)
    assert (tmp_path / "sim" / "plots" / "accuracy_vs_round.png").is_file()
    assert _ray_gone()


def test_bad_simulation_input_is_refused_before_ray_starts(tmp_path):
    _needs_ray()
    from fedclip_cache.launch.simulate import simulate

    cache = str(write_synthetic_cache(tmp_path / "c", DOMAINS, 3, dim=8))
    site = str(write_synthetic_cache(tmp_path / "s", {"art": 20}, 3, dim=8))
    ok = FederateConfig(rounds=1, heldout=["art"]).validate()
    cases = [
        ([cache], FederateConfig(rounds=1).validate(), {}, "--heldout DOMAIN"),
        ([cache], FederateConfig(rounds=1, heldout=["mars"]).validate(), {}, "not a domain"),
        ([cache], FederateConfig(rounds=1, heldout=["art"], algo="local").validate(), {}, "nothing to federate"),
        ([cache], ok, {"client_cpus": 4, "num_cpus": 2}, "--client-cpus"),
        ([cache], ok, {"backend": {"init_args": {"address": "10.0.0.1:6379"}}}, "own local Ray"),
        ([cache], ok, {"backend": {"bogus": {}}}, "init_args, client_resources or actor"),
        ([site, str(tmp_path / "nope")], ok, {}, "does not exist"),
        ([cache, cache], ok, {}, "holds one domain"),
        ([str(tmp_path / "nope")], ok, {}, "does not exist"),
        ([site, str(write_synthetic_cache(tmp_path / "s2", {"photo": 20}, 3, dim=8))], ok, {},
         "at least 2 other sites must train"),
    ]
    for caches, cfg, kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            simulate(caches, tmp_path / "run", cfg, log=lambda m: None, **kw)
    assert not (tmp_path / "run").exists()
    assert _ray_gone()


def test_simulate_claims_its_run_folder_before_ray_starts(tmp_path):
    """simulate takes the run folder's one lock (as deploy and federate do): a folder in use by another run, or a
    folder of another kind, is refused in one line before Ray starts, and the folder is left as it was."""
    _needs_ray()
    from fedclip_cache.launch.simulate import simulate
    from fedclip_cache.federated.runfolder import RunFolderError, claim

    cache = str(write_synthetic_cache(tmp_path / "c", DOMAINS, 3, dim=8))
    ok = FederateConfig(rounds=1, heldout=["art"]).validate()
    busy = claim(tmp_path / "busy", "deploy", "simulate -o")  # as a running simulate (or deploy) holds it
    try:
        with pytest.raises(RunFolderError, match="in use by another deploy"):
            simulate([cache], tmp_path / "busy", ok, log=lambda m: None)
    finally:
        busy.close()
    fed = claim(tmp_path / "fed", "federate", "federate -o")
    fed.complete()
    fed.close()
    before = sorted(p.name for p in (tmp_path / "fed").iterdir())
    with pytest.raises(RunFolderError, match="a federate run folder"):
        simulate([cache], tmp_path / "fed", ok, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "fed").iterdir()) == before
    assert _ray_gone()


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    from fedclip_cache.launch import simulate as flower_sim

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(FedclipCacheError, match=r"ray not installed.*pip install 'fedclip-cache\[simulation\]'"):
        flower_sim.require_simulation()


def test_cli_simulate_one_line_errors(tmp_path, monkeypatch, capsys, one_line_error, run):
    _needs_ray()
    cache = str(write_synthetic_cache(tmp_path / "c", DOMAINS, 3, dim=8))
    one_line_error(*run("simulate", cache, "-o", tmp_path / "run"), "--protocol personal")
    one_line_error(*run("simulate", cache, "-o", tmp_path / "run", "--heldout", "art",
                        "--backend-config", "{nope"), "--backend-config")
