"""Benchmark: the peers' label-shift protocol at CIFAR-100 scale, on a synthetic cache (not a test).

    python bench/bench_scale.py                       # fedclip and fedadam, 150 rounds
    python bench/bench_scale.py --algos fedclip --rounds 20

CIFAR-100-shaped cache (50,000 x 512 float32, 100 classes, one pooled domain), 100 clients from Dirichlet(0.3)
over the pooled dataset, 10 % participation per round, 150 rounds (the FedOTP / FedPGP setting); personalisation
accuracy = mean over the clients' test splits. Each algorithm runs in a fresh process so its peak RSS is its own;
the RSS of a bare ``import torch`` in the same environment is measured too (the CUDA build's libraries).

Writes bench/results/scale-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CACHE = HERE / "out" / "cifar100-shaped"
N, D, C = 50_000, 512, 100


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(algo: str, rounds: int, threads: int) -> dict:
    import torch

    from fedclip_cache import FederateConfig, federate, open_cache

    torch.set_num_threads(threads)
    cache = open_cache(CACHE)
    cfg = FederateConfig(algo=algo, protocol="personal", partition="dirichlet", alpha=0.3, num_clients=100,
                         partition_scope="pooled", fraction_fit=0.1, rounds=rounds)
    t0 = time.perf_counter()
    s = federate(cache, cfg)
    wall = time.perf_counter() - t0
    train = sum(c["train"] for c in s["experiments"][0]["clients"].values())
    return {"algo": algo, "seconds": round(wall, 2), "peak_rss_mib": round(peak_rss_mib(), 1),
            "test_mean_best": s["mean"]["test_mean_best"], "test_mean_last": s["mean"]["test_mean_last"],
            "clients_per_round": s["communication"]["clients_per_round"], "train_samples": train}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--algos", default="fedclip,fedadam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.rounds, a.threads)))
        return
    if not (CACHE / "cache.json").is_file():
        from fedclip_cache.synthetic import write_synthetic_cache

        write_synthetic_cache(CACHE, {"cifar100": N}, C, dim=D, seed=0, class_sep=0.08)
    bare = subprocess.run([sys.executable, "-c", "import torch\nfor l in open('/proc/self/status'):\n"
                           "    l.startswith('VmHWM:') and print(int(l.split()[1]) / 1024)"],
                          capture_output=True, text=True, check=True)
    feature_mib = N * D * 4 / 2**20
    res = {"setup": f"cifar100-shaped-dirichlet0.3-100clients-frac0.1-{a.rounds}r-{a.threads}threads",
           "cpu": platform.processor() or platform.machine(), "features_mib": round(feature_mib, 1),
           "import_torch_rss_mib": round(float(bare.stdout.strip()), 1), "runs": []}
    for algo in a.algos.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", algo, "--rounds", str(a.rounds), "--threads",
                              str(a.threads)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run["rss_target_mib"] = round(2 * feature_mib + 400, 1)
        run["rss_over_import_torch_mib"] = round(run["peak_rss_mib"] - res["import_torch_rss_mib"], 1)
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"scale-{res['setup']}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
