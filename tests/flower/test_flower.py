"""The Flower apps share the pure functions of the in-process loop: a deployment's rounds equal `federate`'s.

The ServerApp's logic (flower.server_app.Coordinator) is driven here by in-process sites, every message going
through the wire format (flower.wire.content / flower.wire.read) as it would through Flower."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

flwr = pytest.importorskip("flwr")

from fedclip_cache.federated.config import ConfigError, FederateConfig  # noqa: E402
from fedclip_cache.federated.recorder import RunRecorder  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.flower.client_app import SiteClient  # noqa: E402
from fedclip_cache.flower.task import federate_config  # noqa: E402
from fedclip_cache.flower.server_app import Coordinator  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402


# Every variant equals `federate` exactly (the same pure functions, the same order of summation).
@pytest.mark.parametrize("extra", [{"rounds": 2}, {"rounds": 1, "weighting": "samples"},
                                   {"rounds": 2, "algo": "fedprox", "mu": 0.5}, {"rounds": 3, "algo": "fedadam"},
                                   {"rounds": 2, "algo": "fedyogi", "weighting": "samples"},
                                   {"rounds": 4, "fraction_fit": 0.5}, {"rounds": 2, "head": "prototype"},
                                   {"rounds": 4, "eval_every": 2}])
def test_deployment_rounds_equal_in_process_rounds(tmp_path, extra, run_sites):
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 70, "b": 50, "c": 40}, 3, dim=16, seed=4))
    _, cfg = federate_config({"cache": cache, "heldout": "a", "lr": 1e-3, "hidden": 8, **extra})
    co = run_sites([SiteClient(cache, cfg, pid) for pid in range(2)], cfg, RunRecorder(cfg, None))
    federate(cache, FederateConfig(lr=1e-3, hidden=8, heldout=["a"], **extra), out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in co.current.items():
        np.testing.assert_allclose(p.numpy(), final[name].numpy(), rtol=1e-5, atol=1e-7)
    # the loop's sampling rule: max(int(2 * 0.5), 1) = 1 of the two sites trains each round
    fits = [h["fit_results"] for h in co.recorder.health if "fit_results" in h]
    assert fits == [1 if extra.get("fraction_fit") else 2] * extra["rounds"]
    assert co.recorder.rounds == [r for r in range(1, extra["rounds"] + 1)  # --eval-every: the rounds evaluated
                                  if r % extra.get("eval_every", 1) == 0 or r == extra["rounds"]]


def test_flower_config_errors(tmp_path):
    """Options the Flower apps cannot honour are refused in one line, naming the option and what to do."""
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 30}, 2, dim=8))
    cases = [({"algo": "local"}, "nothing to federate"), ({"algo": "scaffold"}, "keep state"),
             ({"algo": "promptlocal", "heldout": "a"}, "each site keeps its own context"),
             ({"device": "cuda"}, "--device cuda: not supported"),
             ({"partition": "iid", "sites": 2}, "--partition iid: per-site caches"),
             ({"split_source": "cache", "sites": 2}, "--split-source cache: per-site caches"),
             ({"split": "0.5,x,0.2"}, "--split")]
    for rc, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            federate_config(rc)
        assert "\n" not in str(e.value)
    assert federate_config({"split": "0.5,0.3,0.2"})[1].split == (0.5, 0.3, 0.2)
    with pytest.raises(ConfigError, match="partition-id 5"):
        SiteClient(cache, federate_config({"cache": cache, "heldout": "a"})[1], 5)


@pytest.mark.parametrize("head,curves,views", [("text", True, 1), ("prototype", False, 2)])
def test_sites_with_their_own_caches_train_as_the_in_process_loop(tmp_path, model_args, monkeypatch, capsys, head,
                                                                  curves, views, run_sites, extract_sites,
                                                                  same_scores, same_metrics):
    """Each site extracts only its own images (same model, same --classes file); the server holds no cache and
    seeds the initial adapter itself; the held-out site only evaluates. The run folder equals `federate`'s on one
    cache of all sites' images: text or prototype head (class sums and counts from the sites), full curves or the
    lazy default, one view or --train-views 2."""
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys, *(("--views", str(views)) if views > 1 else ()))
    opts = {"rounds": 2, "lr": 1e-3, "hidden": 8, "batch_size": 4, "head": head, "curves": curves,
            "train_views": str(views)}
    _, cfg = federate_config({**opts, "heldout": "sketch", "sites": 3})
    clients = {d: SiteClient(p, cfg) for d, p in sites.items()}
    assert clients["sketch"].heldout_site and not clients["art"].heldout_site
    rec = RunRecorder(cfg, tmp_path / "dep")
    co = run_sites([clients[d] for d in ("sketch", "photo", "art")], cfg, rec)  # any order
    dep = co.finish()
    s = federate(tmp_path / "merged", FederateConfig(**opts, heldout=["sketch"]), out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in co.current.items():
        np.testing.assert_allclose(p.numpy(), final[name].numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "dep" / "summary.json").read_text()) == dep
    same_scores(dep["experiments"][0], s["experiments"][0])
    assert dep["mean"] == pytest.approx(s["mean"], abs=1e-12)
    assert dep["experiments"][0]["clients"] == s["experiments"][0]["clients"]
    assert dep["communication"] == s["communication"]
    assert [(r["fit_results"], r["fit_failures"]) for r in dep["deployment"]["rounds"]] == [(2, 0), (2, 0)]
    assert set(dep["cache"]["sites"]) == {"art", "photo", "sketch"}
    same_metrics(tmp_path / "dep", tmp_path / "run", loss_rtol=1e-5)
    from typer.testing import CliRunner

    from fedclip_cache.cli import app

    rep = CliRunner().invoke(app, ["report", str(tmp_path / "dep")], env={"COLUMNS": "200"})
    assert rep.exit_code == 0 and "heldout=sketch/seed0" in rep.output, rep.output
    assert (tmp_path / "dep" / "plots" / "accuracy_vs_round.png").is_file()
    # the ServerApp marks its run folder complete, as `federate` does, listing what it wrote
    state = json.loads((tmp_path / "dep" / "state.json").read_text())
    assert state["kind"] == "deploy" and state["state"] == "complete"
    assert set(state["files"]) == {"config.json", "metrics.parquet", "adapter.pt", "summary.json"}


def test_site_cache_with_several_domains_is_refused(tmp_path):
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 30}, 2, dim=8))
    _, cfg = federate_config({"heldout": "a", "sites": 2})
    with pytest.raises(ConfigError, match="a site cache holds one domain"):
        SiteClient(cache, cfg)


def test_a_lost_site_is_averaged_out_and_too_few_results_keep_the_model(tmp_path):
    """Fault tolerance of the ServerApp: a round in which a sampled site does not answer averages the others
    (uniform: each remaining site 1/k) and records the failure; below min_results the global adapter (and the
    server optimiser's state) stays as it was; a site that answers again trains again."""
    cfg = FederateConfig(rounds=3, hidden=2, heldout=["c"])
    co = Coordinator(cfg, RunRecorder(cfg, None), min_results=2)
    facts = {"dim": 4, "heldout": False}
    co.setup([({**facts, "client": "a", "train_n": 5}, {}), ({**facts, "client": "b", "train_n": 5}, {}),
              ({**facts, "client": "c", "train_n": 0, "heldout": True}, {})])
    assert co.training_sites() == ["a", "b"]

    def trained(site, value):
        return ({"client": site, "trained": True, "weight": 1.0},
                {n: torch.full_like(v[0], value) for n, v in co.current.items()})

    co.message(1)
    co.receive(1, [trained("a", 1.0), trained("b", 3.0)])
    assert float(co.current["w1"][0, 0, 0]) == 2.0  # the mean of the two
    co.message(2)
    co.receive(2, [trained("a", 7.0)])  # b lost: one result < min_results=2: unchanged
    assert float(co.current["w1"][0, 0, 0]) == 2.0
    co.min_results = 1
    co.message(3)
    co.receive(3, [trained("b", 5.0)])  # b back, a lost: b alone
    assert float(co.current["w1"][0, 0, 0]) == 5.0
    assert [(h["fit_results"], h["fit_failures"]) for h in co.recorder.health] == [(2, 0), (1, 1), (1, 1)]


def test_a_site_missing_from_some_rounds_is_left_out_not_imputed(tmp_path):
    """The run folder of a deployment in which a site stopped reporting: its earlier rounds are kept, the rounds
    it missed hold no number for it, selection and means use the sites that reported."""
    from fedclip_cache.federated.recorder import RunRecorder

    cfg = FederateConfig(rounds=3, heldout=["c"])

    def report(site, val, test, held=False):
        facts = {"client": site, "heldout": held, "dim": 4, "num_classes": 2, "model_params": 0, "cache": site,
                 "images": 10, "complete": True, "identity": "{}", "logit_scale": 100.0,
                 "logit_scale_source": "cache"}
        if held:
            return {**facts, "heldout_accuracy": test, "heldout_loss": 1.0, "n": 10}
        return {**facts, "val_accuracy": val, "val_loss": 1.0, "val_n": 2, "test_accuracy": test, "test_loss": 1.0,
                "test_n": 2, "train_n": 6, "dropped": 0}

    rec = RunRecorder(cfg, tmp_path / "run")
    rec.evaluate_round(1, [report("a", 0.5, 0.5), report("b", 0.5, 0.0), report("c", 0, 0.1, True)], 0)
    rec.evaluate_round(2, [report("a", 1.0, 1.0), report("c", 0, 0.2, True)], 1)  # b lost
    rec.evaluate_round(3, [report("a", 0.5, 0.5), report("c", 0, 0.3, True)], 1)
    s = rec.write({"w": torch.zeros(1, 2)}, 2)
    e = s["experiments"][0]
    assert set(e["clients"]) == {"a", "b"}
    assert e["best"]["round"] == 2 and e["best"]["val_mean"] == 1.0  # over the sites that reported
    assert e["best"]["test"] == {"a": 1.0} and e["best"]["test_mean"] == 1.0 and e["best"]["heldout"] == 0.2
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == s  # valid JSON: no NaN
    m = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pandas()
    assert len(m[(m["client"] == "b")]) == 2  # round 1 val and test only
    assert [h["evaluate_failures"] for h in s["deployment"]["rounds"]] == [0, 1, 1]


def test_ten_or_more_partition_clients_keep_the_loops_order(tmp_path, run_sites):
    """A shared cache cut into 11 equal IID clients per domain (names b#0..b#10): the server ordered the training
    sites by name as text (b#10 before b#2), the loop by client index, so with equal training sizes a sampled round
    trained other clients than `federate` does."""
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 40, "b": 220, "c": 220}, 3, dim=16, seed=4))
    extra = {"rounds": 3, "fraction_fit": 0.3, "partition": "iid", "num_clients": 11}
    _, cfg = federate_config({"cache": cache, "heldout": "a", "lr": 1e-3, "hidden": 8, **extra})
    sites = [SiteClient(cache, cfg, pid) for pid in range(22)]
    assert sorted({len(s.client.train) for s in sites}) == [len(sites[0].client.train)]  # all tied: order decides
    co = run_sites(sites, cfg, RunRecorder(cfg, None))
    federate(cache, FederateConfig(lr=1e-3, hidden=8, heldout=["a"], **extra), out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in co.current.items():
        np.testing.assert_allclose(p.numpy(), final[name].numpy(), rtol=1e-5, atol=1e-7)
