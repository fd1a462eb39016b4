"""Faithfulness of `federate` to the official FedCLIP code: the model's own logit scale from the cache, and the
official split boundaries (train int(.6n), val int(.2n), test int(.2n), the rest dropped and counted)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from fedclip_cache import open_cache
from fedclip_cache.cli import app
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.loop import resolve_logit_scale
from fedclip_cache.federated.protocols import build_experiments, split_indices
from fedclip_cache.federated.results import federate
from fedclip_cache.cache.store import META_FILE, read_meta, write_json
from fedclip_cache.synthetic import write_synthetic_cache

SIZES = {"art": 61, "cartoon": 52, "photo": 33}


def _cache_with_scale(folder, scale):
    path = write_synthetic_cache(folder, SIZES, 4, dim=16, seed=3)
    meta = read_meta(path)
    if scale is None:
        del meta["model"]["logit_scale"]
    else:
        meta["model"]["logit_scale"] = scale
    write_json(path / META_FILE, meta)
    return open_cache(path)


def _per_sample_loss(cache, scale, rows):
    """Cross-entropy of the zero-shot logits at a given scale, straight from the features (no adapter)."""
    x = torch.nn.functional.normalize(torch.from_numpy(cache.features[rows]), dim=-1)
    t = torch.nn.functional.normalize(torch.from_numpy(cache.text_embeddings[0]), dim=-1)
    return torch.nn.functional.cross_entropy(scale * x @ t.T, torch.from_numpy(cache.labels[rows])).item()


def test_logit_scale_comes_from_the_cache_and_the_option_overrides(tmp_path):
    c50 = _cache_with_scale(tmp_path / "c50", 50.0)
    assert resolve_logit_scale(FederateConfig(), c50) == (50.0, "cache (model.logit_scale)")
    assert resolve_logit_scale(FederateConfig(logit_scale=7.0), c50) == (7.0, "--logit-scale")
    # evaluation uses it: the zero-shot held-out loss equals the cross-entropy of 50 * cos
    s = federate(c50, FederateConfig(algo="zeroshot", heldout=["photo"]), out=tmp_path / "run50")
    held = np.flatnonzero(c50.domains == "photo")
    m = pq.read_table(tmp_path / "run50" / "metrics.parquet").to_pandas()
    loss = float(m[m["split"] == "heldout"]["loss"].iloc[0])
    assert loss == pytest.approx(_per_sample_loss(c50, 50.0, held), rel=1e-5)
    assert loss != pytest.approx(_per_sample_loss(c50, 100.0, held), rel=1e-3)
    assert s["logit_scale"] == 50.0 and s["logit_scale_source"] == "cache (model.logit_scale)" 
    assert not any("logit" in n for n in s["notes"])
    cfg = json.loads((tmp_path / "run50" / "config.json").read_text())
    assert cfg["logit_scale_used"] == 50.0 and cfg["federate"]["logit_scale"] is None
    # training uses it too: a different scale trains a different adapter
    a = federate(c50, FederateConfig(rounds=2, lr=1e-2, heldout=["photo"]), out=tmp_path / "a")
    b = federate(c50, FederateConfig(rounds=2, lr=1e-2, heldout=["photo"], logit_scale=50.0), out=tmp_path / "b")
    federate(c50, FederateConfig(rounds=2, lr=1e-2, heldout=["photo"], logit_scale=100.0), out=tmp_path / "c")
    pa, pb, pc = (torch.load(tmp_path / k / "adapter.pt") for k in "abc")
    assert all(torch.equal(pa[n], pb[n]) for n in pa) and a["experiments"] == b["experiments"]
    assert not torch.allclose(pa["w1"], pc["w1"])
    # the CLI option overrides and is recorded
    res = CliRunner().invoke(app, ["federate", str(c50.path), "--algo", "zeroshot", "--heldout", "photo",
                                   "--logit-scale", "20", "-q", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    summ = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summ["logit_scale"] == 20.0 and summ["logit_scale_source"] == "--logit-scale"


def test_logit_scale_fallback_is_noted_and_bad_values_refused(tmp_path):
    c = _cache_with_scale(tmp_path / "none", None)
    s = federate(c, FederateConfig(algo="zeroshot", heldout=["photo"]))
    assert s["logit_scale"] == 100.0 and s["logit_scale_source"].startswith("fallback")
    assert any("records no model logit_scale" in n for n in s["notes"])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"--logit-scale .*(must be > 0|finite)"):
            FederateConfig(logit_scale=bad).validate()
    res = CliRunner().invoke(app, ["federate", str(c.path), "--logit-scale", "-3", "-q"])
    assert res.exit_code != 0 and "--logit-scale" in str(res.exception)
    broken = _cache_with_scale(tmp_path / "broken", "nan")
    with pytest.raises(ConfigError, match="not a finite number > 0"):
        federate(broken, FederateConfig(algo="zeroshot", heldout=["photo"]))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 9, 10, 11, 13, 99, 101, 2048, 2344, 1670, 3929])
def test_split_sizes_are_the_official_boundaries(n):
    idx = np.arange(1000, 1000 + n)
    tr, va, te = split_indices(idx, (0.6, 0.2, 0.2), 0, "dom")
    assert (len(tr), len(va), len(te)) == (int(.6 * n), int(.2 * n), int(.2 * n))
    assert n - len(tr) - len(va) - len(te) in (0, 1, 2)
    parts = np.concatenate([tr, va, te])
    assert len(np.unique(parts)) == len(parts) and np.isin(parts, idx).all()
    # --split-tail test: same train and val, test takes the rest
    tr2, va2, te2 = split_indices(idx, (0.6, 0.2, 0.2), 0, "dom", tail="test")
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2) and np.isin(te, te2).all()
    assert len(tr2) + len(va2) + len(te2) == n


def test_dropped_samples_are_counted_in_the_summary(tmp_path):
    c = _cache_with_scale(tmp_path / "c", 100.0)
    s = federate(c, FederateConfig(algo="zeroshot", heldout=["photo"]))
    # art 61: 36 + 12 + 12 = 60 (1 dropped); cartoon 52: 31 + 10 + 10 = 51 (1 dropped)
    cl = s["experiments"][0]["clients"]
    assert cl["art"] == {"train": 36, "val": 12, "test": 12, "dropped": 1}
    assert cl["cartoon"] == {"train": 31, "val": 10, "test": 10, "dropped": 1}
    assert s["split_dropped"] == 2 and s["split_tail"] == "drop" and any("in no split" in n for n in s["notes"])
    s = federate(c, FederateConfig(algo="zeroshot", heldout=["photo"], split_tail="test"))
    assert s["split_dropped"] == 0 and s["experiments"][0]["clients"]["art"]["test"] == 13
    exps = build_experiments(c, FederateConfig(protocol="personal", split_tail="test"))
    rows = np.concatenate([np.concatenate([x.train, x.val, x.test]) for x in exps[0].clients])
    assert np.array_equal(np.sort(rows), np.arange(len(c)))
    res = CliRunner().invoke(app, ["federate", str(c.path), "--split-tail", "all", "-q"])
    assert res.exit_code != 0 and "--split-tail 'all' unknown" in str(res.exception)
