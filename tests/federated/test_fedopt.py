"""Server optimisers (fedavgm, fedadam, fedyogi, fedadagrad): the same numbers as Flower 1.42's strategies, step
for step and end to end; FedAvgM without momentum is FedCLIP; the CLI and sweeps accept them."""
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

flwr = pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi  # noqa: E402
from flwr.server.strategy import aggregate as flwr_aggregate  # noqa: E402

from fedclip_cache import cli, open_cache  # noqa: E402
from fedclip_cache.federated.adapters import ADAPTERS, init_params  # noqa: E402
from fedclip_cache.federated.algorithms import make_algorithm  # noqa: E402
from fedclip_cache.federated.config import ConfigError, FederateConfig  # noqa: E402
from fedclip_cache.federated.loop import text_head  # noqa: E402
from fedclip_cache.federated.protocols import build_experiments  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.federated.train import (LocalHyper, aggregate, batch_schedule, lane_key,  # noqa: E402
                                           reference_local_update)
from fedclip_cache.sweep import sweep  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

ALGOS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
# Non-default hyper-parameters on both sides, so that the mapping of every option is exercised.
HYPER = {
    "fedavgm": {"server_lr": 0.7, "server_momentum": 0.8},
    "fedadam": {"server_lr": 0.03, "server_beta1": 0.8, "server_beta2": 0.95, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.02, "server_beta1": 0.85, "server_beta2": 0.9, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.05, "tau": 1e-4},
}


def flower_strategy(algo: str, cfg: FederateConfig, init: list[np.ndarray]):
    """Flower's strategy of the same name, configured from our options as the README says."""
    alg = make_algorithm(cfg)
    params = ndarrays_to_parameters(init)
    if algo == "fedavgm":
        return FedAvgM(server_learning_rate=alg.server_lr, server_momentum=cfg.server_momentum,
                       initial_parameters=params)
    if algo == "fedadagrad":
        return FedAdagrad(eta=alg.server_lr, tau=alg.tau, initial_parameters=params)
    cls = {"fedadam": FedAdam, "fedyogi": FedYogi}[algo]
    return cls(eta=alg.server_lr, beta_1=cfg.server_beta1, beta_2=cfg.server_beta2, tau=alg.tau,
               initial_parameters=params)


def fit_results(arrays: list[list[np.ndarray]], counts: list[int]):
    return [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), n, {})) for a, n in zip(arrays, counts)]


def flower_average(algo: str, arrays: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    """The FedAvg that Flower's strategy computes before its server step (FedAvgM: ``aggregate``; the FedOpt
    family: FedAvg's default ``aggregate_inplace``), so that both sides step from bit-identical averages."""
    if algo == "fedavgm":
        return flwr_aggregate.aggregate([(a, n) for a, n in zip(arrays, counts)])
    return flwr_aggregate.aggregate_inplace(fit_results(arrays, counts))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighting", ["uniform", "samples"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("defaults", [False, True], ids=["options", "defaults"])
def test_server_update_equals_flower_step_for_step(algo, weighting, defaults, dtype):
    """Two experiments (stacked, as the loop runs them), each against its own Flower strategy, for 4 rounds: the
    same client models in, the same global model out."""
    cfg = FederateConfig(algo=algo, weighting=weighting, **({} if defaults else HYPER[algo])).validate()
    alg = make_algorithm(cfg)
    rng = np.random.default_rng(7)
    shapes = {"w": (6, 5), "b": (5,)}
    n_clients, E = 3, 2
    counts = [1] * n_clients if weighting == "uniform" else [5, 17, 30]
    init = [{n: rng.uniform(-0.04, 0.04, s).astype(dtype) for n, s in shapes.items()} for _ in range(E)]
    strategies = [flower_strategy(algo, cfg, list(p.values())) for p in init]
    flower_now = [list(p.values()) for p in init]
    ours = {n: torch.stack([torch.from_numpy(p[n]) for p in init]) for n in shapes}
    extra: dict = {}
    for rnd in range(1, 5):
        # every client moves away from its experiment's global model, with a shared drift (like local training)
        clients = [[[(g + rng.normal(0.003, 0.002, g.shape)).astype(dtype) for g in flower_now[e]]
                    for _ in range(n_clients)] for e in range(E)]
        averaged = {n: torch.stack([torch.from_numpy(np.asarray(flower_average(algo, clients[e], counts)[i], dtype))
                                    for e in range(E)]) for i, n in enumerate(shapes)}
        for e in range(E):
            agg, _ = strategies[e].aggregate_fit(rnd, fit_results(clients[e], counts), [])
            flower_now[e] = parameters_to_ndarrays(agg)
        before = ({n: v.clone() for n, v in ours.items()},
                  {k: {n: v.clone() for n, v in s.items()} for k, s in extra.items()})
        new, new_extra = alg.server_update(ours, averaged, extra, rnd)
        # pure: neither the current model nor the state passed in was modified
        assert all(torch.equal(ours[n], before[0][n]) for n in ours)
        assert all(torch.equal(extra[k][n], before[1][k][n]) for k in extra for n in extra[k])
        for e in range(E):
            for i, n in enumerate(shapes):
                assert new[n].dtype == ours[n].dtype
                np.testing.assert_allclose(new[n][e].numpy(), flower_now[e][i], rtol=0, atol=1e-6)
        if rnd > 1:  # a real server step, not FedAvg (FedAvgM's first step with lr 1 is FedAvg: m = g)
            assert max((new[n] - averaged[n]).abs().max().item() for n in shapes) > 1e-4
        ours, extra = new, new_extra
    assert set(extra) == ({"momentum"} if algo == "fedavgm" else {"m", "v"})
    assert extra[next(iter(extra))]["w"].shape == (E, 6, 5)  # state stacked over experiments


def test_defaults_and_options_read():
    d = {a: make_algorithm(FederateConfig(algo=a)) for a in ALGOS}
    assert d["fedavgm"].server_lr == 1.0 and FederateConfig().server_momentum == 0.9
    # Flower's, except the learning rates that collapse the adapter (measured, see fedopt.py)
    assert (d["fedadam"].server_lr, d["fedadam"].tau) == (3e-3, 1e-9)
    assert (d["fedyogi"].server_lr, d["fedyogi"].tau) == (1e-2, 1e-3)
    assert (d["fedadagrad"].server_lr, d["fedadagrad"].tau) == (3e-3, 1e-9)
    assert make_algorithm(FederateConfig(algo="fedadam", server_lr=0.1, tau=1e-4)).tau == 1e-4
    assert FederateConfig(algo="fedadagrad", server_beta1=0.5).ignored_options() == ["server_beta1"]
    assert FederateConfig(algo="fedclip", server_lr=0.1).ignored_options() == ["server_lr"]
    assert FederateConfig(algo="fedadam", server_lr=0.1, tau=1e-3, server_beta2=0.9).ignored_options() == []
    for a in ALGOS:
        cls = type(d[a])
        assert cls.summary and ("Reddi" in cls.reference or "Hsu" in cls.reference)


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return open_cache(write_synthetic_cache(tmp_path_factory.mktemp("fo") / "c", {"a": 70, "b": 50, "c": 40}, 3,
                                            dim=16, seed=4))


def reference_run(cache, cfg: FederateConfig) -> list[np.ndarray]:
    """The plain loop: each client trains alone (torch.optim.Adam), Flower's strategy is the server."""
    e = build_experiments(cache, cfg)[0]
    X, Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
    kind, hp = ADAPTERS[cfg.adapter], LocalHyper.from_config(cfg, 0.0, 100.0)
    T = text_head(cache, cfg.template)
    init = init_params(cfg.adapter, cache.dim, cfg.hidden, e.seed)
    names = list(init)
    strategy = flower_strategy(cfg.algo, cfg, [init[n].numpy() for n in names])
    glob = init
    for rnd in range(1, cfg.rounds + 1):
        outs = [reference_local_update(kind, glob, X, Y, T, batch_schedule(c.train, e.seed, rnd,
                                                                          lane_key(e.name, c.name), hp), hp)
                for c in e.clients]
        counts = [1 if cfg.weighting == "uniform" else len(c.train) for c in e.clients]
        agg, _ = strategy.aggregate_fit(rnd, fit_results([[o[n].numpy() for n in names] for o in outs], counts), [])
        # Flower's adaptive strategies return float64 under numpy 2; clients train in float32
        glob = {n: torch.from_numpy(np.asarray(a, np.float32)) for n, a in zip(names, parameters_to_ndarrays(agg))}
    return [glob[n].numpy() for n in names]


@pytest.mark.parametrize("algo,weighting", [(a, "uniform") for a in ALGOS] + [("fedadam", "samples")])
def test_federate_equals_plain_loop_with_flower_server(cache, tmp_path, algo, weighting):
    # Batches of 8: several local steps per round. With one Adam step every client moves each weight by exactly
    # +-lr, two clients' average cancels to rounding noise, and an adaptive server step (~ eta * sign(delta) in
    # round 1) turns that noise into +-eta: a degenerate case where no two implementations agree.
    cfg = FederateConfig(algo=algo, rounds=3, lr=1e-3, hidden=8, heldout=["a"], weighting=weighting, batch_size=8,
                         server_lr=0.01 if algo != "fedavgm" else None).validate()
    federate(cache, cfg, out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    start = init_params("fedclip", 16, 8, 0)
    for n, ref in zip(["w1", "b1", "w2", "b2"], reference_run(cache, cfg)):
        np.testing.assert_allclose(final[n][0].numpy(), ref, rtol=1e-5, atol=1e-5)
        assert (final[n][0] - start[n]).abs().max() > 1e-2  # it trained


def test_fedavgm_without_momentum_is_fedclip(cache, tmp_path):
    def run(algo, **kw):
        s = federate(cache, FederateConfig(algo=algo, rounds=3, lr=1e-3, heldout=["b"], **kw), out=tmp_path / algo)
        return s, torch.load(tmp_path / algo / "adapter.pt")

    a, pa = run("fedclip")
    b, pb = run("fedavgm", server_lr=1.0, server_momentum=0.0)
    assert a["experiments"] == b["experiments"] and a["mean"] == b["mean"]
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    _, pc = run("fedadam")  # and a server optimiser that is not FedAvg does change the model
    assert not torch.allclose(pa["w1"], pc["w1"])


# ------------------------------------------------------------------------------------------ CLI and sweeps

def test_cli_fedadam_run_and_bad_server_lr(cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli.app, ["federate", str(cache.path), "--algo", "fedadam", "--server-lr", "0.01",
                                       "--tau", "1e-3", "--rounds", "2", "--heldout", "c", "-q", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == "fedadam" and summary["rounds"] == 2 and not summary["notes"]
    assert 0 <= summary["mean"]["heldout_best"] <= 1
    fed = json.loads((out / "config.json").read_text())["federate"]
    assert (fed["server_lr"], fed["tau"]) == (0.01, 1e-3)

    monkeypatch.setattr(sys, "argv", ["fedclip-cache", "federate", str(cache.path), "--algo", "fedadam",
                                      "--server-lr", "-1", "-q"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    text = capsys.readouterr()
    lines = (text.out + text.err).strip().splitlines()
    assert e.value.code == 2 and lines == ["error: --server-lr -1.0: must be > 0"], lines
    with pytest.raises(ConfigError, match="--tau 0.0: must be > 0"):
        FederateConfig(algo="fedyogi", tau=0.0).validate()
    with pytest.raises(ConfigError, match=r"--server-momentum 1.0: must be in \[0, 1\)"):
        FederateConfig(algo="fedavgm", server_momentum=1.0).validate()


def test_sweep_over_fedclip_and_fedavgm(cache, tmp_path):
    out = tmp_path / "sw"
    r = CliRunner().invoke(cli.app, ["sweep", str(cache.path), "-o", str(out), "--grid", "algo=fedclip,fedavgm",
                                     "--seeds", "0", "--rounds", "2", "--heldout", "a", "-q"])
    assert r.exit_code == 0, r.output
    assert "2 grid point(s) trained now" in r.output
    df = pq.read_table(out / "results.parquet").to_pandas()
    assert sorted(df["algo"].unique()) == ["fedavgm", "fedclip"]
    held = df[df["split"] == "heldout"].set_index("algo")["acc_best"]
    assert held.between(0, 1).all() and len(held) == 2
    # and the sweep's fedavgm point is the same run as a single federate call
    single = federate(cache, FederateConfig(algo="fedavgm", rounds=2, heldout=["a"]))
    assert held["fedavgm"] == pytest.approx(single["experiments"][0]["best"]["heldout"])
