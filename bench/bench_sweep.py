"""Benchmark: the full adapter-size sweep on the PACS-shaped synthetic cache (not a test).

    python bench/bench_sweep.py [--rounds 200] [--seq-rounds 20]

ours:       fedclip-cache sweep, hidden = 32,64,128,256,512 x seeds 0,1,2 x 4 held-out domains (seeds vectorised)
sequential: the same points as separate `federate` calls, one seed at a time; timed on --seq-rounds rounds and
            extrapolated to --rounds (labelled as such).
Writes bench/results/sweep-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedclip_cache import open_cache
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.results import federate
from fedclip_cache.sweep import sweep
from fedclip_cache.synthetic import write_synthetic_cache

PACS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
HIDDEN = [32, 64, 128, 256, 512]
SEEDS = [0, 1, 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seq-rounds", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cache_dir = write_synthetic_cache(tmp / "pacs", PACS, 7, dim=512, seed=0)
    t0 = time.perf_counter()
    res = sweep(cache_dir, FederateConfig(rounds=a.rounds), {"hidden": HIDDEN}, SEEDS, tmp / "sweep")
    ours = time.perf_counter() - t0
    print(f"sweep: {ours:.1f} s", flush=True)
    seq = float("nan")
    if a.seq_rounds:  # 0: skip the sequential comparison
        cache = open_cache(cache_dir)
        t0 = time.perf_counter()
        for h in HIDDEN:
            for s in SEEDS:
                federate(cache, FederateConfig(rounds=a.seq_rounds, hidden=h, seed=s))
        seq = (time.perf_counter() - t0) * a.rounds / a.seq_rounds
    out = {"setup": f"pacs-shaped-hidden5-seeds3-lodo-{a.rounds}r-{torch.get_num_threads()}threads",
           "threads": torch.get_num_threads(), "points": len(HIDDEN), "seeds": len(SEEDS),
           "ours_seconds": round(ours, 1), "ours_minutes": round(ours / 60, 2),
           "sequential_seconds_extrapolated": round(seq, 1), "sequential_measured_rounds": a.seq_rounds,
           "sequential_over_ours": round(seq / ours, 2) if a.seq_rounds else None, "runs": len(res["summary"])}
    print(json.dumps(out, indent=2))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"sweep-{out['setup']}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
