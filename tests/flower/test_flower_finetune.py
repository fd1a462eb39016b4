"""`--finetune-steps K` in Flower deployments: after the last round the ServerApp sends the selected global adapter
(best mean validation round) to every site; each training site fine-tunes it K steps on its own train split with
`federate`'s schedule, seeds and fresh optimiser (loop.finetune_adapters, one implementation) and returns its test
accuracy. The run folder's `best.test_finetuned` and means equal `federate`'s.

The fast tests drive the ServerApp's logic (flower.server_app.Coordinator) with in-process sites through the wire
format, as tests/flower/test_flower.py does; the end-to-end `deploy` run is marked `slow` like
tests/launch/test_deploy.py's."""
import json

import numpy as np
import pytest

pytest.importorskip("flwr")

from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.federated.recorder import RunRecorder  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.flower.client_app import SiteClient  # noqa: E402
from fedclip_cache.flower.task import federate_config  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

DOMAINS = {"a": 70, "b": 60, "c": 50}
# hard enough that accuracies differ between rounds, clients and fine-tuning (easy synthetic data is 100 %)
HARD = dict(dim=16, seed=4, class_sep=0.6, domain_shift=0.5)
# a learning rate at which validation peaks before the last round, so the selected adapter is not the final one
OPTS = {"lr": 3e-2, "hidden": 8, "batch_size": 8}


@pytest.fixture
def finetune_phase(wire):
    """``finetune_phase(co, sites, drop=...) -> co``: the ServerApp's extra message after the final evaluation
    (``drop(site)``: that site does not answer)."""
    def phase(co, sites, drop=lambda site: False):
        rec, params = co.finetune_message()
        co.receive_finetune([wire(*s.handle(*wire(rec, params))) for s in sites if not drop(s)])
        return co

    return phase


def _same_finetuned(dep: dict, fed: dict) -> None:
    a, b = dep["experiments"][0]["best"], fed["experiments"][0]["best"]
    assert a["round"] == b["round"]  # the same selected round ...
    assert a["test_finetuned"] == b["test_finetuned"]  # ... fine-tuned to the same accuracies, client by client
    assert list(a["test_finetuned"]) == list(b["test_finetuned"])  # in the same (lane) order
    assert a["test_mean_finetuned"] == b["test_mean_finetuned"]
    assert dep["mean"]["test_mean_finetuned"] == fed["mean"]["test_mean_finetuned"]
    assert dep["notes"] == fed["notes"] and dep["train_views"] == fed["train_views"]


@pytest.mark.parametrize("extra", [{"heldout": "a", "rounds": 6},
                                   {"heldout": "", "rounds": 5, "head": "prototype", "fraction_fit": 0.5,
                                    "algo": "fedprox", "mu": 0.5}])
def test_deployment_finetune_equals_federate(tmp_path, extra, run_sites, finetune_phase):
    cache = str(write_synthetic_cache(tmp_path / "c", DOMAINS, 3, **HARD))
    opts = {**OPTS, **{k: v for k, v in extra.items() if k != "heldout"}, "finetune_steps": 5}
    _, cfg = federate_config({"cache": cache, "heldout": extra["heldout"], **opts})
    fed_cfg = FederateConfig(**opts, **({"heldout": [extra["heldout"]]} if extra["heldout"] else
                                        {"protocol": "personal"}))
    fed = federate(cache, fed_cfg, out=tmp_path / "fed")
    n_train = 2 if extra["heldout"] else 3
    sites = [SiteClient(cache, cfg, pid) for pid in range(n_train)]
    co = finetune_phase(run_sites(sites, cfg, RunRecorder(cfg, tmp_path / "dep")), sites)
    dep = co.finish()
    assert json.loads((tmp_path / "dep" / "summary.json").read_text()) == dep
    _same_finetuned(dep, fed)
    best = dep["experiments"][0]["best"]
    assert set(best["test_finetuned"]) == set(dep["experiments"][0]["clients"])  # every training site, no held-out
    assert dep["deployment"]["finetune"] == {"results": n_train, "failures": []}
    # the data make the check bite: the selected round is not the last (fine-tuning the final adapter would
    # differ), and fine-tuning changes some client's accuracy (returning the global model's would differ)
    assert best["round"] < extra["rounds"]
    assert best["test_finetuned"] != best["test"]


def test_a_site_lost_in_the_finetune_phase_is_recorded_missing(tmp_path, run_sites, finetune_phase):
    """A training site that does not answer the fine-tune message (dead, timed out, an error reply) is left out of
    `test_finetuned` and of the means, named in `deployment.finetune.failures`; the run still writes its folder."""
    cache = str(write_synthetic_cache(tmp_path / "c", DOMAINS, 3, **HARD))
    opts = {**OPTS, "rounds": 4, "finetune_steps": 5}
    _, cfg = federate_config({"cache": cache, "heldout": "a", **opts})
    fed = federate(cache, FederateConfig(**opts, heldout=["a"]))["experiments"][0]["best"]["test_finetuned"]
    sites = [SiteClient(cache, cfg, pid) for pid in range(2)]
    lost = sites[1].name
    co = finetune_phase(run_sites(sites, cfg, RunRecorder(cfg, tmp_path / "dep")), sites,
                        drop=lambda s: s.name == lost)
    dep = co.finish()
    best = dep["experiments"][0]["best"]
    assert best["test_finetuned"] == {k: v for k, v in fed.items() if k != lost} and len(best["test_finetuned"]) == 1
    assert best["test_mean_finetuned"] == next(iter(best["test_finetuned"].values()))
    assert dep["deployment"]["finetune"] == {"results": 1, "failures": [lost]}
    assert json.loads((tmp_path / "dep" / "summary.json").read_text()) == dep


def test_per_site_caches_finetune_on_view_0_with_the_note(tmp_path, model_args, monkeypatch, capsys, run_sites,
                                                          extract_sites, finetune_phase):
    """Sites with their own caches (the held-out one only evaluates) and --train-views 2: fine-tuning uses view 0
    only, and the summary carries `federate`'s note and train_views."""
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys, "--views", "2")
    opts = {"rounds": 3, "lr": 1e-2, "hidden": 8, "batch_size": 4, "train_views": "2", "finetune_steps": 3}
    _, cfg = federate_config({**opts, "heldout": "sketch", "sites": 3})
    clients = [SiteClient(sites[d], cfg) for d in ("sketch", "photo", "art")]  # any order
    dep = finetune_phase(run_sites(clients, cfg, RunRecorder(cfg, None)), clients).finish()
    fed = federate(tmp_path / "merged", FederateConfig(**opts, heldout=["sketch"]))
    _same_finetuned(dep, fed)
    assert any("--finetune-steps fine-tunes on view 0 only" in n for n in dep["notes"]) and dep["train_views"] == 2
    assert set(dep["experiments"][0]["best"]["test_finetuned"]) == {"art", "photo"}


@pytest.mark.slow
def test_local_deployment_with_finetune_steps_equals_federate(tmp_path):
    """A real `deploy` (SuperLink, one process per site, the ServerApp) with --finetune-steps 3: its run folder's
    fine-tuned accuracies and selected round equal `federate`'s on one cache holding every site's rows."""
    from fedclip_cache.launch import deploy as dep
    from fedclip_cache.cache.reader import open_cache
    from fedclip_cache.launch.simulate import write_domain_cache

    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    merged = write_synthetic_cache(tmp_path / "merged", DOMAINS, 3, **HARD)
    fc = open_cache(merged)
    sites = [str(write_domain_cache(fc, d, tmp_path / f"site-{d}")) for d in sorted(DOMAINS)]
    opts = {**OPTS, "rounds": 3, "finetune_steps": 3}
    cfg = FederateConfig(**opts, heldout=["a"]).validate()
    res = dep.deploy(sites, tmp_path / "run", cfg, timeout=240)
    assert res["status"] == "finished:completed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res["summary"] == summary
    assert "[FINETUNE] 3 replies" in (tmp_path / "run" / "logs" / "serverapp.log").read_text()
    fed = federate(merged, FederateConfig(**opts, heldout=["a"]))
    _same_finetuned(summary, fed)
    best = summary["experiments"][0]["best"]
    assert set(best["test_finetuned"]) == {"b", "c"}
    assert summary["deployment"]["finetune"] == {"results": 2, "failures": []}
    assert best["round"] < 3 and best["test_finetuned"] != best["test"]  # the checks bite (see above)
