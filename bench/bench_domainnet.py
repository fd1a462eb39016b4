"""Benchmark: `info` and one federate round on a DomainNet-shaped synthetic cache, at 1/10 and full size (not a test).

    python bench/bench_domainnet.py                        # this tree, fix on (default)
    python bench/bench_domainnet.py --keep-denormals       # this tree, denormal flushing off (the opt-out)
    python bench/bench_domainnet.py --src /tmp/base/src --label before   # another source tree (e.g. git archive)

DomainNet's shape: 586,575 rows x 512 (float32: 1.2 GB), 345 classes, six domains. The caches are written once
under bench/out/ (gitignored) by synthetic.write_synthetic_cache and reused. Every measurement runs in a fresh
subprocess under /usr/bin/time -v (wall time and peak RSS of exactly that process). The federate child times each
training step (the interval between consecutive batch_loss calls) so that the growth of the step cost within a
round shows. Writes bench/results/domainnet-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DN = {"clipart": 48129, "infograph": 51605, "painting": 72266, "quickdraw": 172500, "real": 172947, "sketch": 69128}
SIZES = {"tenth": 10, "full": 1}


def ensure_cache(name: str, div: int) -> Path:
    from fedclip_cache.synthetic import write_synthetic_cache

    out = HERE / "out" / f"domainnet-{name}"
    if not (out / "cache.json").exists():
        print(f"writing {out} ...", flush=True)
        write_synthetic_cache(out, {d: n // div for d, n in DN.items()}, 345, dim=512, seed=0)
    return out


def child_federate(cache: str, heldout: str, rounds: int, keep_denormals: bool, features_in: str = "auto") -> None:
    """Runs in the measured subprocess: one federate call, step timings, JSON on the last stdout line."""
    import numpy as np

    t0 = time.perf_counter()
    from fedclip_cache import open_cache
    from fedclip_cache.federated import train
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.results import federate

    stamps: list[float] = []
    orig = train.batch_loss

    def timed_batch_loss(*a, **k):
        stamps.append(time.perf_counter())
        return orig(*a, **k)

    train.batch_loss = timed_batch_loss
    fc = open_cache(cache, features_in=features_in)
    t_open = time.perf_counter() - t0
    kw = {"keep_denormals": True} if keep_denormals else {}
    cfg = FederateConfig(rounds=rounds, heldout=[heldout], **kw)
    t1 = time.perf_counter()
    summary = federate(fc, cfg)
    t_fed = time.perf_counter() - t1
    steps = np.diff(np.array(stamps)) * 1e3  # ms; the last step of each round runs into aggregation: dropped
    n = len(steps)
    tenth = max(1, n // 10)
    print(json.dumps({
        "open_seconds": round(t_open, 2), "federate_seconds": round(t_fed, 2), "steps": n + 1,
        "step_ms_median": round(float(np.median(steps)), 2),
        "step_ms_mean": round(float(np.mean(steps)), 2),
        "step_ms_first_tenth": round(float(np.median(steps[:tenth])), 2),
        "step_ms_last_tenth": round(float(np.median(steps[-tenth:])), 2),
        "train_seconds": round(float(np.sum(steps)) / 1e3, 2),
        "features_in": fc.features_in,
        "heldout_acc": summary["mean"]["heldout_best"]}))


def timed_subprocess(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    out = {"wall_seconds": round(secs, 2), "peak_rss_mib": round(rss_kb / 1024, 1)}
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if last:
        out.update(json.loads(last[-1]))
    return out


CGROUP = Path("/sys/fs/cgroup/memory/fcbench")  # cgroup v1 memory controller (what this machine has)


def mapped_runs(path: Path, rows: int, a, env: dict) -> dict:
    """The full cache in a memory cgroup whose limit leaves the features only half their size: the process's own
    footprint (torch + metadata, ~1 GiB measured) + feature bytes / 2. `auto` must map; `memory` cannot fit."""
    try:
        CGROUP.mkdir(exist_ok=True)
        limit = 2**30 + rows * 512 * 4 // 2
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as e:
        return {"skipped": f"no writable memory cgroup ({e})"}
    for f in ("features.npy", "features.json"):
        (path / f).unlink(missing_ok=True)
    out = {"cgroup_limit_mib": round(limit / 2**20, 1)}

    def run(features_in: str) -> dict:
        child = [sys.executable, __file__, "--child", str(path), a.heldout, str(a.rounds), "0", features_in]
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh"] + child
        oom = (CGROUP / "memory.oom_control").read_text()
        try:
            return timed_subprocess(cmd, env)
        except SystemExit as e:
            killed = (CGROUP / "memory.oom_control").read_text() != oom
            return {"failed": "killed by the cgroup's OOM killer" if killed else str(e).splitlines()[-1][:300]}

    out["auto, first (builds features.npy)"] = run("auto")
    out["auto, warm"] = run("auto")
    out["memory (forced)"] = run("memory")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tenth,full")
    ap.add_argument("--heldout", default="sketch")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep-denormals", action="store_true", help="run with the denormal fix disabled (opt-out)")
    ap.add_argument("--src", default=str(HERE.parent / "src"), help="source tree the measured processes import")
    ap.add_argument("--label", default=None, help="setup label (default: fix / keep-denormals)")
    ap.add_argument("--repeat", type=int, default=1, help="federate runs per size (median reported)")
    ap.add_argument("--skip-info", action="store_true")
    ap.add_argument("--mapped", action="store_true", help="also: the full cache under a data-memory limit of half its "
                                                          "feature bytes (auto -> memory-mapped), built then warm")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    if a.child:
        cache, heldout, rounds, keep, limit = a.child
        child_federate(cache, heldout, int(rounds), keep == "1", limit)
        return
    import numpy as np

    env = dict(os.environ, PYTHONPATH=a.src, HF_HUB_OFFLINE="1")
    label = a.label or ("keep-denormals" if a.keep_denormals else "fix")
    res = {"setup": f"{label}-heldout-{a.heldout}-{a.rounds}r", "src": a.src, "cpu": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "python": sys.executable, "sizes": {}}
    for size in a.sizes.split(","):
        path = ensure_cache(size, SIZES[size])
        rows = sum(n // SIZES[size] for n in DN.values())
        r = {"rows": rows, "feature_mib": round(rows * 512 * 4 / 2**20, 1)}
        if not a.skip_info:
            r["info"] = timed_subprocess([sys.executable, "-m", "fedclip_cache", "info", str(path)], env)
        runs = [timed_subprocess([sys.executable, __file__, "--child", str(path), a.heldout, str(a.rounds),
                                  "1" if a.keep_denormals else "0", "auto"], env) for _ in range(a.repeat)]
        fed = {k: (float(np.median([x[k] for x in runs])) if isinstance(runs[0][k], (int, float)) else runs[0][k])
               for k in runs[0]}
        fed["runs"] = runs if a.repeat > 1 else None
        # 200 rounds: opening once, then each round costs what this one cost (training + evaluation)
        per_round = (fed["federate_seconds"]) / a.rounds
        fed["extrapolated_200_rounds_seconds"] = round(fed["open_seconds"] + 200 * per_round, 0)
        fed["peak_rss_over_feature_bytes"] = round(fed["peak_rss_mib"] / r["feature_mib"], 2)
        r["federate"] = fed
        if a.mapped and size == "full":
            r["mapped"] = mapped_runs(path, rows, a, env)
        res["sizes"][size] = r
        print(json.dumps({size: r}, indent=2), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"domainnet-{res['setup']}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
