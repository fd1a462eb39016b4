"""--shots K (federated/protocols.few_shot via split_client): K training images per class and client, seeded, the
same for every algorithm, nested in K, validation/test unchanged; recorded in the summary; options, grid and
pipeline keys."""
import json
from pathlib import Path

import numpy as np
import pytest

from fedclip_cache.cache.reader import open_cache
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.protocols import build_experiments, few_shot
from fedclip_cache.federated.results import federate
from fedclip_cache.synthetic import write_synthetic_cache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 3 domains x 5 classes: every class of every client has 5 or more training images
    return write_synthetic_cache(tmp_path_factory.mktemp("shots") / "c", {"a": 120, "b": 100, "c": 110}, 5, dim=16,
                                 seed=1)


def rows_by_client(exps):
    return {(e.name, cl.name): cl for e in exps for cl in e.clients}


def test_few_shot_keeps_k_per_class_seeded_and_nested():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    labels[labels == 3] = 2  # class 3 absent
    labels[:2] = 3  # ... except two rows: a class with fewer than K
    train = np.sort(rng.choice(300, 200, replace=False))
    train = np.union1d(train, [0, 1])
    prev = None
    for k in (1, 2, 4, 8, 16):
        kept, short = few_shot(labels, train, k, seed=7, name="photo")
        assert np.all(np.diff(kept) > 0) and np.isin(kept, train).all()
        for c in range(4):
            have = int((labels[train] == c).sum())
            assert int((labels[kept] == c).sum()) == min(k, have)
        assert short == ({3: 2} if k > 2 else {})
        if prev is not None:  # the images of K are among those of K' > K
            assert np.isin(prev, kept).all()
        prev = kept
        again, _ = few_shot(labels, train, k, seed=7, name="photo")
        np.testing.assert_array_equal(again, kept)
    # another seed or client draws other images
    assert not np.array_equal(few_shot(labels, train, 4, 8, "photo")[0], few_shot(labels, train, 4, 7, "photo")[0])
    assert not np.array_equal(few_shot(labels, train, 4, 7, "art")[0], few_shot(labels, train, 4, 7, "photo")[0])


@pytest.mark.parametrize("protocol", ["lodo", "personal"])
def test_shots_subset_the_train_split_only_and_the_same_for_every_algorithm(cache, protocol):
    fc = open_cache(cache)
    full = rows_by_client(build_experiments(fc, FederateConfig(protocol=protocol), seeds=[0, 3]))
    per_algo = {}
    for algo in ("fedclip", "local", "central", "promptfl", "scaffold"):
        exps = build_experiments(fc, FederateConfig(protocol=protocol, algo=algo, shots=2).validate(), seeds=[0, 3])
        per_algo[algo] = {k: cl.train.tolist() for k, cl in rows_by_client(exps).items()}
        for key, cl in rows_by_client(exps).items():
            ref = full[key]
            np.testing.assert_array_equal(cl.val, ref.val)
            np.testing.assert_array_equal(cl.test, ref.test)
            assert cl.dropped == ref.dropped
            assert np.isin(cl.train, ref.train).all()
            counts = np.bincount(fc.labels[cl.train], minlength=5)
            have = np.bincount(fc.labels[ref.train], minlength=5)
            np.testing.assert_array_equal(counts, np.minimum(have, 2))
    assert all(v == per_algo["fedclip"] for v in per_algo.values())


def test_summary_records_shots_and_says_which_classes_are_short(cache, tmp_path):
    s = federate(cache, FederateConfig(rounds=1, shots=3, heldout=["a"]), tmp_path / "r3")
    assert s["shots"] == 3 and s["shots_short"] == {} and not any("--shots" in n for n in s["notes"])
    assert all(c["train"] <= 3 * 5 for c in s["experiments"][0]["clients"].values())
    # 1000 shots: every class of every client is short and keeps all it has (its full training split)
    full = federate(cache, FederateConfig(rounds=1, heldout=["a"]), tmp_path / "full")
    big = federate(cache, FederateConfig(rounds=1, shots=1000, heldout=["a"]), tmp_path / "r1000")
    assert big["experiments"][0]["clients"] == full["experiments"][0]["clients"]
    fc = open_cache(cache)
    exps = build_experiments(fc, FederateConfig(heldout=["a"]))
    want = {f"0/{cl.name}": {fc.classes[c]: int(n) for c, n in enumerate(np.bincount(fc.labels[cl.train],
                                                                                    minlength=5)) if n}
            for cl in exps[0].clients}
    assert big["shots_short"] == want
    note = next(n for n in big["notes"] if n.startswith("--shots 1000:"))
    assert f"{sum(len(v) for v in want.values())} (client, class) pair(s) in 2 client split(s)" in note
    assert full["shots"] is None and full["shots_short"] is None
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["federate"]["shots"] == 3


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_bad_shots_are_one_line_errors(value):
    with pytest.raises(ConfigError) as e:
        FederateConfig(shots=value).validate()
    assert str(e.value).startswith("--shots ") and "\n" not in str(e.value)


def test_cli_grid_and_pipeline_keys(cache, tmp_path, run, one_line_error):
    code, out, err = run("federate", str(cache), "--shots", "2", "--rounds", "1", "--heldout", "a",
                         "--out", str(tmp_path / "cli"))
    assert code == 0, err
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["shots"] == 2
    one_line_error(*run("federate", str(cache), "--shots", "0", "--rounds", "1"), "--shots 0: must be at least 1")
    one_line_error(*run("sweep", str(cache), "--grid", "shots=1,0", "--rounds", "1", "--out", str(tmp_path / "bad")),
                   "shots")
    code, out, err = run("sweep", str(cache), "--grid", "shots=1,2", "--rounds", "1", "--heldout", "a",
                         "--seeds", "0", "--out", str(tmp_path / "sw"))
    assert code == 0, err
    points = sorted(json.loads(p.read_text())["shots"] for p in (tmp_path / "sw" / "points").glob("*/summary.json"))
    assert points == [1, 2]
    from fedclip_cache.pipeline import load
    from fedclip_cache.sweep import expand

    cfg = load(REPO / "pipelines" / "pacs-fewshot.toml")
    assert cfg["federate"]["shots"] == 16
    pts = expand(FederateConfig(), cfg["sweep"]["grid"])
    assert sorted((p.algo, p.shots) for p in pts) == sorted((a, k) for a in ("promptfl", "fedclip")
                                                             for k in (1, 2, 4, 8, 16))
    p = tmp_path / "p.toml"
    p.write_text("[federate]\nshots = 0\n")
    with pytest.raises(ConfigError, match="shots"):
        load(p)
