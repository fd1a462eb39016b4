"""`make demo`: the whole pipeline on real images and a real pretrained encoder, offline.

    python data/demo.py [--out demo-out] [--per-class 30] [--rounds 200] [--tiny]

1. builds the four-domain digits benchmark (data/build_digits.py) from images inside PyPI packages,
2. converts the ImageNet-trained EfficientNet-Lite0 into an open_clip local-dir model (data/convert_efficientnet.py),
3. `extract`s every image once,
4. `federate`s leave-one-domain-out: prototype-only (no training), FedCLIP adapter, local and central baselines
   (prototype head: this encoder's text tower is untrained) and, labelled as such, FedCLIP with the text head,
5. `sweep`s the adapter size over seeds, writes tables and PNG plots, and says where everything is.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.rule import Rule  # noqa: E402
from rich.table import Table  # noqa: E402

import build_digits  # noqa: E402
import convert_efficientnet  # noqa: E402
from fedclip_cache import ExtractConfig, ModelSpec, open_cache  # noqa: E402
from fedclip_cache import extract  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402

# The demo encoder's logit_scale is open_clip's untrained initial value (1/0.07); its text tower is random too.
# Train with the official FedCLIP constant instead, as the demo's published numbers were.
DEMO_LOGIT_SCALE = 100.0
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.plots import run_plots  # noqa: E402
from fedclip_cache.report import render_cache_summary, cache_summary, render_sweep  # noqa: E402
from fedclip_cache.cli import output_width  # noqa: E402
from fedclip_cache.sweep import sweep  # noqa: E402

console = Console(width=output_width())  # tables at full width in a log (make demo | tee, CI): rows stay apart


def rule(title: str) -> None:
    """A section heading as wide as a terminal would show it (the console may be 'full width' in a log)."""
    console.print(Rule(title), width=min(console.width, 100))

RUNS = [  # (name, algo, head, note)
    ("prototype-only", "zeroshot", "prototype", "no training: nearest class mean of frozen features"),
    ("fedclip", "fedclip", "prototype", "FedCLIP adapter, FedAvg (official optimiser)"),
    ("local", "local", "prototype", "each client alone, no communication"),
    ("central", "central", "prototype", "all training data pooled (upper bound)"),
    ("fedclip-text-head", "fedclip", "text", "text head of an UNTRAINED text tower: not meaningful"),
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sweep-hidden", default="32,128,512")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests use it)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.per_class, a.rounds, a.sweep_hidden, a.seeds = 2, 2, "8,16", "0"
    out = Path(a.out)
    t_start = time.perf_counter()
    timings = {}

    t = time.perf_counter()
    digits = out / "digits"
    if not (digits / "mnistm").is_dir():
        rule("1. building the digits benchmark")
        build_digits.build(digits, per_class=a.per_class)
    timings["build data"] = time.perf_counter() - t

    t = time.perf_counter()
    enc = out / "efficientnet-lite0-clip"
    if not (enc / "open_clip_pytorch_model.bin").is_file():
        rule("2. converting EfficientNet-Lite0 to an open_clip local-dir model")
        convert_efficientnet.convert(enc)
    timings["convert encoder"] = time.perf_counter() - t

    rule("3. extract (frozen encoder, once)")
    t = time.perf_counter()
    cache_dir = out / "cache"
    rep = extract(ExtractConfig(source=str(digits), out=str(cache_dir), model=ModelSpec(model=f"local-dir:{enc}"),
                                batch_size=64, progress=not a.tiny))
    timings["extract"] = time.perf_counter() - t
    console.print(f"+{rep.embedded} embedded, {rep.already_cached} already cached, {len(rep.skipped)} skipped "
                  f"({rep.seconds:.1f}s)")
    cache = open_cache(cache_dir)
    render_cache_summary(cache_summary(cache), console)

    rule(f"4. federate: leave-one-domain-out, {a.rounds} rounds, official optimiser")
    t = time.perf_counter()
    results = {}
    for name, algo, head, note in RUNS:
        s = federate(cache, FederateConfig(algo=algo, head=head, rounds=a.rounds, logit_scale=DEMO_LOGIT_SCALE), out=out / "runs" / name)
        run_plots(out / "runs" / name)
        results[name] = (s, note)
    timings["federate"] = time.perf_counter() - t
    table = Table(title="digits LODO accuracy (%) at the selected round (best mean validation)")
    for col in ("run", "head", *cache.domain_names, "held-out mean", "clients' test", "params"):
        table.add_column(col, justify="left" if col in ("run", "head") else "right")
    for name, (s, _) in results.items():
        by = {e["heldout"]: e["best"]["heldout"] for e in s["experiments"]}
        table.add_row(name, s["head"], *(f"{100 * by[d]:.1f}" for d in cache.domain_names),
                      f"{100 * s['mean']['heldout_best']:.1f}", f"{100 * s['mean']['test_mean_best']:.1f}",
                      f"{s['communication']['trainable_params']:,}")
    console.print(table)
    for name, (_, note) in results.items():
        console.print(f"  {name}: {note}")

    rule("5. sweep: adapter size x seeds")
    t = time.perf_counter()
    hidden = [int(h) for h in a.sweep_hidden.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    sw = sweep(cache_dir, FederateConfig(head="prototype", rounds=a.rounds, logit_scale=DEMO_LOGIT_SCALE), {"hidden": hidden}, seeds,
               out / "sweep")
    timings["sweep"] = time.perf_counter() - t
    render_sweep(sw, console)
    total = time.perf_counter() - t_start
    console.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    console.print(f"outputs under {out}/: digits/ (images), efficientnet-lite0-clip/ (encoder), cache/, "
                  f"runs/<name>/ (summary.json, metrics.parquet, plots/), sweep/ (summary.md, results.parquet, "
                  f"plots/accuracy_vs_params.png ...)")
    return {"results": {k: v[0] for k, v in results.items()}, "sweep": sw, "timings": timings}


if __name__ == "__main__":
    main()
