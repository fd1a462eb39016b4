"""Prompt learning on real sites: `deploy` (a SuperLink, its ServerApp process and one site process per cache) and
`simulate` (Flower's simulation engine on Ray) run promptfl, and promptlocal's personal protocol, with each site
rebuilding the frozen text tower from its own cache's provenance (the tiny random open_clip model the test made);
the run folder equals `federate`'s on one cache of all sites' images. The end-to-end runs are marked `slow` (each
~20-60 s on 2 busy cores: process start-up and torch imports are most of it)."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from fedclip_cache.errors import ConfigError  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402

PROMPT = dict(rounds=2, n_ctx=2, prompt_lr=0.05, batch_size=4)


@pytest.fixture(scope="session")
def equal_to_federate(same_scores, same_metrics):
    """``equal_to_federate(run, fed_dir, summary, fed, personal=False)``: the deployment's run folder equals
    `federate`'s (the tolerances of tests/flower/test_prompt_apps.py)."""
    def check(run, fed_dir, summary: dict, fed: dict, personal: bool = False) -> None:
        assert json.loads((run / "summary.json").read_text()) == summary
        a_exp, b_exp = summary["experiments"][0], fed["experiments"][0]
        for key in ("experiment", "heldout", "seed", "clients", "heldout_size", "selected_by"):
            assert a_exp[key] == b_exp[key], key
        same_scores(a_exp, b_exp)
        assert summary["mean"] == pytest.approx(fed["mean"], abs=1e-12)
        for key in ("communication", "prompt", "notes", "head", "adapter", "protocol"):
            assert summary[key] == fed[key], key
        _, m_fed = same_metrics(run, fed_dir, loss_rtol=1e-4)
        assert m_fed["loss"].nunique() > 4
        run_ad, fed_ad = torch.load(run / "adapter.pt"), torch.load(fed_dir / "adapter.pt")
        if personal:  # each site's context stayed at the site
            assert run_ad == {}
        elif "sigma" in run_ad:  # fedpgp: the server holds sigma only (federate's holds every client's sigma, U, V)
            assert set(run_ad) == {"sigma"}
            np.testing.assert_allclose(run_ad["sigma"][0].numpy(), fed_ad["sigma"][0].numpy(), rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(run_ad["ctx"].numpy(), fed_ad["ctx"].numpy(), rtol=1e-4, atol=1e-6)
        comm = summary["communication"]
        for r in summary["deployment"]["rounds"]:  # only the context crossed the wire (nothing for promptlocal)
            assert r["tensor_bytes_down"] == (0 if personal else comm["bytes_per_adapter"])
            assert r["tensor_bytes_up"] == comm["bytes_up_per_round"]

    return check


def test_a_site_without_its_text_model_is_refused_before_anything_starts(tmp_path, model_args, monkeypatch, capsys,
                                                                        extract_sites, one_line_error, run):
    """The sites' caches record the test-made architecture by hash only: without --text-model-config neither
    `deploy` nor `simulate` starts a process; the one-line error names the site cache and the option."""
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    for command in ("deploy", "simulate"):
        code, out, err = run(command, *sites.values(), "-o", tmp_path / command, "--algo", "promptfl", "--heldout",
                             "sketch", "--rounds", "1")
        msg = one_line_error(code, out, err, "site cache", "--text-model-config")
        assert str(tmp_path) in msg
        assert not (tmp_path / command / "logs" / "superlink.log").exists()
    code, out, err = run("deploy", *sites.values(), "-o", tmp_path / "p", "--algo", "promptlocal", "--heldout",
                         "sketch")
    one_line_error(code, out, err, "each site keeps its own context")


def prompt_config(algo: str, tiny_model) -> FederateConfig:
    """The run a deployment and `federate` both train: promptfl holds sketch out; the personal methods run the
    personal protocol (fedpgp with a rank at most --n-ctx)."""
    where = dict(heldout=["sketch"]) if algo == "promptfl" else dict(protocol="personal", rounds=3)
    if algo == "fedpgp":
        where["pgp_rank"] = 2
    return FederateConfig(**{**PROMPT, **where}, algo=algo, text_model_config=str(tiny_model[0])).validate()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["promptfl", "promptlocal"])
def test_prompt_deployment_equals_federate(tmp_path, model_args, tiny_model, monkeypatch, capsys, extract_sites,
                                           algo, equal_to_federate):
    """A real local deployment: three site processes, each rebuilding the text tower from its own cache; the
    ServerApp's run folder equals `federate` on one cache of all three sites' images. promptfl holds sketch out;
    promptlocal (personal protocol) keeps each site's context in the site process's context.state."""
    from fedclip_cache.federated.results import federate
    from fedclip_cache.launch import deploy as dep

    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs (flower-superlink, flower-supernode, flwr) are not installed")
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    cfg = prompt_config(algo, tiny_model)
    res = dep.deploy(list(sites.values()), tmp_path / "run", cfg, timeout=300, log=lambda m: None)
    assert res["status"] == "finished:completed"
    fed = federate(tmp_path / "merged", cfg, out=tmp_path / "fed")
    equal_to_federate(tmp_path / "run", tmp_path / "fed", res["summary"], fed, personal=algo == "promptlocal")
    assert "[ROUND 2]" in (tmp_path / "run" / "logs" / "serverapp.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["promptfl", "promptlocal", "fedpgp"])
def test_prompt_simulation_equals_federate(tmp_path, model_args, tiny_model, monkeypatch, capsys, extract_sites,
                                           algo, equal_to_federate):
    """`simulate` on the per-site caches: promptfl (held-out sketch), and promptlocal's personal protocol, whose
    contexts live in Flower's context.state between rounds (the Ray actors answering a node's messages vary)."""
    pytest.importorskip("ray")
    from fedclip_cache.federated.results import federate
    from fedclip_cache.launch.simulate import simulate

    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    cfg = prompt_config(algo, tiny_model)
    res = simulate(list(sites.values()), tmp_path / "sim", cfg, num_cpus=2, log=lambda m: None)
    fed = federate(tmp_path / "merged", cfg, out=tmp_path / "fed")
    equal_to_federate(tmp_path / "sim", tmp_path / "fed", res["summary"], fed, personal=algo == "promptlocal")


def test_prompt_options_travel_in_the_run_config(tmp_path):
    """The prompt options reach the sites through the one codec (flower.task): a run config round trip."""
    from fedclip_cache.flower.task import federate_config, run_config

    cfg = FederateConfig(algo="promptfl", n_ctx=4, ctx_init="a photo of a", prompt_csc=True, prompt_lr=0.01,
                         prompt_schedule="cosine", text_model_config="/m.json", heldout=["x"]).validate()
    rc = run_config(cfg, 3, tmp_path)
    assert federate_config(rc).cfg == cfg
    with pytest.raises(ConfigError, match="each site keeps its own context"):
        federate_config({**rc, "algo": "promptlocal"})
