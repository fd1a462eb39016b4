"""`--log tensorboard,mlflow,wandb` (federated/tracking.py): each tracker's own files, read back with its own
reader (TensorBoard's EventAccumulator, MlflowClient on the run folder's SQLite store, W&B's offline run file read
record by record with wandb's protobuf schema) hold exactly the numbers of metrics.parquet and summary.json.

One federate run with all three trackers is shared by the read-back tests (module scope: mlflow and wandb are slow
to import). W&B never touches the network here: WANDB_MODE=offline, WANDB_SILENT, no login."""
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedclip_cache.errors import ConfigError
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.synthetic import write_synthetic_cache

DOMAINS = {"art": 60, "photo": 50, "sketch": 40}
HARD = dict(dim=16, seed=4, class_sep=0.6, domain_shift=0.5)  # accuracies differ between rounds and clients
CFG = dict(rounds=6, lr=1e-2, hidden=8, batch_size=8)


@pytest.fixture(scope="module")
def offline_wandb():
    """W&B offline and silent for this module (no network, no login), restored afterwards."""
    keep = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    os.environ.pop("WANDB_API_KEY", None)
    yield
    for k, v in keep.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "c", DOMAINS, 4, **HARD)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache, offline_wandb):
    """A federate run folder (3 held-out experiments, lazy evaluation: test/held-out rows only at some rounds)
    sent to all three trackers."""
    from fedclip_cache.federated.results import federate

    out = tmp_path_factory.mktemp("runs") / "myrun"
    federate(str(cache), FederateConfig(**CFG, log="tensorboard,mlflow,wandb"), out=out, plots=True)
    return out


def expected(run: Path) -> dict:
    """Per experiment, {(metric, round): value} computed from metrics.parquet and summary.json with pandas (the
    tracker's own code is not used)."""
    df = pq.read_table(run / "metrics.parquet").to_pandas()
    comm = json.loads((run / "summary.json").read_text())["communication"]
    out = {}
    for exp, rows in df.groupby("experiment"):
        want = {}
        for r in rows.itertuples():
            want[(f"{r.split}/acc/{r.client}", r.round)] = r.accuracy
            want[(f"{r.split}/loss/{r.client}", r.round)] = r.loss
        for (rnd, split), g in rows.groupby(["round", "split"]):
            want[(f"{split}/acc_mean", rnd)] = g.accuracy.mean()
            want[(f"{split}/loss_mean", rnd)] = g.loss.mean()
        for rnd in rows["round"].unique():
            want[("comm/bytes", rnd)] = 2 * comm["bytes_up_per_round"] * rnd + comm["prototype_bytes_once"]
        out[exp] = want
    return out


def summary_expected(run: Path, exp: str) -> dict:
    s = json.loads((run / "summary.json").read_text())
    e = next(x for x in s["experiments"] if x["experiment"] == exp)
    want = {"best/round": e["best"]["round"], "best/heldout": e["best"]["heldout"],
            "best/test_mean": e["best"]["test_mean"], "best/val_mean": e["best"]["val_mean"],
            "last/heldout": e["last"]["heldout"], "comm/bytes_total": s["communication"]["bytes_total"]}
    want.update({f"best/test/{c}": v for c, v in e["best"]["test"].items()})
    return want


def test_expected_numbers_are_not_trivial(tracked):
    want = expected(tracked)
    assert len(want) == 3  # one tracked run per held-out experiment
    values = [v for w in want.values() for (k, _), v in w.items() if "/acc/" in k]
    assert len(set(np.round(values, 6))) > 3  # accuracies differ (equal numbers would prove little)
    df = pq.read_table(tracked / "metrics.parquet").to_pandas()
    assert set(df[df.split == "heldout"]["round"]) != set(df["round"])  # lazy: held-out not scored every round


def test_tensorboard_event_files_equal_metrics_parquet(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for exp, want in expected(tracked).items():
        ea = EventAccumulator(str(tracked / "tb" / exp), size_guidance={"scalars": 0})
        ea.Reload()
        got = {(tag, ev.step): ev.value for tag in ea.Tags()["scalars"] for ev in ea.Scalars(tag)}
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (exp, key)
        rounds = {k for k in got if "/" in k[0] and not k[0].startswith(("best/", "last/", "comm/bytes_total"))}
        assert rounds == set(want)  # nothing more per round (an unscored row is left out, never a NaN or 0)
        for key, value in summary_expected(tracked, exp).items():  # the hparams' summary metrics
            assert got[(key, 0)] == pytest.approx(value, rel=1e-6), (exp, key)


def test_mlflow_store_equals_metrics_parquet(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("myrun")  # grouped by the run folder's name
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    want_all = expected(tracked)
    assert set(runs) == set(want_all)
    for name, want in want_all.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["experiment"] == name and run.data.tags["group"] == "myrun"
        assert run.data.params["lr"] == "0.01" and run.data.params["hidden"] == "8"
        assert "log" not in run.data.params  # where the numbers go is not a hyper-parameter
        got = {}
        for key in {k for k, _ in want}:
            got.update({(key, m.step): m.value for m in client.get_metric_history(run.info.run_id, key)})
        assert got == pytest.approx(want, rel=1e-12)
        for key, value in summary_expected(tracked, name).items():
            assert run.data.metrics[f"summary/{key}"] == pytest.approx(value, rel=1e-12)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
            {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"summary.json", "config.json", "plots/accuracy_vs_round.png"} <= arts
    assert not (Path.cwd() / "mlruns").exists()  # nothing outside the run folder


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file: a 7-byte header (':W&B', magic, version), then LevelDB-log blocks
    of 32 KiB holding records (crc32 4 bytes, length 2, type 1: full / first / middle / last), each a
    wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_wandb_offline_run_files_equal_metrics_parquet(tracked):
    runs = sorted((tracked / "wandb").glob("offline-run-*/run-*.wandb"))
    want_all = expected(tracked)
    assert len(runs) == len(want_all)
    seen = set()
    for f in runs:
        recs = wandb_records(f)
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        name = run.display_name
        seen.add(name)
        assert run.run_group == "myrun" and run.project == "fedclip-cache"
        assert f"experiment={name}" in list(run.tags)
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["lr"] == 0.01 and config["hidden"] == 8 and "log" not in config
        got = {}
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                step = r.history.step.num
                for i in r.history.item:
                    key = i.key or "/".join(i.nested_key)
                    if not key.startswith("_"):
                        got[(key, step)] = json.loads(i.value_json)
        assert got == pytest.approx(want_all[name], rel=1e-12)
        summary = {}
        for r in recs:
            if r.WhichOneof("record_type") == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        for key, value in summary_expected(tracked, name).items():
            assert summary[f"summary/{key}"] == pytest.approx(value, rel=1e-12)
        assert (f.parent / "files" / "summary.json").is_file()
    assert seen == set(want_all)


def test_unknown_tracker_and_log_without_run_folder_are_one_line_errors(cache):
    from fedclip_cache.federated.results import federate

    with pytest.raises(ConfigError, match=r"--log 'tensorboard,neptune': unknown tracker 'neptune'"):
        FederateConfig(log="tensorboard,neptune").validate()
    with pytest.raises(ConfigError, match=r"needs a run folder \(-o RUN\)"):
        federate(str(cache), FederateConfig(**CFG, log="tensorboard"))


def test_missing_extra_is_refused_before_the_run_starts(cache, tmp_path, monkeypatch):
    import importlib.util

    from fedclip_cache.federated.results import federate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--log wandb: the wandb package is not installed; pip install "
                                          r"'fedclip-cache\[wandb\]'"):
        federate(str(cache), FederateConfig(**CFG, log="tensorboard,wandb"), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_failing_tracker_never_costs_the_run_folder(cache, tmp_path, monkeypatch, capsys):
    from fedclip_cache.federated import tracking
    from fedclip_cache.federated.results import federate
    from fedclip_cache.federated.runfolder import check_readable

    calls = []

    def boom(self, rnd, metrics):
        calls.append(rnd)
        raise RuntimeError("tracking server gone")

    monkeypatch.setattr(tracking.Mlflow, "log_round", boom)
    monkeypatch.setattr(tracking.Mlflow, "_client", lambda self: object())  # no store needed to fail
    monkeypatch.setattr(tracking.Mlflow, "open", lambda self, info: None)
    out = tmp_path / "run"
    summary = federate(str(cache), FederateConfig(**CFG, log="mlflow,tensorboard"), out=out)
    err = capsys.readouterr().err
    assert err.count("warning: --log mlflow: log_round failed (RuntimeError: tracking server gone)") == 1
    assert len(calls) == 1  # dropped after its first failure
    assert json.loads((out / "state.json").read_text())["state"] == "complete"
    assert check_readable(out, "federate") == []
    assert json.loads((out / "summary.json").read_text()) == summary
    assert len(list((out / "tb").glob("*/*/events.*"))) >= 3  # the other tracker got its runs


def test_tracking_options_are_not_a_points_identity(cache, tmp_path, offline_wandb):
    from fedclip_cache.sweep import grid_field, point_id, sweep

    assert point_id(FederateConfig(log="tensorboard", mlflow_uri="http://x")) == point_id(FederateConfig())
    with pytest.raises(ConfigError, match=r"--grid key 'log': tracking is not a grid option"):
        grid_field("log")
    out = tmp_path / "sw"
    res = sweep(str(cache), FederateConfig(**CFG, heldout=["art"], log="tensorboard"), {"hidden": [4, 8]}, [0], out)
    assert res["ran"] == 2
    points = sorted(p.name for p in (out / "points").iterdir())
    # one tracked run per point x experiment, named POINT/experiment, tagged with its grid value
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for p in points:
        hidden = json.loads((out / "points" / p / "config.json").read_text())["federate"]["hidden"]
        ea = EventAccumulator(str(out / "tb" / p / "heldout=art" / "seed0"))
        ea.Reload()
        df = pq.read_table(out / "points" / p / "metrics.parquet").to_pandas()
        last = df[(df.split == "heldout")].sort_values("round").iloc[-1]
        ev = {e.step: e.value for e in ea.Scalars("heldout/acc/art")}
        assert ev[int(last["round"])] == pytest.approx(last.accuracy, rel=1e-6)
        from tensorboard.plugins.hparams import plugin_data_pb2

        content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hp["tag/hidden"].string_value == str(hidden) and hp["hidden"].number_value == hidden
    # another --log on the same folder: the same sweep, nothing re-run
    again = sweep(str(cache), FederateConfig(**CFG, heldout=["art"]), {"hidden": [4, 8]}, [0], out)
    assert again["ran"] == 0 and again["done"] == 2


def test_pipeline_key_log_is_checked_before_any_stage(tmp_path, monkeypatch):
    import importlib.util

    from fedclip_cache.pipeline import prepare, run

    p = tmp_path / "p.toml"
    p.write_text('[federate]\nrounds = 2\nlog = "tensorboard,neptune"\n')
    with pytest.raises(ConfigError, match=r"p\.toml: federate\.log 'tensorboard,neptune': unknown tracker 'neptune'"):
        prepare(p)
    p.write_text('[federate]\nrounds = 2\nlog = "wandb"\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"federate\.log wandb: the wandb package is not installed"):
        run(p, None, base_dir=tmp_path)  # refused before the (missing) cache is even looked at
    assert not (tmp_path / "runs").exists()
