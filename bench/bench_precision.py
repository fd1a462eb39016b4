"""Benchmark: ``federate --precision bf16`` against fp32 (not a test).

    python bench/bench_precision.py                      # every part, 2 threads
    python bench/bench_precision.py --parts peak,adapter,prompt --reps 5
    python bench/bench_precision.py --parts accuracy_digits,accuracy_pacs --pacs-rounds 10 --digits-rounds 30

Parts (each result carries the 1-minute load average read when it was measured: the cores are shared):

* ``peak``: this machine's matmul limit, torch.matmul of two 2048 x 2048 matrices, fp32 and bf16 (best of --reps).
* ``adapter``: FedCLIP local training (h = 512, D = 512, batch 32, the 3 training clients of a PACS-shaped split
  side by side): seconds per step and achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode over a step,
  forward and backward), fp32 and bf16 interleaved, best of --reps.
* ``prompt``: promptfl local training on a ViT-B-32-sized text tower (random weights: the same compute), 7 classes,
  n_ctx 16, batch 32: the 3 clients side by side (one text pass over their 21 prompts per step, the default) and
  one client at a time, fp32 and bf16 interleaved, best of --reps; GFLOP/s as above.
* ``accuracy_digits``, ``accuracy_pacs``: ``federate`` fedclip, 5 seeds x every held-out domain, fp32 then bf16 back to back, on a synthetic
  cache shaped like the digits demo (4 domains x 300 images, 10 classes, D = 512, prototype head, as the demo) and
  one shaped like PACS (2048/2344/1670/2500 images, 7 classes, D = 512, text head); the per-(seed, held-out) paired
  differences of the selected held-out and test accuracies, against the seed-to-seed spread.

Writes bench/results/precision-<threads>threads.json (parts not run are kept from an earlier file).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PACS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 2500}
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
DIGITS = {"mnist": 300, "optdigits": 300, "fonts": 300, "mnistm": 300}  # data/demo.py: 10 classes x 30 per class
PRECISIONS = ("fp32", "bf16")


def load() -> float:
    return os.getloadavg()[0]


def best_of(fns: dict, reps: int, per: int = 1) -> dict:
    """Seconds per call of each function, interleaved (fn1, fn2, fn1, ...) so that load hits all alike; the first
    pass is a warm-up, then the minimum of ``reps`` (the least disturbed run) and every time."""
    times: dict = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[k].append((time.perf_counter() - t) / per)
    return {k: {"seconds": min(v), "all": [round(x, 5) for x in v]} for k, v in times.items()}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def peak(a) -> dict:
    n = 2048
    mats = {p: [torch.randn(n, n).to(dt) for _ in range(2)] for p, dt in (("fp32", torch.float32),
                                                                         ("bf16", torch.bfloat16))}
    load0 = load()
    r = best_of({p: (lambda m=m: torch.matmul(*m)) for p, m in mats.items()}, a.reps * 2)
    return {p: {"gflops": 2 * n ** 3 / v["seconds"] / 1e9, **v} for p, v in r.items()} | \
        {"size": n, "load_before": load0, "load_after": load()}


def adapter(a) -> dict:
    from fedclip_cache.federated.adapters import ADAPTERS, init_params
    from fedclip_cache.federated.fpenv import flush_denormals
    from fedclip_cache.federated.train import LocalHyper, local_update

    d = h = 512
    kind, lanes, steps = ADAPTERS["fedclip"], 3, 8
    X, Y = torch.randn(4096, d), torch.randint(0, 7, (4096,))
    heads = torch.nn.functional.normalize(torch.randn(lanes, 7, d), dim=-1)
    p0 = {n: v.unsqueeze(0).repeat(lanes, *[1] * v.dim()) for n, v in init_params("fedclip", d, h, 0).items()}
    rng = np.random.default_rng(0)
    sched = [[rng.choice(4096, 32, replace=False) for _ in range(steps)] for _ in range(lanes)]
    hps = {p: LocalHyper(precision=p) for p in PRECISIONS}
    fns = {p: (lambda hp=hp: local_update(kind, p0, X, Y, heads, sched, hp)) for p, hp in hps.items()}
    one = [[s[0]] for s in sched]
    out = {"setup": f"fedclip adapter D={d} h={h}, {lanes} clients side by side, batch 32, contrastive loss"}
    with flush_denormals(True):
        flops = {p: flops_of(lambda hp=hp: local_update(kind, p0, X, Y, heads, one, hp)) for p, hp in hps.items()}
        load0 = load()
        r = best_of(fns, a.reps, steps)
    for p in PRECISIONS:
        out[p] = {"seconds_per_step": r[p]["seconds"], "flops_per_step": flops[p],
                  "gflops": flops[p] / r[p]["seconds"] / 1e9, "all": r[p]["all"]}
    out["speedup_bf16"] = r["fp32"]["seconds"] / r["bf16"]["seconds"]
    return out | {"load_before": load0, "load_after": load()}


def prompt(a) -> dict:
    import open_clip

    from fedclip_cache.federated.fpenv import flush_denormals
    from fedclip_cache.federated.prompts import PromptLearner

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval().requires_grad_(False)
    tok = open_clip.get_tokenizer("ViT-B-32")
    pls = {p: PromptLearner(model, tok, PACS_CLASSES, n_ctx=16, precision=p) for p in PRECISIONS}
    k, steps = 3, 2
    X, Y = torch.randn(32, 512), torch.randint(0, len(PACS_CLASSES), (32,))
    ctx = pls["fp32"].init_ctx(0).unsqueeze(0).repeat(k, 1, 1)
    sched = [[np.arange(32)] * steps] * k
    modes = {f"{p}_{m}": (lambda pl=pl, cap=cap: pl.train(ctx, sched, X, Y, 1e-3, 100.0, 0.9, 5e-4, max_prompts=cap))
             for p, pl in pls.items() for m, cap in (("together", 4096), ("one_at_a_time", len(PACS_CLASSES)))}
    out = {"setup": f"ViT-B-32 text tower (random weights), {k} clients x {len(PACS_CLASSES)} classes, n_ctx 16, "
                    f"{pls['fp32'].length} tokens (truncated), batch 32, PromptFL SGD", "clients": k}
    with flush_denormals(True):
        flops = {p: flops_of(lambda pl=pl: pl.train(ctx, [[np.arange(32)]] * k, X, Y, 1e-3, 100.0, 0.9, 5e-4))
                 for p, pl in pls.items()}
        load0 = load()
        r = best_of(modes, a.reps, steps)
    for name, v in r.items():
        p = name.split("_")[0]
        out[name] = {"seconds_per_step_of_all_clients": v["seconds"], "steps_per_second": k / v["seconds"],
                     "gflops": flops[p] / v["seconds"] / 1e9, "all": v["all"]}
    out["flops_per_step_of_all_clients"] = flops
    out["speedup_bf16_together"] = r["fp32_together"]["seconds"] / r["bf16_together"]["seconds"]
    for p in PRECISIONS:
        out[f"speedup_together_{p}"] = r[f"{p}_one_at_a_time"]["seconds"] / r[f"{p}_together"]["seconds"]
    return out | {"load_before": load0, "load_after": load()}


def accuracy_on(cache, base, seeds) -> dict:
    import dataclasses

    from fedclip_cache.federated.results import federate

    runs = {}
    for p in PRECISIONS:
        load0, t = load(), time.perf_counter()
        s = federate(cache, dataclasses.replace(base, precision=p).validate(), seeds=seeds)
        runs[p] = {"seconds": time.perf_counter() - t, "load_before": load0, "load_after": load(),
                   "heldout": {f"{e['heldout']}/{e['seed']}": e["best"]["heldout"] for e in s["experiments"]},
                   "test_mean": {f"{e['heldout']}/{e['seed']}": e["best"]["test_mean"] for e in s["experiments"]}}
    out = {"runs": runs, "speedup_bf16": runs["fp32"]["seconds"] / runs["bf16"]["seconds"]}
    for key in ("heldout", "test_mean"):
        f32, b16 = (np.array([runs[p][key][k] for k in sorted(runs["fp32"][key])]) for p in PRECISIONS)
        diff = b16 - f32
        # seed-to-seed spread of fp32: per held-out domain, the std over seeds, averaged over domains
        by_dom: dict = {}
        for k, v in runs["fp32"][key].items():
            by_dom.setdefault(k.split("/")[0], []).append(v)
        out[key] = {"fp32_mean": float(f32.mean()), "bf16_mean": float(b16.mean()),
                    "paired_diff_mean": float(diff.mean()), "paired_diff_sd": float(diff.std(ddof=1)),
                    "paired_diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
                    "max_abs_diff": float(np.abs(diff).max()), "pairs": len(diff),
                    "fp32_seed_sd": float(np.mean([np.std(v, ddof=1) for v in by_dom.values()]))}
    return out


def accuracy_digits(a) -> dict:
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.synthetic import write_synthetic_cache

    with tempfile.TemporaryDirectory() as d:
        cache = write_synthetic_cache(Path(d) / "digits", DIGITS, 10, dim=512, seed=1, class_sep=a.class_sep)
        out = accuracy_on(cache, FederateConfig(algo="fedclip", head="prototype", rounds=a.digits_rounds),
                          list(range(5)))
    out["setup"] = (f"synthetic 4 x 300 images, 10 classes, D=512, class_sep {a.class_sep}, fedclip prototype "
                    f"head, {a.digits_rounds} rounds, official optimiser, 5 seeds x 4 held-out domains")
    return out


def accuracy_pacs(a) -> dict:
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.synthetic import write_synthetic_cache

    with tempfile.TemporaryDirectory() as d:
        cache = write_synthetic_cache(Path(d) / "pacs", PACS, len(PACS_CLASSES), dim=512, seed=2,
                                      class_sep=a.class_sep)
        out = accuracy_on(cache, FederateConfig(algo="fedclip", rounds=a.pacs_rounds), list(range(5)))
    out["setup"] = (f"synthetic PACS sizes, 7 classes, D=512, class_sep {a.class_sep}, fedclip text head, "
                    f"{a.pacs_rounds} rounds, official optimiser, 5 seeds x 4 held-out domains")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="peak,adapter,prompt,accuracy_digits,accuracy_pacs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pacs-rounds", type=int, default=10)
    ap.add_argument("--digits-rounds", type=int, default=30)
    ap.add_argument("--class-sep", type=float, default=0.1, help="synthetic class separation (harder below 1)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/precision-<threads>threads.json)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dest = Path(a.out) if a.out else Path(__file__).parent / "results" / f"precision-{a.threads}threads.json"
    out = json.loads(dest.read_text()) if dest.exists() else {}
    out.update(cpu=platform.processor() or platform.machine(), threads=a.threads, torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))
    for part in a.parts.split(","):
        out[part] = globals()[part](a)
        dest.write_text(json.dumps(out, indent=2) + "\n")
        print(part, json.dumps(out[part], indent=2), flush=True)


if __name__ == "__main__":
    main()
