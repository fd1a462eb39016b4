"""Wall time of one small federation three ways on the same data and seed: in-process `federate` (one cache of all
sites), `simulate` (Flower's simulation engine, Ray, per-site caches) and `deploy` (SuperLink + one site process per
cache on localhost). 3 sites of 60 synthetic 16-d images, held-out sketch, 5 rounds. Start-up included.

    PYTHONPATH=src python bench/bench_simulate.py [ROUNDS]
"""
import json
import sys
import tempfile
import time
from pathlib import Path

from fedclip_cache.cache.reader import open_cache
from fedclip_cache.launch.deploy import deploy
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.results import federate
from fedclip_cache.launch.simulate import simulate, write_domain_cache
from fedclip_cache.synthetic import write_synthetic_cache

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
merged = write_synthetic_cache(tmp / "merged", {"art": 60, "photo": 60, "sketch": 60}, 4, dim=16, seed=4,
                               class_sep=0.6, domain_shift=0.5)
fc = open_cache(merged)
sites = [str(write_domain_cache(fc, d, tmp / f"site-{d}")) for d in ("art", "photo", "sketch")]
cfg = FederateConfig(rounds=rounds, hidden=8, lr=1e-2, batch_size=8, heldout=["sketch"]).validate()
quiet = lambda m: None  # noqa: E731
times = {}
t = time.perf_counter(); fed = federate(str(merged), cfg, out=tmp / "fed"); times["federate"] = time.perf_counter() - t
t = time.perf_counter(); sim = simulate(sites, tmp / "sim", cfg, log=quiet); times["simulate"] = time.perf_counter() - t
t = time.perf_counter(); dep = deploy(sites, tmp / "dep", cfg, log=quiet); times["deploy"] = time.perf_counter() - t
best = {k: s["experiments"][0]["best"] for k, s in (("federate", fed), ("simulate", sim["summary"]),
                                                    ("deploy", dep["summary"]))}
print(json.dumps({"rounds": rounds, "wall_s": {k: round(v, 1) for k, v in times.items()},
                  "same_best": best["federate"] == best["simulate"] == best["deploy"]}, indent=1))
