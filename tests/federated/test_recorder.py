"""federated/recorder.py: a deployment's run folder, from the sites' reports, named and written as `federate`'s."""
import json

import torch

from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.recorder import RunRecorder


def report(site, held=False):
    facts = {"client": site, "heldout": held, "dim": 4, "num_classes": 2, "model_params": 0, "cache": f"/{site}",
             "images": 10, "complete": True, "identity": "{}", "logit_scale": 100.0, "logit_scale_source": "cache"}
    if held:
        return {**facts, "heldout_accuracy": 0.5, "heldout_loss": 1.0, "n": 10}
    return {**facts, "val_accuracy": 0.5, "val_loss": 1.0, "val_n": 2, "test_accuracy": 0.5, "test_loss": 1.0,
            "test_n": 2, "train_n": 6, "dropped": 0}


def test_the_experiment_is_named_after_the_configured_heldout_domain_even_when_that_site_never_reports(tmp_path):
    """The held-out site lost from the start: the run is still `heldout=c/seed3` (as the sites and the
    Coordinator name it and seed their batches), never `heldout=None/seed3`."""
    cfg = FederateConfig(rounds=1, heldout=["c"], seed=3)
    rec = RunRecorder(cfg, None)
    rec.evaluate_round(1, [report("a"), report("b")], 1)
    assert rec.write({"w": torch.zeros(1, 2)}, 2)["experiments"][0]["experiment"] == "heldout=c/seed3"


def test_a_deployment_run_folder_is_written_by_results_write_run(tmp_path):
    cfg = FederateConfig(rounds=1, heldout=["c"])
    rec = RunRecorder(cfg, tmp_path / "run")
    rec.evaluate_round(1, [report("a"), report("b"), report("c", held=True)], 0)
    summary = rec.write({"w": torch.ones(1, 2)}, 2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert list(config) == ["deployment", "sites", "seeds", "federate", "created", "logit_scale_used",
                            "logit_scale_source"]
    assert config["deployment"] is True and set(config["sites"]) == {"a", "b", "c"}
    assert config["sites"]["a"]["path"] == "/a" and config["seeds"] == [0] and config["federate"] == cfg.to_dict()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert torch.equal(torch.load(tmp_path / "run" / "adapter.pt")["w"], torch.ones(1, 2))
