"""Benchmark: the wall-time overhead of `federate --log tensorboard,mlflow,wandb` (not a test).

    python bench/bench_tracking.py                  # 200 rounds, LODO over 4 domains, 2 repeats
    python bench/bench_tracking.py --rounds 40 --repeats 1

Each repeat runs the same federate twice, without and with all three trackers (W&B offline), alternating which goes
first; then sends the finished run folder to each tracker alone (its own seconds). Writes
bench/results/tracking.json. The target (issue 22): <= 3 % of the run's wall time with all three on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.federated.tracking import TRACKERS, track_run  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

DOMAINS = {"art_painting": 400, "cartoon": 400, "photo": 400, "sketch": 400}  # a small PACS-shaped cache


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", default="bench/results/tracking.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    try:
        cache = write_synthetic_cache(tmp / "cache", DOMAINS, 7, dim=args.dim)
        base = dict(rounds=args.rounds)
        plain, tracked = [], []
        for rep in range(args.repeats):
            order = ("plain", "tracked") if rep % 2 == 0 else ("tracked", "plain")
            for which in order:
                out = tmp / f"{which}-{rep}"
                log = ",".join(TRACKERS) if which == "tracked" else ""
                s = timed(lambda: federate(str(cache), FederateConfig(**base, log=log), out=out, plots=True))
                (tracked if which == "tracked" else plain).append(s)
                print(f"repeat {rep}: {which:8s} {s:7.2f} s", flush=True)
        alone = {}
        folder = tmp / "plain-0"
        for name in TRACKERS:  # each tracker alone on a finished folder (a fresh process would add its import)
            alone[name] = round(timed(lambda: track_run(folder, name)), 3)
            print(f"{name:12s} alone: {alone[name]:.2f} s", flush=True)
        p, t = min(plain), min(tracked)
        result = {
            "setup": {"domains": DOMAINS, "dim": args.dim, "classes": 7, "rounds": args.rounds,
                      "experiments": len(DOMAINS), "repeats": args.repeats},
            "plain_s": [round(x, 3) for x in plain], "tracked_s": [round(x, 3) for x in tracked],
            "overhead_s": round(t - p, 3), "overhead_pct": round(100 * (t - p) / p, 2),
            "tracker_alone_s_second_use": alone,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_avg_at_end": os.getloadavg()},
        }
        print(json.dumps(result, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
