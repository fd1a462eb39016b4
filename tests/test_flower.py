"""The Flower apps share the pure functions of the in-process loop: one Flower round == one loop round."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

from fedclip_cache.federated.config import ConfigError, FederateConfig  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.federated.algorithms import make_algorithm  # noqa: E402
from fedclip_cache.flower import AlgorithmStrategy, FedCLIPClient, _federate_config, initial_parameters  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402


# Two rounds for uniform weighting; one for sample weighting, where Flower's integer-weighted float32 sum rounds
# differently from ours and Adam's normalised step magnifies last-bit differences in near-zero gradients.
@pytest.mark.parametrize("weighting,rounds,algo", [("uniform", 2, "fedclip"), ("samples", 1, "fedclip"),
                                                   ("uniform", 2, "fedprox"), ("uniform", 3, "fedadam"),
                                                   ("samples", 2, "fedyogi")])
def test_flower_round_equals_in_process_round(tmp_path, weighting, rounds, algo):
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 70, "b": 50, "c": 40}, 3, dim=16, seed=4))
    extra = {"fedprox": {"algo": algo, "mu": 0.5}, "fedclip": {}}.get(algo, {"algo": algo})
    run_config = {"cache": cache, "heldout": "a", "rounds": rounds, "lr": 1e-3, "hidden": 8, "weighting": weighting,
                  **extra}
    _, cfg = _federate_config(run_config)
    params = initial_parameters(cache, cfg)
    # the ServerApp's strategy: Flower's FedAvg, then the algorithm's server update
    strategy = AlgorithmStrategy(make_algorithm(cfg), ["w1", "b1", "w2", "b2"],
                                 initial_parameters=ndarrays_to_parameters(params))
    for rnd in range(1, rounds + 1):
        results = []
        for pid in range(2):
            client = FedCLIPClient(cache, cfg, pid)
            new, n, _ = client.fit(params, {"server_round": rnd})
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(new), n, {})
            results.append((None, res))
        agg, _ = strategy.aggregate_fit(rnd, results, [])
        params = parameters_to_ndarrays(agg)
    federate(cache, FederateConfig(rounds=rounds, lr=1e-3, hidden=8, heldout=["a"], weighting=weighting, **extra),
             out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in zip(["w1", "b1", "w2", "b2"], params):
        np.testing.assert_allclose(p, final[name][0].numpy(), rtol=1e-5, atol=1e-7)
    loss, n, metrics = FedCLIPClient(cache, cfg, 0).evaluate(params, {})
    assert n > 0 and 0 <= metrics["accuracy"] <= 1 and np.isfinite(loss)


def test_flower_config_errors(tmp_path):
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 30}, 2, dim=8))
    with pytest.raises(ConfigError, match="text only"):
        _federate_config({"cache": cache, "head": "prototype"})
    with pytest.raises(ConfigError, match="nothing to federate"):
        _federate_config({"cache": cache, "algo": "local"})
    with pytest.raises(ConfigError, match="partition-id 5"):
        FedCLIPClient(cache, _federate_config({"cache": cache, "heldout": "a"})[1], 5)


class _NoClients:
    """Enough of a ClientManager for configure_fit to run without a SuperLink."""

    def num_available(self):
        return 3

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return []


def test_sites_with_their_own_caches_train_as_the_in_process_loop(tmp_path, model_args, monkeypatch, capsys):
    """Each site extracts only its own images (same model, same --classes file); the server holds no cache and gets
    the initial adapter from a site; the held-out site only evaluates. Two rounds equal `federate` on one cache of
    all sites' images, and the sites' evaluation equals its last-round accuracies."""
    import shutil

    from fedclip_cache.synthetic import write_image_folder
    from test_cache_integrity import cli

    root = write_image_folder(tmp_path / "all", per_class=6)
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nfish\n")

    def extract(src, out):
        code, o, e = cli(monkeypatch, capsys, "extract", src, out, *model_args, "--workers", "0", "-q",
                         "--classes", names)
        assert code == 0, o + e

    extract(root, tmp_path / "merged")
    sites = {}
    for d in ("art", "photo", "sketch"):
        shutil.copytree(root / d, tmp_path / f"site-{d}" / d)
        extract(tmp_path / f"site-{d}", tmp_path / f"cache-{d}")
        sites[d] = str(tmp_path / f"cache-{d}")
    run_config = {"heldout": "sketch", "rounds": 2, "lr": 1e-3, "hidden": 8, "batch_size": 4, "sites": 3}
    _, cfg = _federate_config(run_config)
    clients = {d: FedCLIPClient.for_site(p, cfg) for d, p in sites.items()}
    assert clients["sketch"].heldout_site and not clients["art"].heldout_site
    from flwr.common import EvaluateRes

    from fedclip_cache.federated.recorder import RunRecorder

    strategy = AlgorithmStrategy(make_algorithm(cfg), ["w1", "b1", "w2", "b2"], RunRecorder(cfg, tmp_path / "dep"))
    params = ndarrays_to_parameters(clients["photo"].get_parameters({}))
    strategy.configure_fit(1, params, _NoClients())
    for rnd in (1, 2):  # what the ServerApp does each round: fit, then federated evaluation
        results = []
        for d, c in clients.items():
            new, n, fm = c.fit(parameters_to_ndarrays(params), {"server_round": rnd})
            assert n == (0 if d == "sketch" else 1)
            results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(new), n, fm)))
        params, _ = strategy.aggregate_fit(rnd, results, [])
        evals = []
        for d in ("sketch", "photo", "art"):  # any order
            loss, n, m = clients[d].evaluate(parameters_to_ndarrays(params), {})
            evals.append((None, EvaluateRes(Status(Code.OK, ""), loss, n, m)))
        strategy.aggregate_evaluate(rnd, evals, [])
    s = federate(tmp_path / "merged", FederateConfig(rounds=2, lr=1e-3, hidden=8, batch_size=4, heldout=["sketch"],
                                                     curves=True), out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in zip(["w1", "b1", "w2", "b2"], parameters_to_ndarrays(params)):
        np.testing.assert_allclose(p, final[name][0].numpy(), rtol=1e-5, atol=1e-6)
    # the deployment's run folder: the same selection and accuracies as federate's
    dep = json.loads((tmp_path / "dep" / "summary.json").read_text())
    assert dep == strategy.summary
    for which in ("best", "last"):
        a, b = dep["experiments"][0][which], s["experiments"][0][which]
        assert a["round"] == b["round"] and a["test"] == pytest.approx(b["test"], abs=1e-12)
        assert a["heldout"] == pytest.approx(b["heldout"], abs=1e-12)
        assert a["val_mean"] == pytest.approx(b["val_mean"], abs=1e-12)
    assert dep["mean"] == pytest.approx(s["mean"], abs=1e-12)
    assert dep["experiments"][0]["clients"] == s["experiments"][0]["clients"]
    assert dep["communication"] == s["communication"]
    assert [(r["fit_results"], r["fit_failures"]) for r in dep["deployment"]["rounds"]] == [(2, 0), (2, 0)]
    assert set(dep["cache"]["sites"]) == {"art", "photo", "sketch"}
    m_dep = pq.read_table(tmp_path / "dep" / "metrics.parquet").to_pandas()
    m_run = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pandas()
    assert list(m_dep[["round", "client", "split", "n"]].itertuples(index=False)) == \
        list(m_run[["round", "client", "split", "n"]].itertuples(index=False))
    np.testing.assert_allclose(m_dep["accuracy"], m_run["accuracy"], atol=1e-12)
    np.testing.assert_allclose(m_dep["loss"], m_run["loss"], rtol=1e-5)
    assert torch.load(tmp_path / "dep" / "adapter.pt")["w1"].shape == final["w1"].shape
    from typer.testing import CliRunner

    from fedclip_cache.cli import app

    rep = CliRunner().invoke(app, ["report", str(tmp_path / "dep")], env={"COLUMNS": "200"})
    assert rep.exit_code == 0 and "heldout=sketch/seed0" in rep.output, rep.output
    assert (tmp_path / "dep" / "plots" / "accuracy_vs_round.png").is_file()


def test_site_cache_with_several_domains_is_refused(tmp_path):
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 30}, 2, dim=8))
    _, cfg = _federate_config({"heldout": "a", "sites": 2})
    with pytest.raises(ConfigError, match="a site cache holds one domain"):
        FedCLIPClient.for_site(cache, cfg)


def test_a_lost_client_is_averaged_out_and_too_few_results_keep_the_model(tmp_path):
    """Fault tolerance of the ServerApp's strategy: a round with a failed client averages the others (uniform: each
    remaining client 1/k) and records the failure; below min_results the global adapter stays as it was."""
    from fedclip_cache.federated.recorder import RunRecorder

    cfg = FederateConfig(rounds=3, hidden=2)
    init = [np.zeros((4, 2), np.float32), np.zeros(2, np.float32), np.zeros((2, 4), np.float32),
            np.zeros(4, np.float32)]
    rec = RunRecorder(cfg, None)
    strategy = AlgorithmStrategy(make_algorithm(cfg), ["w1", "b1", "w2", "b2"], rec, min_results=2,
                                 initial_parameters=ndarrays_to_parameters(init))

    def result(value):
        arrays = [np.full_like(a, value) for a in init]
        return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {"heldout": False}))

    params, _ = strategy.aggregate_fit(1, [result(1.0), result(3.0)], [RuntimeError("node 3 died")])
    assert parameters_to_ndarrays(params)[0][0, 0] == 2.0  # the mean of the two that answered
    params, _ = strategy.aggregate_fit(2, [result(7.0)], [RuntimeError("x"), RuntimeError("y")])
    assert parameters_to_ndarrays(params)[0][0, 0] == 2.0  # one result < min_results=2: unchanged
    assert rec.health == [{"round": 1, "fit_results": 2, "fit_failures": 1},
                          {"round": 2, "fit_results": 1, "fit_failures": 2}]


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
