"""Federate options and results that must never be silently wrong or explode: runs with nothing to measure, memory asked
for before it is checked, a batch size far above the data, the Dirichlet minimum the README states."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclip_cache import open_cache
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.protocols import build_experiments
from fedclip_cache.federated.results import federate
from fedclip_cache.synthetic import write_synthetic_cache


README = Path(__file__).resolve().parents[2] / "docs" / "federate.md"  # the page stating the rule


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """3 domains x 24 rows, 3 classes, D = 8."""
    return write_synthetic_cache(tmp_path_factory.mktemp("limits") / "cache", {"a": 24, "b": 24, "c": 24}, 3,
                                 dim=8, seed=0)


BASE = dict(rounds=3, lr=1e-2, hidden=8, batch_size=8)


# ------------------------------------------------------------------------------------ nothing to measure (item 4)

def test_without_validation_data_the_last_round_is_reported_and_said(cache):
    """--split 1,0,0 (LODO): no validation data, so nothing to select with; it reported round 1 as 'best' with no
    note. Now the last round, marked and noted (the held-out accuracy is still a real measurement)."""
    s = federate(open_cache(cache), FederateConfig(**BASE, split=(1.0, 0.0, 0.0)))
    for e in s["experiments"]:
        assert e["selected_by"] == "last_round" and e["best"]["round"] == 3 == e["last"]["round"]
        assert e["best"]["heldout"] == e["last"]["heldout"] is not None and e["best"]["val_mean"] is None
    assert s["mean"]["heldout_best"] == s["mean"]["heldout_last"]
    notes = [n for n in s["notes"] if n.startswith("no validation data in heldout=a/seed0")]
    assert notes and "(--split 1,0,0)" in notes[0] and "the last round is reported as 'best', not a selected one" \
        in notes[0]
    assert any(n.startswith("no test data in heldout=a/seed0") for n in s["notes"])
    # with validation data: selected by it, as before
    s = federate(open_cache(cache), FederateConfig(**BASE))
    assert {e["selected_by"] for e in s["experiments"]} == {"val_mean"}
    assert not any("no validation data" in n for n in s["notes"])


def test_finetune_starts_from_the_reported_last_round_without_validation(cache, monkeypatch):
    import fedclip_cache.federated.loop as loop_mod

    seen = {}
    real = loop_mod.finetune

    def spy(loop):
        seen["start"] = {n: v.clone() for n, v in (loop.best_server or loop.state.server).items()}
        seen["last"] = {n: v.clone() for n, v in loop.state.server.items()}
        return real(loop)

    monkeypatch.setattr(loop_mod, "finetune", spy)
    s = federate(open_cache(cache), FederateConfig(**BASE, protocol="personal", split=(0.5, 0.0, 0.5),
                                                    finetune_steps=2))
    assert s["experiments"][0]["best"]["round"] == 3 and s["mean"]["test_mean_finetuned"] is not None
    assert seen["start"].keys() == seen["last"].keys() and seen["start"]
    for n in seen["start"]:  # it fine-tuned round 1's adapter while reporting round 1 as 'best'
        assert torch.equal(seen["start"][n], seen["last"][n]), n


def test_a_deployment_without_validation_data_fine_tunes_its_last_round():
    """The Flower server keeps the adapter of the selected round for --finetune-steps (RunRecorder.selected); with
    no validation split at any site the reported round is the last, so every round is 'selected' in turn."""
    from fedclip_cache.federated.recorder import RunRecorder

    rec = RunRecorder(FederateConfig(finetune_steps=2), None)
    site = {"heldout": False, "val_n": 0, "val_accuracy": 0.0}
    for r in (1, 2, 3):
        rec.rounds.append(r), rec.reports.append({"a": dict(site), "b": dict(site)})
        assert rec.selected(), r
    rec = RunRecorder(FederateConfig(finetune_steps=2), None)  # with validation: the first best, as before
    for r, acc in ((1, 0.5), (2, 0.4)):
        rec.rounds.append(r), rec.reports.append({"a": {"heldout": False, "val_n": 3, "val_accuracy": acc}})
        assert rec.selected() is (r == 1)


def test_a_run_that_would_measure_nothing_is_refused(cache, monkeypatch, capsys, tmp_path, one_line_error, run):
    msg = one_line_error(*run("federate", cache, "--protocol", "personal", "--split",
                                  "1,0,0", "--rounds", "2", "-o", tmp_path / "run"))
    assert msg.startswith("error: --split 1,0,0: no training client has validation or test data (the largest client "
                          "has 24 samples) and no domain is held out, so the run would measure nothing")
    assert not (tmp_path / "run").exists()
    # clients too small for any val/test split: the same refusal, naming --clients
    msg = one_line_error(*run("federate", cache, "--protocol", "personal", "--partition",
                                  "iid", "--clients", "8", "--rounds", "2"))
    assert "(the largest client has 3 samples)" in msg and "--clients" in msg


def test_clients_without_a_split_are_noted(cache):
    s = federate(open_cache(cache), FederateConfig(**BASE, protocol="personal", partition="iid", num_clients=5))
    exp = build_experiments(open_cache(cache), FederateConfig(protocol="personal", partition="iid", num_clients=5))[0]
    empty = [c.name for c in exp.clients if not len(c.val)]
    assert len(empty) == 3 and "a#4" in empty
    assert f"3 of 15 training clients of personal/seed0 (e.g. a#4, 4 samples) have no val split (--split " \
           f"0.6,0.2,0.2: too few samples); selection averages the others" in s["notes"]
    assert any(n.startswith("3 of 15 training clients") and "no test split" in n for n in s["notes"])


# ------------------------------------------------------------------------------------ memory before allocation

def test_a_batch_size_above_the_data_trains_exactly_as_the_data_size(cache, tmp_path):
    """--batch-size 99999999999 padded every batch to the batch size (an allocation of terabytes; 2.3 GB for 125
    images at 10^9). Now a client's one batch per epoch is its whole split: the same adapter, bit for bit, as a
    batch size equal to the largest training split, and a note says so."""
    cfg = dict(BASE, heldout=["a"], loss="contrastive")
    largest = max(len(c.train) for c in build_experiments(open_cache(cache), FederateConfig(**cfg))[0].clients)
    assert largest == 14
    outs = {}
    for bs in (largest, 99_999_999_999):
        outs[bs] = federate(open_cache(cache), FederateConfig(**{**cfg, "batch_size": bs}), out=tmp_path / str(bs))
    a, b = (torch.load(tmp_path / str(bs) / "adapter.pt") for bs in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert outs[largest]["experiments"][0]["best"] == outs[99_999_999_999]["experiments"][0]["best"]
    assert "--batch-size 99999999999 is larger than every client's training split (largest 14): each client trains " \
           "on its whole split as one batch per epoch" in outs[99_999_999_999]["notes"]
    assert not any("is larger than every client" in n for n in outs[largest]["notes"])


def test_an_adapter_that_cannot_fit_is_refused_before_allocation(cache, monkeypatch, capsys, one_line_error, run):
    """--hidden 99999999 (D = 8: 1.7e9 parameters per adapter) went to the allocator (~200 GB)."""
    import fedclip_cache.federated.loop as loop_mod

    # far beyond any machine (the estimate is a lower bound: params alone ~2 PB)
    msg = one_line_error(*run("federate", cache, "--hidden", "99999999999", "--rounds", "1"))
    assert msg.startswith("error: --hidden 99999999999: local training would hold at least ") and \
        msg.endswith("lower --hidden")
    # the value, on a machine with 16 GiB free
    monkeypatch.setattr(loop_mod, "free_bytes", lambda device: 16 << 30)
    msg = one_line_error(*run("federate", cache, "--hidden", "99999999", "--rounds", "1"))
    m = re.search(r"at least ([\d,.]+) GiB \(6 client adapter\(s\) of 1,699,999,991 parameters", msg)
    assert m and float(m.group(1).replace(",", "")) > 100 and "more than the 16.0 GiB free on cpu" in msg


def test_a_batch_that_cannot_fit_is_refused_naming_the_batch_size(tmp_path, monkeypatch, capsys, one_line_error, run):
    """The contrastive loss holds B x B logits per client: a batch the data can fill but memory cannot hold is
    refused naming --batch-size (here on a machine with 1 MiB free; the adapter itself takes ~2 KiB)."""
    import fedclip_cache.federated.loop as loop_mod

    big = write_synthetic_cache(tmp_path / "big", {"a": 1000}, 3, dim=8, seed=0)
    monkeypatch.setattr(loop_mod, "free_bytes", lambda device: 1 << 20)
    msg = one_line_error(*run("federate", big, "--protocol", "personal", "--batch-size",
                                  "4096", "--rounds", "1", "--hidden", "8"))
    # by hand: 600 x (8 hidden + 8 features + 600 logits) float32 = 1,478,400 B, + the adapter's 144 parameters
    # x 5 copies (adapter, gradient, 2 Adam moments; the global one) x 4 B = 2,880 B: 1.41 MiB
    assert msg.startswith("error: --batch-size 4096: local training would hold at least 1.4 MiB") and \
        "one batch of 600 through a hidden layer of 8" in msg and msg.endswith("lower --batch-size")
    code, out, err = run("federate", big, "--protocol", "personal", "--batch-size", "32",
                             "--rounds", "1", "--hidden", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["experiments"][0]["best"]["test_mean"] is not None


# ------------------------------------------------------------------------------------ Dirichlet minimum (minor)

def test_dirichlet_minimum_is_what_the_readme_and_the_error_say():
    from fedclip_cache.federated.partition import dirichlet

    labels = np.repeat(np.arange(4), 50)  # 200 samples
    for seed in range(5):  # enough samples: every client gets at least 10
        assert min(len(p) for p in dirichlet(labels, 4, alpha=0.3, seed=seed)) >= 10
    with pytest.raises(ConfigError) as e:  # 12 samples, 4 clients: the minimum is 12 // 4 = 3
        dirichlet(np.repeat(np.arange(3), 4), 4, alpha=0.001, seed=0)
    assert "fewer than 3 samples (the minimum: min(10, 12 samples // 4 clients)) after 10 re-draws" in str(e.value)
    text = README.read_text()
    assert "at least min(10, n // clients) samples" in text and "re-drawn up to 10 times" in text
    assert "re-drawn until every client has ≥ 10 samples" not in text
