"""Sweeps: one row per run, correct mean ± std, resumability, widening, plots, report."""
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fedclip_cache.cli import app
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.sweep import parse_grid, sweep
from fedclip_cache.synthetic import write_synthetic_cache

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "c", {"a": 80, "b": 70, "c": 60}, 4, dim=32,
                                 seed=3, class_sep=0.25, domain_shift=0.5)


def test_grid_parsing_and_errors():
    g = parse_grid(["hidden=8,16", "lr=1e-3;algo=fedclip,local"])
    assert g == {"hidden": [8, 16], "lr": [1e-3], "algo": ["fedclip", "local"]}
    with pytest.raises(ConfigError, match="'hiden' is not a federate option"):
        parse_grid(["hiden=8"])
    with pytest.raises(ConfigError, match="not a valid int"):
        parse_grid(["hidden=big"])
    with pytest.raises(ConfigError, match="use --seeds"):
        parse_grid(["seed=1,2"])


def test_sweep_rows_mean_std_resume_and_widen(cache, tmp_path):
    out = tmp_path / "sw"
    base = FederateConfig(rounds=3, lr=1e-3)
    res = sweep(cache, base, {"hidden": [4, 8]}, [0, 1], out)
    assert res["ran"] == 2
    df = res["table"].to_pandas()
    # one row per point x seed x held-out run x (held-out domain + each training client's test split)
    assert len(df) == 2 * 2 * 3 * (1 + 2)
    held = df[df["split"] == "heldout"]
    assert len(held) == 2 * 2 * 3
    for rec in res["summary"]:
        sub = held[held["hidden"] == rec["hidden"]]
        for dom in ("a", "b", "c"):
            vals = sub[sub["target"] == dom]["acc_best"].to_numpy()
            assert len(vals) == 2
            assert rec[dom]["mean"] == pytest.approx(vals.mean()) and rec[dom]["std"] == pytest.approx(vals.std(ddof=1))
        per_seed = sub.groupby("seed")["acc_best"].mean().to_numpy()
        assert rec["avg"]["mean"] == pytest.approx(per_seed.mean())
    assert [r["params"] for r in res["summary"]] == [32 * 4 * 2 + 4 + 32, 32 * 8 * 2 + 8 + 32]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "points").glob("*/summary.json")}
    again = sweep(cache, base, {"hidden": [4, 8]}, [0, 1], out)
    assert again["ran"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "points").glob("*/summary.json")} == mtimes
    wider = sweep(cache, base, {"hidden": [4, 8, 16]}, [0, 1], out)
    assert wider["ran"] == 1 and len(wider["summary"]) == 3
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    for name in ("accuracy_vs_params.png", "accuracy_vs_round.png", "communication_vs_accuracy.png"):
        png = out / "plots" / name
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    md = (out / "summary.md").read_text()
    assert md.count("\n") == 2 + 3 and "±" in md
    assert len((out / "summary.csv").read_text().strip().splitlines()) == 4
    assert pq.read_table(out / "results.parquet").num_rows == 3 * 2 * 3 * 3


def test_sweep_seeds_train_together_and_match_single_runs(cache, tmp_path):
    from fedclip_cache.federated.results import federate

    res = sweep(cache, FederateConfig(rounds=3, lr=1e-3, heldout=["a"]), {"hidden": [8]}, [0, 5], tmp_path / "s")
    df = res["table"].to_pandas()
    for seed in (0, 5):
        single = federate(cache, FederateConfig(rounds=3, lr=1e-3, hidden=8, heldout=["a"], seed=seed))
        row = df[(df["seed"] == seed) & (df["split"] == "heldout")]
        assert row["acc_best"].iloc[0] == pytest.approx(single["experiments"][0]["best"]["heldout"])
        assert row["best_round"].iloc[0] == single["experiments"][0]["best"]["round"]


def test_cli_sweep_and_report(cache, tmp_path):
    out = tmp_path / "cli"
    r = runner.invoke(app, ["sweep", str(cache), "-o", str(out), "--grid", "algo=fedclip,local", "--seeds", "0,1",
                            "--rounds", "2", "--heldout", "a", "-q"])
    assert r.exit_code == 0, r.output
    assert "2 grid point(s) trained now" in r.output
    r = runner.invoke(app, ["sweep", str(cache), "-o", str(out), "--grid", "algo=fedclip,local", "--seeds", "0,1",
                            "--rounds", "2", "--heldout", "a", "-q"])
    assert "0 grid point(s) trained now, 2 re-used" in r.output
    (out / "plots" / "accuracy_vs_params.png").unlink()
    r = runner.invoke(app, ["report", str(out), "--format", "json"])
    assert r.exit_code == 0
    summary = json.loads(r.output)
    assert [s["algo"] for s in summary] == ["fedclip", "local"] and summary[0]["seeds"] == 2
    assert (out / "plots" / "accuracy_vs_params.png").is_file()
    r = runner.invoke(app, ["report", str(out), "--format", "md"])
    assert r.output.startswith("| algo") and r.output.count("\n") == 4
    run = tmp_path / "run"
    r = runner.invoke(app, ["federate", str(cache), "--rounds", "2", "-o", str(run), "-q"])
    assert r.exit_code == 0 and (run / "plots" / "accuracy_vs_round.png").is_file()
    r = runner.invoke(app, ["report", str(run), "--format", "csv"])
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("experiment,best_round") and len(lines) == 4
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code != 0 and "neither a run folder" in str(r.exception)
