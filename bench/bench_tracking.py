"""Benchmark: the wall-time overhead of `federate --log tensorboard,mlflow,wandb` (not a test).

    python bench/bench_tracking.py                  # 200 rounds, LODO over 4 domains (800 images)

Runs federate -o RUN without and with all three trackers (W&B offline). With --log, the trackers' imports and
MLflow's store are prepared in a background thread while the run trains; what is left is sent after the run
folder is complete (the "tail", timed by wrapping tracking.track_run). The tracked data is the same for any cache
of 4 domains (rounds x experiments x clients x splits), so the tail is what a PACS-sized run pays too. Then each
tracker alone on a finished folder. Writes bench/results/tracking.json.
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
from fedclip_cache.federated.tracking import TRACKERS  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

DOMAINS = {"art_painting": 200, "cartoon": 200, "photo": 200, "sketch": 200}  # a small PACS-shaped cache


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", default="bench/results/tracking.json")
    args = ap.parse_args()
    from fedclip_cache.federated import tracking

    tails = []
    real_track_run = tracking.track_run

    def timed_track_run(*a, **kw):  # what `federate --log` adds after its run folder is complete
        t = time.perf_counter()
        try:
            return real_track_run(*a, **kw)
        finally:
            tails.append(time.perf_counter() - t)

    tracking.track_run = timed_track_run
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    try:
        cache = write_synthetic_cache(tmp / "cache", DOMAINS, 7, dim=args.dim)
        load0 = os.getloadavg()[0]
        plain = timed(lambda: federate(str(cache), FederateConfig(rounds=args.rounds), out=tmp / "plain", plots=True))
        print(f"federate            {plain:7.2f} s (load {load0:.1f})", flush=True)
        log = ",".join(TRACKERS)
        tracked = timed(lambda: federate(str(cache), FederateConfig(rounds=args.rounds, log=log), out=tmp / "tracked",
                                         plots=True))
        print(f"federate --log all  {tracked:7.2f} s, of which {tails[0]:.2f} s after the run folder was complete "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        alone = {}
        for name in TRACKERS:  # each tracker alone on a finished folder, libraries imported (warm)
            alone[name] = round(timed(lambda: real_track_run(tmp / "plain", name)), 3)
            print(f"{name:12s} alone, warm: {alone[name]:.2f} s", flush=True)
        result = {
            "setup": {"domains": DOMAINS, "dim": args.dim, "classes": 7, "rounds": args.rounds,
                      "experiments": len(DOMAINS), "tracked_runs": len(DOMAINS)},
            "federate_s": round(plain, 3), "federate_log_all_s": round(tracked, 3),
            "tail_after_complete_s": round(tails[0], 3),
            "tail_pct_of_federate": round(100 * tails[0] / plain, 2),
            "ab_difference_pct": round(100 * (tracked - plain) / plain, 2),
            "tracker_alone_warm_s": alone,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_start": load0,
                        "load_avg_end": os.getloadavg()[0]},
        }
        print(json.dumps(result, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
