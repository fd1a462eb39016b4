"""Benchmark: the wall-time overhead of `federate --log tensorboard,mlflow,wandb` (not a test).

    python bench/bench_tracking.py                  # 200 rounds, LODO over 4 domains (800 images), 2 repeats
    python bench/bench_tracking.py --rounds 40 --repeats 1

Each repeat runs federate -o RUN, then sends RUN to all three trackers (W&B offline) exactly as `--log` does
(tracking.track_run after the folder is complete; the first repeat pays the trackers' imports and MLflow's store
creation), each timed; then each tracker alone on a finished folder. Writes bench/results/tracking.json. The target (issue 22): <= 3 % of the run's wall time with all three on.
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

DOMAINS = {"art_painting": 200, "cartoon": 200, "photo": 200, "sketch": 200}  # a small PACS-shaped cache


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
        runs = []
        for rep in range(args.repeats):
            out = tmp / f"run-{rep}"
            # what `federate -o RUN --log ...` does: the run folder, then track_run on it (timed apart: the
            # shared machine's load moves too much for an A/B of two 200-round runs to resolve 3 %)
            fed = timed(lambda: federate(str(cache), FederateConfig(rounds=args.rounds), out=out, plots=True))
            track = timed(lambda: track_run(out, ",".join(TRACKERS)))
            runs.append({"federate_s": round(fed, 3), "tracking_s": round(track, 3),
                         "overhead_pct": round(100 * track / fed, 2), "load_avg": os.getloadavg()[0]})
            print(f"repeat {rep}: federate {fed:7.2f} s, tracking (all three) {track:5.2f} s "
                  f"({100 * track / fed:.1f} %), load {os.getloadavg()[0]:.1f}", flush=True)
        alone = {}
        for name in TRACKERS:  # each tracker alone on a finished folder (libraries imported already)
            alone[name] = round(timed(lambda: track_run(tmp / "run-0", name)), 3)
            print(f"{name:12s} alone: {alone[name]:.2f} s", flush=True)
        result = {
            "setup": {"domains": DOMAINS, "dim": args.dim, "classes": 7, "rounds": args.rounds,
                      "experiments": len(DOMAINS), "repeats": args.repeats},
            "runs": runs, "tracker_alone_s_warm": alone,
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
