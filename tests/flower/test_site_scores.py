"""A site scores its splits with the loop's own evaluation (one segment of ``loop.EvalPlan``): on a shared cache a
deployment's metrics rows equal ``federate``'s: the same rows, the same accuracies, losses within 1e-9 (the adapters
themselves agree to float32 rounding: the loop trains every lane in one batched pass)."""
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


def test_site_metrics_equal_federate_exactly(tmp_path, run_sites):
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 300, "b": 260, "c": 240}, 5, dim=32, seed=7,
                                      class_sep=0.3))
    opts = {"rounds": 2, "lr": 1e-3, "hidden": 8}
    _, cfg = federate_config({"cache": cache, "heldout": "a", **opts})
    run_sites([SiteClient(cache, cfg, pid) for pid in range(2)], cfg, RunRecorder(cfg, tmp_path / "dep")).finish()
    federate(cache, FederateConfig(heldout=["a"], **opts), out=tmp_path / "run")
    dep = pq.read_table(tmp_path / "dep" / "metrics.parquet").to_pandas()
    run = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pandas()
    key = ["round", "client", "split", "n"]
    run = run[run["split"] != "heldout"].reset_index(drop=True)  # these in-process sites are the training ones
    assert list(dep[key].itertuples(index=False)) == list(run[key].itertuples(index=False))
    assert len(dep) == 8 and 0 < dep["accuracy"].min() < 1
    np.testing.assert_array_equal(dep["accuracy"].to_numpy(), run["accuracy"].to_numpy())
    np.testing.assert_allclose(dep["loss"].to_numpy(), run["loss"].to_numpy(), rtol=1e-9)
