"""Benchmark: the adapter-size sweep locally vs on Ray (not a test).

    python bench/bench_sweep_ray.py [--rounds 40] [--scale 0.25] [--cpus-per-task N]   # local vs --ray auto
    python bench/bench_sweep_ray.py --address HOST:PORT --skip-local                    # points per node

Setup: a PACS-shaped synthetic cache (4 domains at ``--scale`` of PACS's sizes, 7 classes, D = 512), hidden =
32, 64, 128, 256, 512 x seeds 0, 1, 2 x 4 held-out domains (LODO) x ``--rounds`` rounds; five points, each one Ray
task. ``local`` is ``sweep`` in this process (torch's threads: all cores); ``ray`` is the same sweep with
``--ray auto`` (or ``--address``) and ``--cpus-per-task`` (default: all cores, so one point at a time with the
same threads as local: the difference is Ray's overhead). Ray's fixed start-up (connect + the cache check on every
node) is timed apart. Writes bench/results/sweep-ray-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.sweep import nodes_count, read_record, sweep
from fedclip_cache.sweep_ray import RaySession, ray_plan
from fedclip_cache.synthetic import write_synthetic_cache

PACS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
HIDDEN = [32, 64, 128, 256, 512]
SEEDS = [0, 1, 2]


def training_seconds(sweep_dir: Path) -> float:
    """The points' own training-loop time (``summary.json`` ``seconds``): what is left of the wall time is the
    sweep's cost around training (for Ray: start-up, worker processes, opening the cache, results back)."""
    return sum(json.loads(f.read_text())["seconds"] for f in sweep_dir.glob("points/*/summary.json"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--address", default="auto")
    ap.add_argument("--cpus-per-task", type=float, default=float(os.cpu_count() or 1))
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cache = write_synthetic_cache(tmp / "pacs", {d: max(8, int(n * a.scale)) for d, n in PACS.items()}, 7, dim=512,
                                  seed=0)
    base, grid = FederateConfig(rounds=a.rounds), {"hidden": HIDDEN}
    load = os.getloadavg()
    local_s = None
    if not a.skip_local:
        t0 = time.perf_counter()
        sweep(cache, base, grid, SEEDS, tmp / "local")
        local_s = time.perf_counter() - t0
        print(f"local: {local_s:.1f} s", flush=True)
    plan = ray_plan(a.address, a.cpus_per_task)
    t0 = time.perf_counter()  # Ray's fixed cost alone: connect, check the cache on every node, disconnect
    from fedclip_cache.cache.reader import open_cache

    identity = open_cache(cache, load_features=False).identity()
    RaySession(plan, cache, identity, {"allow_incomplete": False, "features_in": "auto"}, []).close()
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sweep(cache, base, grid, SEEDS, tmp / "ray", ray=plan)
    ray_s = time.perf_counter() - t0
    record = read_record(tmp / "ray")
    per_node = nodes_count(record, record["points"])
    print(f"ray: {ray_s:.1f} s (start-up {startup_s:.1f} s); points per node {per_node}", flush=True)
    where = "auto" if a.address == "auto" else "cluster"
    out = {"setup": f"pacs-shaped-x{a.scale:g}-hidden5-seeds3-lodo-{a.rounds}r-{where}-{a.cpus_per_task:g}cpt",
           "address": a.address, "cpus_per_task": a.cpus_per_task, "cores": os.cpu_count(),
           "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
           "points": len(HIDDEN), "local_seconds": None if local_s is None else round(local_s, 2),
           "ray_seconds": round(ray_s, 2), "ray_startup_seconds": round(startup_s, 2), "points_per_node": per_node}
    out["ray_outside_training_seconds"] = round(ray_s - training_seconds(tmp / "ray"), 2)
    if local_s:
        out["local_outside_training_seconds"] = round(local_s - training_seconds(tmp / "local"), 2)
        out["summary_csv_equal"] = ((tmp / "local" / "summary.csv").read_bytes()
                                    == (tmp / "ray" / "summary.csv").read_bytes())
        out["overhead_seconds"] = round(ray_s - local_s, 2)
        out["overhead_percent"] = round(100 * (ray_s - local_s) / local_s, 1)
        out["overhead_per_point_seconds"] = round((ray_s - local_s) / len(HIDDEN), 2)
    print(json.dumps(out, indent=2))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"sweep-ray-{out['setup']}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
