"""Benchmark: a real local Flower deployment (`fedclip-cache deploy`, 3 SuperNodes) vs in-process `federate` (not a
test). Both are timed as whole commands (a fresh Python, imports, start-up, every round, the run folder written).

    python bench/bench_deploy.py                         # 20 rounds, 3 repeats each, worker sites (the default)
    python bench/bench_deploy.py --stock-rounds 2        # + Flower's stock runner (a process per message), 2 rounds

Caches: PACS-shaped synthetic (art_painting 2,048 / cartoon 2,344 / photo 1,670 images, 7 classes, D = 512), one
cache per site for `deploy` and one cache of the three domains for `federate`; photo held out (evaluates only), so
two sites train. Writes bench/results/deploy-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedclip_cache.synthetic import write_synthetic_cache

SITES = {"art_painting": 2048, "cartoon": 2344, "photo": 1670}
HELDOUT = "photo"


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stock-rounds", type=int, default=0, help="also time Flower's stock runner (isolation "
                                                                "subprocess) on this many rounds")
    ap.add_argument("--poll-interval", type=float, default=0.2)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent / "src")]
                                                        + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cli = [sys.executable, "-m", "fedclip_cache"]
    try:
        sites = [str(write_synthetic_cache(tmp / f"site-{d}", {d: n}, 7, dim=args.dim, seed=1))
                 for d, n in SITES.items()]
        merged = str(write_synthetic_cache(tmp / "merged", SITES, 7, dim=args.dim, seed=1))
        common = ["--heldout", HELDOUT, "--rounds", str(args.rounds)]
        res: dict = {"rounds": args.rounds, "sites": SITES, "heldout": HELDOUT, "dim": args.dim,
                     "poll_interval": args.poll_interval, "federate_s": [], "federate_1thread_s": [], "deploy_s": [],
                     "deploy_timings": [], "load_avg_before": os.getloadavg()}
        one = {**env, "OMP_NUM_THREADS": "1"}  # federate on one torch thread: immune to a busy machine's spinning
        for k in range(args.repeats):  # interleaved, so that both see the same machine load
            res["federate_s"].append(round(timed(cli + ["federate", merged, "-o", str(tmp / f"fed{k}"), "-q",
                                                        *common], env), 2))
            res["federate_1thread_s"].append(round(timed(cli + ["federate", merged, "-o", str(tmp / f"fed1t{k}"),
                                                                "-q", *common], one), 2))
            out = tmp / f"dep{k}"
            res["deploy_s"].append(round(timed(cli + ["deploy", *sites, "-o", str(out), *common, "--poll-interval",
                                                      str(args.poll_interval)], env), 2))
            res["deploy_timings"].append(json.loads((out / "logs" / "deploy.json").read_text())["timings"])
            print(f"repeat {k + 1}: federate {res['federate_s'][-1]:.1f} s (1 thread {res['federate_1thread_s'][-1]:.1f} s), deploy {res['deploy_s'][-1]:.1f} s "
                  f"({res['deploy_timings'][-1]})", flush=True)
        fed, dep = statistics.median(res["federate_s"]), statistics.median(res["deploy_s"])
        fed1 = statistics.median(res["federate_1thread_s"])
        res.update(federate_median_s=fed, federate_1thread_median_s=fed1, deploy_median_s=dep,
                   ratio=round(dep / fed, 2), ratio_vs_1thread=round(dep / fed1, 2))
        if args.stock_rounds:
            out = tmp / "stock"
            t = timed(cli + ["deploy", *sites, "-o", str(out), "--heldout", HELDOUT, "--rounds",
                             str(args.stock_rounds), "--isolation", "subprocess", "--poll-interval", "3"], env)
            res["stock"] = {"rounds": args.stock_rounds, "whole_s": round(t, 2),
                            "timings": json.loads((out / "logs" / "deploy.json").read_text())["timings"]}
        res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_after": os.getloadavg()}
        print(json.dumps({k: v for k, v in res.items() if k != "deploy_timings"}, indent=1))
        name = f"deploy-3sites-{args.rounds}r-d{args.dim}.json"
        Path(__file__).parent.joinpath("results", name).write_text(json.dumps(res, indent=2))
        print(f"ratio deploy / federate (medians of {args.repeats}): {res['ratio']} (vs federate on 1 thread: "
              f"{res['ratio_vs_1thread']})  -> bench/results/{name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
