"""A deployment's metrics table equals `federate`'s: the same rounds carry test and held-out numbers (the lazy
evaluation rule) and the same rows are NaN, with and without validation data."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("flwr")

from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.federated.recorder import RunRecorder  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.flower.client_app import SiteClient  # noqa: E402
from fedclip_cache.flower.task import federate_config  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402


def metrics(run) -> list[tuple]:
    """(round, client, split, accuracy or None) of the training clients (a shared cache's held-out domain is no
    site here)."""
    t = pq.read_table(run / "metrics.parquet").to_pylist()
    return sorted((r["round"], r["client"], r["split"], None if np.isnan(r["accuracy"]) else round(r["accuracy"], 6))
                  for r in t if r["split"] != "heldout")


@pytest.mark.parametrize("split", [(0.6, 0.2, 0.2), (0.8, 0.0, 0.2)])
def test_deployment_metrics_rows_equal_federates(tmp_path, split, run_sites):
    """Per round, client and split: the same accuracy or the same NaN (without validation data no round
    improves, so only the last round carries test and held-out numbers, in both)."""
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 70, "b": 50, "c": 40}, 3, dim=16, seed=4))
    extra = {"rounds": 3, "split": split}
    _, cfg = federate_config({"cache": cache, "heldout": "a", "lr": 1e-3, "hidden": 8,
                              "split": ",".join(map(str, split)), "rounds": 3})
    rec = RunRecorder(cfg, tmp_path / "deployed")
    co = run_sites([SiteClient(cache, cfg, pid) for pid in range(2)], cfg, rec)
    co.finish()
    federate(cache, FederateConfig(lr=1e-3, hidden=8, heldout=["a"], **extra), out=tmp_path / "run")
    assert metrics(tmp_path / "deployed") == metrics(tmp_path / "run")
    best = [json.loads((tmp_path / d / "summary.json").read_text())["experiments"][0]["best"]["round"]
            for d in ("deployed", "run")]
    assert best[0] == best[1]
