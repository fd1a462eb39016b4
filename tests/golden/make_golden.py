"""Record the summary numbers of a fixed configuration of every pre-registry algorithm (run once, from the commit
before the algorithm registry; the file it writes is the "before" of tests/test_algorithm_registry.py).

    python tests/golden/make_golden.py tests/golden/summaries.json
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.results import federate
from fedclip_cache.synthetic import write_synthetic_cache

SIZES = {"art": 70, "cartoon": 55, "photo": 48, "sketch": 40}
CASES = {
    "fedclip": dict(algo="fedclip"),
    "fedprox": dict(algo="fedprox", mu=0.5),
    "local": dict(algo="local"),
    "central": dict(algo="central"),
    "zeroshot": dict(algo="zeroshot"),
    "fedclip-prototype-ce": dict(algo="fedclip", head="prototype", loss="ce", adapter="residual", hidden=8),
    "local-personal-dirichlet": dict(algo="local", protocol="personal", partition="dirichlet", num_clients=3,
                                     alpha=0.5, weighting="samples"),
    "fedprox-personal-iid-eval2": dict(algo="fedprox", mu=0.1, protocol="personal", partition="iid",
                                       num_clients=2, eval_every=2, adapter="linear"),
}
BASE = dict(rounds=8, batch_size=8, lr=3e-3)


def numbers(summary: dict) -> dict:
    """The numbers a user reads: per experiment and for best/last, the selected round, val mean, test per client
    and mean, held-out; plus the means."""
    out = {"mean": summary["mean"], "experiments": {}}
    for e in summary["experiments"]:
        out["experiments"][e["experiment"]] = {k: e[k] for k in ("best", "last")}
    out["communication"] = {k: summary["communication"][k] for k in
                            ("trainable_params", "bytes_up_per_round", "bytes_total")}
    return out


def continuous(run: Path) -> dict:
    """Continuous numbers that move with any change of the training math (accuracies on small splits do not):
    the sum of the selected/last-round losses and the norms of the final adapter tensors."""
    import pyarrow.parquet as pq
    import torch

    m = pq.read_table(run / "metrics.parquet").to_pandas()
    last = m[m["round"] == m["round"].max()]
    adapter = torch.load(run / "adapter.pt")
    return {"last_round_loss_sum": float(last["loss"].sum()),
            "adapter_norms": {k: float(v.double().norm()) for k, v in sorted(adapter.items())}}


def main(path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_synthetic_cache(Path(tmp) / "c", SIZES, 5, dim=24, seed=7, class_sep=0.6, domain_shift=1.5)
        res = {}
        for name, kw in CASES.items():
            run = Path(tmp) / name
            res[name] = numbers(federate(cache, FederateConfig(**{**BASE, **kw}), out=run, seeds=[0, 1]))
            res[name]["continuous"] = continuous(run)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(path).write_text(json.dumps({"commit": commit, "sizes": SIZES, "base": BASE, "cases": CASES,
                                      "summaries": res}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
