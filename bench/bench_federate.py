"""Benchmark: full leave-one-domain-out FedCLIP on a PACS-shaped synthetic cache (not a test).

    python bench/bench_federate.py                     # ours, full LODO (4 held-out runs x 200 rounds)
    python bench/bench_federate.py --loop-rounds 5     # + plain per-client loop, timed on a few rounds
    python bench/bench_federate.py --uncached-rounds 1 # + official-style uncached loop (ViT-B-32 per batch)

Writes bench/results/federate-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedclip_cache import open_cache
from fedclip_cache.federated.adapters import ADAPTERS, init_params
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.loop import text_head
from fedclip_cache.federated.protocols import build_experiments
from fedclip_cache.federated.results import federate
from fedclip_cache.federated.train import LocalHyper, aggregate, batch_schedule, lane_key, reference_local_update
from fedclip_cache.synthetic import write_synthetic_cache

PACS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}


def flops_per_round(cache, exps, d, h):
    """Multiply-adds x2 of adapter training (fwd + bwd ~ 3x fwd) and per-round evaluation."""
    fwd = 2 * (d * h + h * d)
    train = sum(len(c.train) for e in exps for c in e.clients) * 3 * fwd
    ev = sum(len(c.val) + len(c.test) for e in exps for c in e.clients) + sum(len(e.heldout) for e in exps)
    return train + ev * fwd


def plain_loop_seconds_per_round(cache, cfg, exps, rounds):
    """The per-client loop: each client trains alone with torch.optim.Adam, then FedAvg (official structure)."""
    X, Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
    T = text_head(cache, "0")
    kind, d = ADAPTERS["fedclip"], cache.dim
    hp = LocalHyper()
    t0 = time.perf_counter()
    for e in exps:
        glob = init_params("fedclip", d, d, 0)
        for r in range(1, rounds + 1):
            outs = [reference_local_update(kind, glob, X, Y, T, batch_schedule(c.train, 0, r, lane_key(e.name, c.name),
                                                                              hp), hp) for c in e.clients]
            stacked = {n: torch.stack([o[n] for o in outs]) for n in glob}
            glob = {n: v[0] for n, v in aggregate(stacked, [np.arange(len(outs))], [np.ones(len(outs))]).items()}
            with torch.no_grad():  # per-round evaluation, one set at a time
                for c in e.clients:
                    for rows in (c.val, c.test):
                        f = kind.forward({n: v[None] for n, v in glob.items()}, X[rows][None], {})[0]
                        (torch.nn.functional.normalize(f, dim=-1) @ T.T).argmax(1)
                f = kind.forward({n: v[None] for n, v in glob.items()}, X[e.heldout][None], {})[0]
                (torch.nn.functional.normalize(f, dim=-1) @ T.T).argmax(1)
    return (time.perf_counter() - t0) / rounds


def official_structure_seconds_per_round(cache, exps, rounds):
    """The official code's structure on cached features: per client an nn.Module adapter, a DataLoader of batch 32
    (shuffled), torch.optim.Adam re-created per round; evaluation through DataLoaders of batch 32."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
    T = text_head(cache, "0")
    d = cache.dim

    def adapter():
        return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, d),
                                   torch.nn.Softmax(dim=1))

    def loader(rows, shuffle):
        return DataLoader(TensorDataset(X[rows], Y[rows]), batch_size=32, shuffle=shuffle)

    t0 = time.perf_counter()
    for e in exps:
        server = adapter()
        clients = [adapter() for _ in e.clients]
        for _ in range(rounds):
            for c, m in zip(e.clients, clients):
                m.load_state_dict(server.state_dict())
                opt = torch.optim.Adam(m.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
                for x, y in loader(c.train, True):
                    if len(y) < 2:
                        continue
                    f = m(x) * x
                    f = f / f.norm(dim=1, keepdim=True)
                    t = T[y]
                    logits = 100 * f @ t.T
                    gt = torch.arange(len(y))
                    loss = (torch.nn.functional.cross_entropy(logits, gt) +
                            torch.nn.functional.cross_entropy(logits.T, gt)) / 2
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                for k, v in server.state_dict().items():
                    v.copy_(sum(cm.state_dict()[k] for cm in clients) / len(clients))
                for rows in [c.val for c in e.clients] + [c.test for c in e.clients] + [e.heldout]:
                    for x, _ in loader(rows, False):
                        f = server(x) * x
                        (100 * (f / f.norm(dim=1, keepdim=True)) @ T.T).argmax(1)
    return (time.perf_counter() - t0) / rounds


def uncached_seconds_per_round(cache, exps, rounds, batch=32):
    """Official-style: every batch of every round runs a ViT-B-32 image forward before the adapter."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    kind, d = ADAPTERS["fedclip"], 512
    glob = {n: v[None].requires_grad_(True) for n, v in init_params("fedclip", d, d, 0).items()}
    opt = torch.optim.Adam(glob.values(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    imgs = torch.randn(batch, 3, 224, 224)
    # measure the cost of one training batch, then count batches (train + eval) per round
    t0 = time.perf_counter()
    n_meas = 3
    for _ in range(n_meas):
        with torch.no_grad():
            f = model.encode_image(imgs).float()
        loss = kind.forward(glob, f[None], {}).sum()
        opt.zero_grad(), loss.backward(), opt.step()
    per_batch = (time.perf_counter() - t0) / n_meas
    e_imgs = sum(len(c.train) + len(c.val) + len(c.test) for e in exps for c in e.clients) + \
        sum(len(e.heldout) for e in exps)
    return per_batch * e_imgs / batch, per_batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--loop-rounds", type=int, default=0, help="time the plain per-client loop on N rounds")
    ap.add_argument("--uncached-rounds", type=int, default=0, help="time the uncached ViT-B-32 loop (extrapolated)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--curves", action="store_true", help="score test/held-out every round (the pre-lazy cost)")
    ap.add_argument("--compare-curves", action="store_true", help="also time --curves in the same process")
    ap.add_argument("--peak-gflops", type=float, default=None, help="fp32 peak of this machine, for %% of peak")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    cache = open_cache(write_synthetic_cache(tmp / "pacs", PACS, 7, dim=512, seed=0))
    cfg = FederateConfig(rounds=a.rounds, curves=a.curves)
    exps = build_experiments(cache, cfg)
    t0 = time.perf_counter()
    summary = federate(cache, cfg)
    ours = time.perf_counter() - t0
    curves_seconds = None
    if a.compare_curves:  # same process, same cache: the lazy-evaluation speed-up
        t0 = time.perf_counter()
        full = federate(cache, FederateConfig(rounds=a.rounds, curves=True))
        curves_seconds = time.perf_counter() - t0
        assert full["mean"] == summary["mean"], "lazy evaluation changed the selected/last numbers"
    fl = flops_per_round(cache, exps, 512, 512) * a.rounds
    res = {"setup": f"pacs-shaped-lodo-{a.rounds}r-{torch.get_num_threads()}threads"
                    f"{'-curves' if a.curves else ''}", "cpu": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "ours_seconds": round(ours, 2), "tflop": round(fl / 1e12, 2), "achieved_gflops": round(fl / ours / 1e9, 1),
           "heldout_mean_best": summary["mean"]["heldout_best"], "curves": a.curves}
    if curves_seconds is not None:
        res["curves_seconds"] = round(curves_seconds, 2)
        res["lazy_speedup"] = round(curves_seconds / ours, 3)
    if a.peak_gflops:
        res["fraction_of_peak"] = round(fl / ours / 1e9 / a.peak_gflops, 3)
    print(json.dumps(res, indent=2), flush=True)
    if a.loop_rounds:
        spr = plain_loop_seconds_per_round(cache, cfg, exps, a.loop_rounds)
        res["plain_loop_seconds_extrapolated"] = round(spr * a.rounds, 1)
        res["plain_loop_over_ours"] = round(spr * a.rounds / ours, 2)
        res["plain_loop_measured_rounds"] = a.loop_rounds
    if a.loop_rounds:
        spr = official_structure_seconds_per_round(cache, exps, a.loop_rounds)
        res["official_structure_loop_seconds_extrapolated"] = round(spr * a.rounds, 1)
        res["official_structure_loop_over_ours"] = round(spr * a.rounds / ours, 2)
    if a.uncached_rounds:
        spr, per_batch = uncached_seconds_per_round(cache, exps, a.uncached_rounds)
        res["uncached_seconds_per_batch"] = round(per_batch, 3)
        res["uncached_seconds_extrapolated"] = round(spr * a.rounds, 0)
        res["uncached_over_ours"] = round(spr * a.rounds / ours, 0)
    print(json.dumps(res, indent=2))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"federate-{res['setup']}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
