"""Algorithms as units: the registry, options declared once, behaviour unchanged by the refactor, lazy evaluation,
partial participation and personalised fine-tuning -- each checked against an independent computation."""
import dataclasses
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from fedclip_cache import FederateConfig, federate, list_adapters, list_algorithms, open_cache
from fedclip_cache.cli import FEDERATE_OPTIONS, app
from fedclip_cache.federated import loop
from fedclip_cache.federated.adapters import get_adapter, init_params
from fedclip_cache.federated.algorithms import ALGORITHMS, Algorithm, register_algorithm
from fedclip_cache.federated.config import FIELDS, option_flag, parse_text
from fedclip_cache.federated.protocols import build_experiments
from fedclip_cache.federated.train import (LocalHyper, aggregate, batch_schedule, client_weights, lane_key,
                                           reference_local_update)
from fedclip_cache.synthetic import write_synthetic_cache

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402


def _pairs(old, new, path=""):
    if isinstance(old, dict):
        assert set(old) <= set(new), (path, sorted(set(old) - set(new)))
        for k in old:
            yield from _pairs(old[k], new[k], f"{path}/{k}")
    else:
        yield path, old, new


def test_every_existing_algorithm_gives_the_pre_registry_numbers(tmp_path, monkeypatch):
    """tests/golden/summaries.json was written by make_golden.py from the commit before the registry; the same
    configurations (fedclip, fedprox, local, central, zeroshot; text/prototype heads, contrastive/ce, three adapters,
    LODO/personal, partitions, eval_every) must give the same selected rounds, accuracies, losses and adapters."""
    golden = json.loads((GOLDEN / "summaries.json").read_text())
    out = tmp_path / "now.json"
    monkeypatch.chdir(tmp_path)
    make_golden.main(str(out))
    now = json.loads(out.read_text())
    assert set(now["summaries"]) == set(golden["summaries"]) == set(make_golden.CASES)
    for name in golden["summaries"]:
        for path, old, new in _pairs(golden["summaries"][name], now["summaries"][name]):
            if isinstance(old, float):
                assert new == pytest.approx(old, rel=1e-6, abs=1e-9), (name, path)
            else:
                assert new == old, (name, path)


# ------------------------------------------------------------------------------------------------ registry

def test_registry_lists_and_a_new_algorithm_is_one_class(tmp_path):
    assert list_algorithms()[0] == "fedclip"
    assert {"fedclip", "fedprox", "local", "central", "zeroshot", "scaffold"} <= set(list_algorithms())
    assert list_adapters() == ["fedclip", "residual", "linear"]
    cache = write_synthetic_cache(tmp_path / "c", {"a": 60, "b": 50, "c": 40}, 3, dim=16, seed=1)

    @register_algorithm
    class HalfStep(Algorithm):  # a server that moves halfway towards the clients' average
        name = "test-halfstep"
        summary = "test only"

        def server_update(self, current, averaged, extra, rnd):
            return {n: current[n] + 0.5 * (averaged[n] - current[n]) for n in current}, extra

    try:
        assert "test-halfstep" in list_algorithms()
        cfg = dict(rounds=2, lr=1e-3, hidden=8, heldout=["a"], batch_size=8)
        federate(cache, FederateConfig(algo="test-halfstep", **cfg), out=tmp_path / "half")
        federate(cache, FederateConfig(algo="fedclip", rounds=1, lr=1e-3, hidden=8, heldout=["a"], batch_size=8),
                 out=tmp_path / "fedavg1")
        half = torch.load(tmp_path / "half" / "adapter.pt")
        # reference: round 1 of FedAvg gives avg1; the half-step server keeps init + (avg1 - init) / 2
        init = init_params("fedclip", 16, 8, 0)
        avg1 = torch.load(tmp_path / "fedavg1" / "adapter.pt")
        one = {n: init[n] + 0.5 * (avg1[n][0] - init[n]) for n in init}
        assert not torch.allclose(one["w1"], half["w1"][0])  # round 2 moved it again
        assert json.loads((tmp_path / "half" / "summary.json").read_text())["algo"] == "test-halfstep"
    finally:
        del ALGORITHMS["test-halfstep"]


def test_algorithms_command_lists_the_registry():
    res = CliRunner().invoke(app, ["algorithms", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == list_algorithms()
    assert next(r for r in rows if r["name"] == "fedprox")["options"] == ["--mu"]
    assert all(r["summary"] for r in rows)


# ------------------------------------------------------------------------------------------------ one source

def test_every_option_is_declared_once_and_reaches_cli_grid_and_pipeline():
    fields = dataclasses.fields(FederateConfig)
    by_name = {n: (t, opt) for n, t, opt in FEDERATE_OPTIONS}
    assert set(by_name) == {f.name for f in fields}
    for f in fields:
        _, opt = by_name[f.name]
        assert f.metadata["help"] or f.name == "algo", f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "split":
            assert parse_text("split", opt.default, "") == default
        elif f.name == "heldout":
            assert opt.default is None and default == []
        else:
            assert opt.default == default, f.name  # the CLI default IS the dataclass default
    # the help of federate shows every flag; --algo's help lists the registry
    res = CliRunner().invoke(app, ["federate", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    for f in fields:
        assert option_flag(f.name) in res.output, f.name
    for a in list_algorithms():
        assert a in res.output
    # the grid accepts every field but the seed and where the numbers are sent (--log, --mlflow-uri)
    from fedclip_cache.federated.tracking import TRACKING_FIELDS
    from fedclip_cache.sweep import grid_field

    for name in FIELDS:
        if name != "seed" and name not in TRACKING_FIELDS:
            assert grid_field(name) == name
    assert grid_field("clients") == "num_clients" and grid_field("epochs") == "local_epochs"
    # pipelines accept every field in [federate]
    from fedclip_cache.pipeline import SECTIONS

    assert SECTIONS["federate"] == set(FIELDS)
    # LocalHyper's defaults are FederateConfig's
    d, hp = FederateConfig(), LocalHyper()
    assert (hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.batch_size, hp.epochs, hp.loss) == \
        (d.lr, d.beta1, d.beta2, d.eps, d.weight_decay, d.batch_size, d.local_epochs, d.loss)


def test_extract_defaults_come_from_the_dataclasses():
    from fedclip_cache.cli import extract
    from fedclip_cache.pipeline import EXTRACT_KEYS
    from fedclip_cache.cache.config import ExtractConfig, ModelSpec

    ex, ms = ExtractConfig("", ""), ModelSpec()
    params = inspect.signature(extract).parameters
    for name in ("format", "device", "precision", "dtype", "batch_size", "workers", "shard_size", "strict",
                 "exif_transpose", "verify"):
        assert params[name].default.default == getattr(ex, name), name
    for name in ("model", "pretrained", "seed"):
        assert params[name].default.default == getattr(ms, name), name
    assert {"quick_gelu", "exif_transpose", "verify", "model", "batch_size"} <= EXTRACT_KEYS
    assert not {"source", "out", "progress"} & EXTRACT_KEYS


def test_public_api():
    import fedclip_cache

    for name in ("extract", "open_cache", "federate", "FederateConfig", "sweep", "list_algorithms",
                 "list_adapters", "FedclipCacheError", "ConfigError"):
        assert name in fedclip_cache.__all__
        assert callable(getattr(fedclip_cache, name))
    assert issubclass(fedclip_cache.ConfigError, fedclip_cache.FedclipCacheError)


def test_options_an_algorithm_does_not_read_are_reported(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 40, "b": 40}, 2, dim=8)
    s = federate(cache, FederateConfig(rounds=1, heldout=["a"], mu=0.5, batch_size=8))
    assert any("fedclip does not use --mu" in n for n in s["notes"])
    s = federate(cache, FederateConfig(algo="fedprox", rounds=1, heldout=["a"], mu=0.5, batch_size=8))
    assert not any("does not use" in n for n in s["notes"])


# ------------------------------------------------------------------------------------------------ lazy evaluation

@pytest.mark.parametrize("algo", ["fedclip", "local"])
def test_lazy_evaluation_gives_the_same_selected_and_last_numbers(tmp_path, algo):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 90, "b": 70, "c": 60}, 4, dim=16, seed=2, class_sep=0.6,
                                  domain_shift=1.5)
    base = dict(algo=algo, rounds=12, lr=3e-3, batch_size=8, hidden=8)
    lazy = federate(cache, FederateConfig(**base), out=tmp_path / "lazy", seeds=[0, 1])
    full = federate(cache, FederateConfig(**base, curves=True), out=tmp_path / "full", seeds=[0, 1])
    for a, b in zip(lazy["experiments"], full["experiments"]):
        assert a["best"] == b["best"] and a["last"] == b["last"]
    assert lazy["mean"] == full["mean"]
    m_lazy = pq.read_table(tmp_path / "lazy" / "metrics.parquet").to_pandas()
    m_full = pq.read_table(tmp_path / "full" / "metrics.parquet").to_pandas()
    # validation every round in both; test/held-out every round only with --curves
    assert (m_lazy["split"] == "val").sum() == (m_full["split"] == "val").sum()
    n_test = lambda m: (m["split"] != "val").sum()  # noqa: E731
    assert n_test(m_lazy) < n_test(m_full)
    assert sorted(m_full["round"].unique()) == list(range(1, 13))
    # every row lazy evaluation did score equals the full evaluation's row
    key = ["round", "experiment", "client", "split"]
    merged = m_lazy.merge(m_full, on=key, suffixes=("_l", "_f"))
    assert len(merged) == len(m_lazy)
    np.testing.assert_array_equal(merged["accuracy_l"], merged["accuracy_f"])
    np.testing.assert_allclose(merged["loss_l"], merged["loss_f"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ participation

def _reference_fedavg(cache, cfg, exp, rounds):
    """A plain FedAvg loop: per round, sample clients as Flower's rule says (max(int(n f), min_fit)) with the
    documented seeding, train each sampled client alone with torch.optim.Adam, average them (uniform)."""
    d = cache.dim
    kind = get_adapter(cfg.adapter)
    g = init_params(cfg.adapter, d, cfg.hidden, exp.seed)
    X, Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
    head = loop.text_head(cache, "0")
    hp = LocalHyper(lr=cfg.lr, batch_size=cfg.batch_size, logit_scale=100.0)
    n = len(exp.clients)
    k = min(n, max(int(n * cfg.fraction_fit), cfg.min_fit_clients))
    import zlib
    for r in range(1, rounds + 1):
        rng = np.random.default_rng([exp.seed, r, zlib.crc32(exp.name.encode())])
        # the loop's lanes are ordered by training-set size (largest first, stable): sample in that order
        order = sorted(range(n), key=lambda i: -len(exp.clients[i].train))
        picked = [order[i] for i in rng.choice(n, k, replace=False)]
        outs = []
        for ci in picked:
            cl = exp.clients[ci]
            sched = batch_schedule(cl.train, exp.seed, r, lane_key(exp.name, cl.name), hp)
            outs.append(reference_local_update(kind, g, X, Y, head, sched, hp))
        stacked = {nm: torch.stack([o[nm] for o in outs]) for nm in g}
        g = {nm: v[0] for nm, v in aggregate(stacked, [np.arange(len(outs))],
                                             [client_weights(np.ones(len(outs)), "uniform")]).items()}
    return g, k


@pytest.mark.parametrize("fraction,min_fit", [(0.3, 1), (0.1, 3)])
def test_partial_participation_trains_only_the_sampled_clients(tmp_path, fraction, min_fit):
    cache = write_synthetic_cache(tmp_path / "c", {"only": 400}, 5, dim=16, seed=5, class_sep=0.6)
    cfg = FederateConfig(rounds=3, lr=1e-3, batch_size=8, hidden=8, protocol="personal", partition="dirichlet",
                         alpha=0.3, num_clients=10, fraction_fit=fraction, min_fit_clients=min_fit)
    fc = open_cache(cache)
    exp = build_experiments(fc, cfg)[0]
    res = loop.run_loop(fc, cfg, [exp])
    want, k = _reference_fedavg(fc, cfg, exp, 3)
    assert res.fit_clients == [k] * 3 and k == max(int(10 * fraction), min_fit)
    for nm, v in want.items():
        torch.testing.assert_close(res.final_params[nm][0], v, rtol=1e-5, atol=1e-6)
    s = federate(fc, cfg)
    assert s["communication"]["clients_per_round"] == k
    assert s["communication"]["bytes_up_per_round"] == k * s["communication"]["bytes_per_adapter"]


def test_peer_label_shift_protocol_is_one_command(tmp_path):
    """The FedOTP/FedPGP CIFAR-100 setting, scaled down: Dirichlet(0.3) over one pooled dataset, many clients,
    10 % participation; personalisation accuracy = the mean over the clients' test splits."""
    cache = write_synthetic_cache(tmp_path / "c", {"cifar": 1500}, 10, dim=16, seed=6, class_sep=0.8)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["federate", str(cache), "--protocol", "personal", "--partition", "dirichlet",
                                   "--alpha", "0.3", "--clients", "30", "--partition-scope", "pooled",
                                   "--fraction-fit", "0.1", "--rounds", "5", "--batch-size", "16", "--lr", "1e-3",
                                   "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    e = s["experiments"][0]
    assert len(e["clients"]) == 30 and s["communication"]["clients_per_round"] == 3
    tests = [v for v in e["best"]["test"].values()]
    assert e["best"]["test_mean"] == pytest.approx(np.mean(tests))


# ------------------------------------------------------------------------------------------------ personalisation

def test_finetune_steps_start_from_the_selected_model_and_score_each_client(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 120, "b": 90, "c": 80}, 4, dim=16, seed=3, class_sep=0.6,
                                  domain_shift=1.5)
    fc = open_cache(cache)
    base = dict(rounds=6, lr=3e-3, batch_size=8, hidden=8, protocol="personal")
    s = federate(fc, FederateConfig(**base, finetune_steps=5))
    e = s["experiments"][0]
    best = e["best"]["round"]
    assert set(e["best"]["test_finetuned"]) == set(e["clients"])
    assert e["best"]["test_mean_finetuned"] == pytest.approx(np.mean(list(e["best"]["test_finetuned"].values())))
    assert s["mean"]["test_mean_finetuned"] == e["best"]["test_mean_finetuned"]
    # reference: the global model after `best` rounds (the same trajectory), fine-tuned per client with
    # torch.optim.Adam on the documented batches, scored on the client's test split
    federate(fc, FederateConfig(**{**base, "rounds": best}), out=tmp_path / "upto")
    g = {n: v[0] for n, v in torch.load(tmp_path / "upto" / "adapter.pt").items()}
    cfg = FederateConfig(**base)
    exp = build_experiments(fc, cfg)[0]
    kind = get_adapter("fedclip")
    X, Y = torch.from_numpy(fc.features), torch.from_numpy(fc.labels)
    head = loop.text_head(fc, "0")
    hp = LocalHyper(lr=3e-3, batch_size=8, logit_scale=100.0)
    for cl in exp.clients:
        sched = loop.finetune_schedule(cl.train, exp.seed, lane_key(exp.name, cl.name), 5, hp)
        assert len(sched) == 5
        p = reference_local_update(kind, g, X, Y, head, sched, hp)
        x = X[torch.from_numpy(cl.test)]
        a = kind.forward({n: v.unsqueeze(0) for n, v in p.items()}, x.unsqueeze(0), {})[0]
        pred = (a / a.norm(dim=-1, keepdim=True) @ head.T).argmax(-1)
        acc = (pred == Y[torch.from_numpy(cl.test)]).float().mean().item()
        assert e["best"]["test_finetuned"][cl.name] == pytest.approx(acc, abs=1e-6), cl.name
    # fine-tuning is reported beside, never instead of, the global-model numbers
    plain = federate(fc, FederateConfig(**base))
    assert plain["experiments"][0]["best"]["test"] == e["best"]["test"]


def test_label_shift_pipeline_runs_every_algorithm_of_its_grid(tmp_path):
    """pipelines/cifar100-label-shift.toml on a small stand-in cache (the pipeline re-uses an existing cache)."""
    repo = Path(__file__).resolve().parents[2]
    write_synthetic_cache(tmp_path / "caches" / "cifar100-vitb32-openai", {"cifar100": 400}, 5, dim=16, seed=8)
    res = CliRunner().invoke(app, ["run", str(repo / "pipelines" / "cifar100-label-shift.toml"), "--base-dir",
                                   str(tmp_path), "--set", "federate.rounds=2", "--set", "federate.num_clients=8",
                                   "--set", "sweep.seeds=[0]", "--set", "federate.finetune_steps=2"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "cifar100-label-shift"
    s = json.loads((out / "federate" / "summary.json").read_text())
    assert s["communication"]["clients_per_round"] == 1  # max(int(8 * 0.1), 1)
    assert s["mean"]["test_mean_finetuned"] is not None
    table = pq.read_table(out / "sweep" / "results.parquet").to_pandas()
    assert set(table["algo"]) == {"fedclip", "fedprox", "fedavgm", "fedadam", "scaffold", "local"}
