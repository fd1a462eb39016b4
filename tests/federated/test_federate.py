"""Federated training on the cache: faithfulness to the official FedCLIP math, vectorised == per-client loop,
protocol hygiene, partitions, outputs."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from fedclip_cache import open_cache
from fedclip_cache.cli import app
from fedclip_cache.federated.adapters import ADAPTERS, init_params, num_params
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.partition import dirichlet, iid, pathological
from fedclip_cache.federated.protocols import build_experiments
from fedclip_cache.federated.results import federate
from fedclip_cache.federated.train import (LocalHyper, aggregate, batch_schedule, local_update,
                                           reference_local_update)
from fedclip_cache.synthetic import write_synthetic_cache

SIZES = {"art": 160, "cartoon": 130, "photo": 90, "sketch": 200}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return open_cache(write_synthetic_cache(tmp_path_factory.mktemp("syn") / "c", SIZES, 5, dim=48, seed=1))


@pytest.fixture(scope="module")
def unaligned(tmp_path_factory):
    return open_cache(write_synthetic_cache(tmp_path_factory.mktemp("un") / "c", SIZES, 5, dim=48, seed=2,
                                            align_text=False))


def test_official_adapter_has_525312_parameters_and_matches_torch_modules():
    assert num_params("fedclip", 512, 512) == 525_312
    p = init_params("fedclip", 16, 16, seed=3)
    seq = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                              torch.nn.Softmax(dim=1))
    with torch.no_grad():
        seq[0].weight.copy_(p["w1"].T), seq[0].bias.copy_(p["b1"])  # we store (in, out)
        seq[2].weight.copy_(p["w2"].T), seq[2].bias.copy_(p["b2"])
    x = torch.randn(5, 16)
    official = seq(x) * x  # fed_at_clip: image_features_att = img_adap(f); f = mul(att, f)
    ours = ADAPTERS["fedclip"].forward({k: v[None] for k, v in p.items()}, x[None], {})[0]
    torch.testing.assert_close(ours, official)
    # init follows torch.nn.Linear's default bounds
    assert p["w1"].abs().max() <= 1 / 4 and p["w1"].std() > 0.1


@pytest.mark.parametrize("loss,mu,kind", [("contrastive", 0.0, "fedclip"), ("ce", 0.0, "fedclip"),
                                          ("contrastive", 0.5, "fedclip"), ("contrastive", 0.0, "residual")])
def test_vectorised_update_equals_plain_per_client_loop(syn, loss, mu, kind):
    X, Y = torch.from_numpy(syn.features), torch.from_numpy(syn.labels)
    heads = torch.nn.functional.normalize(torch.from_numpy(syn.text_embeddings[0]), dim=-1)
    hp = LocalHyper(lr=1e-3, batch_size=8, epochs=2, mu=mu, loss=loss)
    rng = np.random.default_rng(0)
    trains = [np.sort(rng.choice(len(Y), n, replace=False)) for n in (65, 40, 17, 9)]  # 65 -> last batch of 1
    d = X.shape[1]
    starts = [init_params(kind, d, 24, seed=s) for s in range(4)]
    schedules = [batch_schedule(t, 0, 1, key, hp) for key, t in enumerate(trains)]
    assert all(len(b) > 1 for s in schedules for b in s) and len(schedules[0]) == 2 * 8  # size-1 batch skipped
    stacked = {n: torch.stack([s[n] for s in starts]) for n in starts[0]}
    vec = local_update(ADAPTERS[kind], stacked, X, Y, heads.expand(4, -1, -1), schedules, hp)
    for lane in range(4):
        ref = reference_local_update(ADAPTERS[kind], starts[lane], X, Y, heads, schedules[lane], hp)
        for n in ref:
            torch.testing.assert_close(vec[n][lane], ref[n], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(ref[n], starts[lane][n])  # training moved it


def test_aggregation_is_exact_for_uniform_and_sample_weighting():
    P = {"w": torch.arange(24, dtype=torch.float64).reshape(4, 3, 2), "b": torch.tensor([[1.], [2.], [3.], [10.]],
                                                                                        dtype=torch.float64)}
    g = aggregate(P, [np.array([0, 1, 2]), np.array([3])], [np.ones(3), np.ones(1)])
    # official communication(): temp += client_weight * param, client_weight = 1/n
    official = sum((1 / 3) * P["w"][i] for i in range(3))
    torch.testing.assert_close(g["w"][0], official, rtol=1e-15, atol=0)
    torch.testing.assert_close(g["w"][0], P["w"][:3].mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(g["b"][1], P["b"][3], rtol=0, atol=0)
    g = aggregate(P, [np.array([0, 1, 2])], [np.array([10., 30., 60.])])
    torch.testing.assert_close(g["b"][0], torch.tensor([0.1 * 1 + 0.3 * 2 + 0.6 * 3], dtype=torch.float64))


def test_heldout_domain_never_reaches_training_or_selection(syn):
    cfg = FederateConfig(rounds=3)
    exps = build_experiments(syn, cfg)
    assert [e.heldout_name for e in exps] == syn.domain_names
    for e in exps:
        seen = np.concatenate([np.concatenate([c.train, c.val, c.test]) for c in e.clients])
        assert np.intersect1d(seen, e.heldout).size == 0
        assert set(syn.domains[e.heldout]) == {e.heldout_name} and len(e.heldout) == SIZES[e.heldout_name]
        assert e.heldout_name not in {c.name for c in e.clients}
        for c in e.clients:  # 60/20/20 of each training client with the official boundaries, disjoint
            n = SIZES[c.name]
            assert (len(c.train), len(c.val), len(c.test)) == (int(n * .6), int(n * .2), int(n * .2))
            assert c.dropped == n - int(n * .6) - 2 * int(n * .2)
    # poisoning the held-out features changes held-out accuracy but not training or selection
    cfg = FederateConfig(rounds=4, heldout=["photo"], lr=1e-3)
    a = federate(syn, cfg)
    poisoned = open_cache(syn.path)
    held = poisoned.domains == "photo"
    poisoned.features[held] = np.random.default_rng(0).normal(size=(held.sum(), syn.dim)).astype(np.float32)
    b = federate(poisoned, cfg)
    ea, eb = a["experiments"][0], b["experiments"][0]
    assert ea["best"]["round"] == eb["best"]["round"] and ea["best"]["test"] == eb["best"]["test"]
    assert ea["best"]["heldout"] != eb["best"]["heldout"]


@pytest.mark.parametrize("make", [
    lambda y: iid(len(y), 4, seed=1),
    lambda y: dirichlet(y, 4, alpha=0.3, seed=1),
    lambda y: pathological(y, 5, 2, seed=1),
])
def test_partitions_cover_every_sample_exactly_once(make):
    y = np.random.default_rng(0).integers(0, 5, 400)
    parts = make(y)
    allidx = np.concatenate(parts)
    assert len(allidx) == 400 and len(np.unique(allidx)) == 400


def test_partition_label_skew_and_errors():
    y = np.random.default_rng(0).integers(0, 5, 1000)
    parts = pathological(y, 5, 2, seed=0)
    assert all(len(np.unique(y[p])) == 2 for p in parts)
    skewed = dirichlet(y, 4, alpha=0.05, seed=0)
    ent = [np.count_nonzero(np.bincount(y[p], minlength=5) > 0.05 * len(p)) for p in skewed]
    assert min(ent) < 5  # strong skew: some client misses classes
    with pytest.raises(ConfigError, match="held by no client"):
        pathological(y, 2, 1, seed=0)


def test_dirichlet_clients_in_federate(syn):
    cfg = FederateConfig(rounds=2, partition="dirichlet", alpha=1.0, num_clients=2, protocol="personal",
                         split_tail="test")  # every sample in some split
    exps = build_experiments(syn, cfg)
    names = [c.name for c in exps[0].clients]
    assert len(names) == 8 and "art#0" in names
    rows = np.concatenate([np.concatenate([c.train, c.val, c.test]) for c in exps[0].clients])
    assert np.array_equal(np.sort(rows), np.arange(len(syn)))
    s = federate(syn, cfg)
    assert len(s["experiments"][0]["best"]["test"]) == 8


def test_fedprox_with_mu_zero_equals_fedavg(syn, tmp_path):
    def adapter(algo, mu):
        out = tmp_path / f"{algo}-{mu}"
        s = federate(syn, FederateConfig(algo=algo, mu=mu, rounds=3, lr=1e-3), out=out)
        return s, torch.load(out / "adapter.pt")

    a, pa = adapter("fedclip", 0.0)
    b, pb = adapter("fedprox", 0.0)
    assert a["experiments"] == b["experiments"]
    assert all(torch.equal(pa[n], pb[n]) for n in pa) and pa["w1"].shape == (4, 48, 48)
    _, pc = adapter("fedprox", 5.0)
    assert not torch.allclose(pa["w1"], pc["w1"])
    # the proximal pull keeps FedProx closer to the round's starting point than FedAvg
    p0 = init_params("fedclip", 48, 48, seed=0)["w1"]
    assert (pc["w1"] - p0).norm() < (pa["w1"] - p0).norm()


def test_training_beats_zeroshot_when_prompts_are_not_aligned(unaligned):
    zs = federate(unaligned, FederateConfig(algo="zeroshot", protocol="personal"))
    tr = federate(unaligned, FederateConfig(algo="fedclip", protocol="personal", rounds=30, lr=1e-2))
    zacc, tacc = zs["mean"]["test_mean_best"], tr["mean"]["test_mean_best"]
    assert zacc < 0.4 and tacc > zacc + 0.3, (zacc, tacc)
    proto = federate(unaligned, FederateConfig(algo="zeroshot", head="prototype", protocol="personal"))
    assert proto["mean"]["test_mean_best"] > 0.9


def test_all_algorithms_run_and_are_deterministic(syn, tmp_path):
    for algo in ("local", "central", "fedclip"):
        cfg = FederateConfig(algo=algo, rounds=3, lr=1e-3, adapter="residual" if algo == "local" else "fedclip")
        a, b = federate(syn, cfg), federate(syn, cfg)
        assert a["experiments"] == b["experiments"]
        assert a["communication"]["bytes_up_per_round"] == (0 if algo != "fedclip" else
                                                            3 * 4 * a["communication"]["trainable_params"])
    lin = federate(syn, FederateConfig(adapter="linear", rounds=0))  # identity init == zero-shot
    zs = federate(syn, FederateConfig(algo="zeroshot"))
    # rounds=0 for a trained algorithm still scores the initial model once
    assert lin["experiments"][0]["best"]["heldout"] == zs["experiments"][0]["best"]["heldout"]


def test_cli_run_folder_and_communication(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 60, "b": 50, "c": 40}, 3, dim=512, seed=0)
    res = CliRunner().invoke(app, ["federate", str(cache), "--rounds", "2", "-o", str(tmp_path / "run"), "-q",
                                   "--heldout", "b"])
    assert res.exit_code == 0, res.output
    assert "525,312" in res.output and "288.0×" in res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["communication"]["full_model_over_adapter"] == 288.0
    assert summary["communication"]["bytes_up_per_round"] == 2 * 525_312 * 4
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["federate"]["lr"] == 5e-5 and cfg["federate"]["heldout"] == ["b"]
    m = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pandas()
    assert set(m["round"]) == {1, 2} and len(m) == 2 * (2 * 2 + 1)
    assert set(m["split"]) == {"val", "test", "heldout"} and m["accuracy"].between(0, 1).all()


@pytest.mark.parametrize("args,needle", [
    (["--algo", "fedsgd"], "--algo 'fedsgd' unknown"),
    (["--split", "0.5,0.2,0.2"], "--split must be three fractions"),
    (["--heldout", "mars"], "'mars' is not a domain"),
    (["--template", "7"], "--template '7'"),
    (["--adapter", "lora"], "--adapter 'lora' unknown"),
    pytest.param(["--device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_options_give_clear_errors(syn, args, needle):
    res = CliRunner().invoke(app, ["federate", str(syn.path), "--rounds", "1", "-q", *args])
    assert res.exit_code != 0
    assert needle in str(res.exception)


def test_incompatible_cache_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["federate", str(tmp_path), "-q"])
    assert res.exit_code != 0 and "not a fedclip-cache cache" in str(res.exception)
    one = write_synthetic_cache(tmp_path / "one", {"only": 50}, 3, dim=8)
    res = CliRunner().invoke(app, ["federate", str(one), "-q"])
    assert "needs at least two domains" in str(res.exception)
