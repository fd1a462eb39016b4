"""`simulate --log` / `deploy --log`: the ServerApp sends its complete run folder to the trackers (the same code as
`federate --log`: federated/tracking.py); a tracker whose package is missing is refused before Ray starts. The
end-to-end run starts a local Ray instance and is marked `slow`."""
import json

import pyarrow.parquet as pq
import pytest

from fedclip_cache.errors import ConfigError
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.synthetic import write_synthetic_cache

DOMAINS = {"art": 60, "photo": 50, "sketch": 40}
HARD = dict(dim=16, seed=4, class_sep=0.6, domain_shift=0.5)


def test_simulate_refuses_a_missing_tracker_before_ray_starts(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    import importlib.util

    from fedclip_cache.launch.simulate import simulate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cache = write_synthetic_cache(tmp_path / "c", DOMAINS, 4, **HARD)
    cfg = FederateConfig(rounds=2, hidden=8, heldout=["sketch"], log="mlflow").validate()
    with pytest.raises(ConfigError, match=r"--log mlflow: the mlflow package is not installed; pip install "
                                          r"'fedclip-cache\[mlflow\]'"):
        simulate([str(cache)], tmp_path / "sim", cfg, num_cpus=2)
    assert not (tmp_path / "sim" / "state.json").exists()


@pytest.mark.slow
def test_simulated_serverapp_sends_its_run_folder_to_tensorboard(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedclip_cache.launch.simulate import simulate

    cache = write_synthetic_cache(tmp_path / "c", DOMAINS, 4, **HARD)
    cfg = FederateConfig(rounds=3, lr=1e-2, hidden=8, batch_size=8, heldout=["sketch"], seed=1, curves=True,
                         log="tensorboard").validate()
    simulate([str(cache)], tmp_path / "sim", cfg, num_cpus=2)
    run = tmp_path / "sim"
    assert json.loads((run / "state.json").read_text())["state"] == "complete"
    df = pq.read_table(run / "metrics.parquet").to_pandas()
    ea = EventAccumulator(str(run / "tb" / "heldout=sketch" / "seed1"), size_guidance={"scalars": 0})
    ea.Reload()
    got = {(tag, ev.step): ev.value for tag in ea.Tags()["scalars"] for ev in ea.Scalars(tag)}
    assert len(df) == 3 * 5  # curves: every round, 2 clients x (val, test) + the held-out domain
    for r in df.itertuples():
        assert got[(f"{r.split}/acc/{r.client}", r.round)] == pytest.approx(r.accuracy, rel=1e-6)
        assert got[(f"{r.split}/loss/{r.client}", r.round)] == pytest.approx(r.loss, rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert got[("best/heldout", 0)] == pytest.approx(summary["experiments"][0]["best"]["heldout"], rel=1e-6)
