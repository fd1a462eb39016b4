"""Pipelines: TOML -> extract -> federate -> sweep, overrides, unknown keys; dataset layout warnings."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedclip_cache.cli import app
from fedclip_cache.cache.datasets import DATASETS, check
from fedclip_cache.federated.config import ConfigError
from fedclip_cache.pipeline import load
from fedclip_cache.synthetic import write_image_folder

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["pacs", "vlcs", "officehome", "domainnet"])
def test_shipped_pipelines_load_with_paper_settings(name):
    cfg = load(REPO / "pipelines" / f"{name}.toml")
    assert cfg["extract"]["model"] == "ViT-B-32" and cfg["extract"]["pretrained"] == "openai"
    assert cfg["extract"]["templates"] == ["a picture of a {}"]
    f = cfg["federate"]
    assert (f["lr"], f["batch_size"], f["rounds"], f["weight_decay"], f["split"]) == (5e-5, 32, 200, 0.2,
                                                                                       [0.6, 0.2, 0.2])
    assert cfg["sweep"]["grid"]["hidden"] == [32, 64, 128, 256, 512]
    assert cfg["pipeline"]["dataset"] in DATASETS


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[federate]\nrounds = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key federate.learning_rate"):
        load(p)
    p.write_text("[federat]\nrounds = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[federat\]"):
        load(p)
    with pytest.raises(ConfigError, match="unknown key extract.modle"):
        load(REPO / "pipelines" / "pacs.toml", ["extract.modle=x"])
    assert load(REPO / "pipelines" / "pacs.toml", ["federate.rounds=7"])["federate"]["rounds"] == 7


def test_run_pipeline_end_to_end_and_reuse_cache(tmp_path, tiny_model):
    cfg_json, ckpt = tiny_model
    data = write_image_folder(tmp_path / "data", per_class=6)
    p = tmp_path / "tiny.toml"
    p.write_text(f"""
[pipeline]
name = "tiny"
cache = "cache"
out = "out"
[extract]
model_config = "{cfg_json}"
pretrained = "{ckpt}"
workers = 0
[federate]
rounds = 2
lr = 1e-3
[sweep]
grid = {{ hidden = [4, 8] }}
seeds = [0, 1]
""")
    args = ["run", str(p), "--data", str(data), "--base-dir", str(tmp_path)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["counts"]["images"] == 54
    s = json.loads((tmp_path / "out" / "federate" / "summary.json").read_text())
    assert [e["heldout"] for e in s["experiments"]] == ["art", "photo", "sketch"] and s["rounds"] == 2
    assert (tmp_path / "out" / "sweep" / "summary.md").read_text().count("±") == 2 * 4
    r = runner.invoke(app, args + ["--set", "federate.rounds=1", "--no-sweep"])
    assert r.exit_code == 0 and "extracted 0 images" in r.output  # --data given: incremental, nothing to do
    assert json.loads((tmp_path / "out" / "federate" / "summary.json").read_text())["rounds"] == 1
    no_data = ["run", str(p), "--base-dir", str(tmp_path), "--no-sweep"]
    r = runner.invoke(app, no_data)
    assert r.exit_code == 0 and "re-using cache" in r.output


def test_dataset_layout_warnings(tmp_path, model_args):
    warns = check("PACS", {"art_painting": 2048, "cartoon": 10, "photo": 1670}, set(DATASETS["PACS"]["classes"]))
    assert any("'cartoon' has 10 images, expected 2,344" in w for w in warns)
    assert any("'sketch' is missing" in w for w in warns)
    assert check(None, {"a": 1, "b": 2}, {"x"}) == []
    # recognised by default only when the domain set matches exactly: photo + sketch is not "a broken PACS"
    assert check(None, {"photo": 5, "sketch": 5}, {"dog"}) == []
    full = dict(DATASETS["PACS"]["domains"], cartoon=10)
    assert any("'cartoon' has 10 images" in w for w in check(None, full, set(DATASETS["PACS"]["classes"])))
    root = write_image_folder(tmp_path / "d", domains=("photo", "sketch", "cartoon"), classes=("dog", "cat"))
    r = runner.invoke(app, ["extract", str(root), str(tmp_path / "c"), *model_args, "--workers", "0", "-q"])
    assert r.exit_code == 0 and "PACS" not in r.output
    r = runner.invoke(app, ["extract", str(root), str(tmp_path / "c"), *model_args, "--workers", "0", "-q",
                            "--dataset", "PACS"])
    assert r.exit_code == 0
    assert "PACS: domain 'art_painting' is missing" in r.output and "classes differ" in r.output
