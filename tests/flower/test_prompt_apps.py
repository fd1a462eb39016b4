"""Prompt learning in the Flower apps (promptfl; promptlocal's personal protocol), driven in-process: each site
rebuilds the frozen text tower from its own cache's provenance (the tiny random open_clip model the test made), only
the context vectors travel (nothing for promptlocal), and the run folder equals `federate`'s on one cache of all
sites' images. Every message goes through the apps' wire encoding (conftest's ``run_sites``)."""
import json

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from fedclip_cache.federated.config import ConfigError, FederateConfig  # noqa: E402
from fedclip_cache.federated.promptsteps import prompt_sizes  # noqa: E402
from fedclip_cache.federated.recorder import RunRecorder  # noqa: E402
from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.flower.client_app import SiteClient, load_state, save_state  # noqa: E402
from fedclip_cache.flower.server_app import Coordinator  # noqa: E402
from fedclip_cache.flower.task import federate_config  # noqa: E402

# 2 context vectors, a step size that moves them in 2 rounds, small batches: accuracies differ between rounds
PROMPT = {"rounds": 2, "n_ctx": 2, "prompt_lr": 0.05, "batch_size": 4}


@pytest.fixture(scope="session")
def same_run(same_scores, same_metrics):
    """``same_run(dep_dir, fed_dir, dep, fed, personal=False)``: a deployment's run folder equals `federate`'s:
    selection, accuracies, clients, communication, metrics."""
    def check(dep_dir, fed_dir, dep: dict, fed: dict, personal: bool = False) -> None:
        for a_exp, b_exp in zip(dep["experiments"], fed["experiments"]):
            for key in ("experiment", "heldout", "seed", "clients", "heldout_size", "selected_by"):
                assert a_exp[key] == b_exp[key], key
            same_scores(a_exp, b_exp)
            for which in ("best", "last"):
                a, b = a_exp[which], b_exp[which]
                assert a.get("test_finetuned") == pytest.approx(b.get("test_finetuned"), abs=1e-12)
        assert dep["mean"] == pytest.approx(fed["mean"], abs=1e-12)
        for key in ("communication", "prompt", "notes", "head", "adapter", "loss", "protocol", "logit_scale"):
            assert dep[key] == fed[key], key
        _, m_fed = same_metrics(dep_dir, fed_dir, loss_rtol=1e-4)
        # not one number everywhere (the comparison would prove little): 3-4 images per split, so the accuracies take
        # few values, the losses many
        assert m_fed["accuracy"].nunique() >= 2 and m_fed["loss"].nunique() > 4
        dep_ad, fed_ad = torch.load(dep_dir / "adapter.pt"), torch.load(fed_dir / "adapter.pt")
        if personal:  # the personal contexts never leave the sites: the server has none to save
            assert dep_ad == {} and set(fed_ad) == {"ctx"}
        else:
            assert set(dep_ad) == set(fed_ad) == {"ctx"}
            np.testing.assert_allclose(dep_ad["ctx"].numpy(), fed_ad["ctx"].numpy(), rtol=1e-4, atol=1e-6)

    return check


@pytest.mark.parametrize("extra", [{}, {"finetune_steps": 2, "prompt_csc": True, "prompt_schedule": "cosine"}])
def test_promptfl_sites_with_their_own_caches_equal_federate(tmp_path, model_args, tiny_model, monkeypatch, capsys,
                                                             run_sites, extract_sites, wire, extra, same_run):
    """Each site's cache records the test-made model (by hash: its architecture JSON is --text-model-config); the
    site rebuilds the text tower from it and trains its lane with the loop's prompt round; the server averages the
    contexts; the held-out site scores the global context. Run folder == `federate` on one cache of all images."""
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    opts = {**PROMPT, "algo": "promptfl", "text_model_config": str(tiny_model[0]), **extra}
    _, cfg = federate_config({**opts, "heldout": "sketch", "sites": 3})
    clients = {d: SiteClient(p, cfg) for d, p in sites.items()}
    assert clients["sketch"].heldout_site and clients["art"].prompts is not None
    order = [clients[d] for d in ("sketch", "photo", "art")]  # any order
    co = run_sites(order, cfg, RunRecorder(cfg, tmp_path / "dep"))
    if co.finetunes:  # the ServerApp's last message: each training site fine-tunes the selected global context
        rec, params = co.finetune_message()
        assert set(params) == {"ctx"}
        co.receive_finetune([wire(*s.handle(*wire(rec, params))) for s in order])
    # what crosses the wire: the context vectors and nothing else (no adapter, no text tower, no prototypes)
    rec, params = co.message(1)
    width = prompt_sizes(clients["art"].prompts).ctx_shape[-1]  # the text tower's width
    assert set(params) == {"ctx"} and params["ctx"].shape == ((3, 2, width) if extra else (2, width))
    dep = co.finish()
    fed = federate(tmp_path / "merged", FederateConfig(**opts, heldout=["sketch"]), out=tmp_path / "run")
    same_run(tmp_path / "dep", tmp_path / "run", dep, fed)
    if extra:  # --finetune-steps: each training site fine-tuned the selected global context
        assert set(dep["experiments"][0]["best"]["test_finetuned"]) == {"art", "photo"}
    # the bytes that crossed the wire are exactly the context tensors federate's formula counts
    comm, n = dep["communication"], int(params["ctx"].numel())
    assert comm["trainable_params"] == n and comm["bytes_per_adapter"] == 4 * n
    for r in dep["deployment"]["rounds"]:
        assert r["tensor_bytes_down"] == comm["bytes_per_adapter"]  # what each node received
        assert r["tensor_bytes_up"] == comm["bytes_up_per_round"] == 2 * 4 * n  # the 2 training sites' contexts
    assert json.loads((tmp_path / "dep" / "summary.json").read_text()) == dep


def test_promptlocal_personal_protocol_keeps_each_context_at_its_site(tmp_path, model_args, tiny_model, monkeypatch,
                                                                      capsys, run_sites, extract_sites, wire,
                                                                      same_run):
    """promptlocal, personal protocol (no held-out site): each site trains its own context and keeps it; no tensor
    crosses the wire; the run folder's metrics and summary equal `federate`'s. The context survives in Flower's
    context.state alone: here every message is answered by a fresh SiteClient (as a Ray actor pool may)."""
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    opts = {**PROMPT, "rounds": 3, "algo": "promptlocal", "text_model_config": str(tiny_model[0])}
    _, cfg = federate_config({**opts, "heldout": "", "sites": 3})
    assert cfg.protocol == "personal"
    co = run_sites([SiteClient(p, cfg) for p in sites.values()], cfg, RunRecorder(cfg, tmp_path / "dep"))
    assert co.message(1)[1] == {}  # nothing travels down
    dep = co.finish()
    fed = federate(tmp_path / "merged", FederateConfig(**opts, protocol="personal"), out=tmp_path / "run")
    same_run(tmp_path / "dep", tmp_path / "run", dep, fed, personal=True)
    assert dep["communication"]["bytes_total"] == 0
    assert all(r["tensor_bytes_down"] == r["tensor_bytes_up"] == 0 for r in dep["deployment"]["rounds"])

    # The ClientApp keeps the context in context.state between messages: two SiteClient "actors" per site taking
    # turns, the state carried only by the Context, give the same run.
    from flwr.app import Context, RecordDict

    actors = {d: (SiteClient(p, cfg), SiteClient(p, cfg)) for d, p in sites.items()}
    contexts = {d: Context(run_id=1, node_id=i + 1, node_config={}, state=RecordDict(), run_config={})
                for i, d in enumerate(actors)}

    def answer(d, k, rec, params):
        state = load_state(contexts[d])
        reply = actors[d][k % 2].handle(*wire(rec, params), state)
        save_state(contexts[d], state)
        return wire(*reply)

    co2 = Coordinator(cfg, RunRecorder(cfg, None))
    co2.setup([answer(d, 0, {"phase": "setup"}, {}) for d in actors])
    for rnd in range(1, cfg.rounds + 2):
        rec, params = co2.message(rnd)
        co2.receive(rnd, [answer(d, rnd, rec, params) for d in actors])
    again = co2.finish()
    assert again["experiments"] == dep["experiments"] and again["mean"] == dep["mean"]
    kept = load_state(contexts["art"])  # the trained context, not the seeded start
    assert set(kept) == {"ctx"} and kept["ctx"].shape == prompt_sizes(actors["art"][0].prompts).ctx_shape == (2, 64)
    assert float((kept["ctx"] - actors["art"][0].initial()["ctx"]).abs().max()) > 1e-4


def test_prompt_refusals_are_one_line(tmp_path, model_args, tiny_model, monkeypatch, capsys, extract_sites):
    """promptlocal with a held-out site is refused (its contexts never leave the sites); a site whose text model
    is not its cache's is refused when it sets up, with federate's one-line error; sites that report different
    models or different starting contexts are refused by the server."""
    with pytest.raises(ConfigError, match="each site keeps its own context") as e:
        federate_config({"algo": "promptlocal", "heldout": "a"})
    assert "\n" not in str(e.value)
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    from fedclip_cache.synthetic import write_tiny_model

    other_cfg, other_ckpt = write_tiny_model(tmp_path / "other", seed=1)
    _, cfg = federate_config({**PROMPT, "algo": "promptfl", "heldout": "sketch", "text_model_config": str(other_cfg),
                              "text_pretrained": str(other_ckpt)})
    with pytest.raises(ConfigError, match="not the cache's model") as e:
        SiteClient(sites["art"], cfg)
    assert "\n" not in str(e.value)
    # the server: two sites whose caches name different models, or whose starting contexts differ
    _, cfg = federate_config({**PROMPT, "algo": "promptfl", "heldout": "c"})
    facts = {"dim": 4, "heldout": False, "trainable": 8}

    def reply(site, model, value):
        return ({**facts, "client": site, "train_n": 5, "model": model}, {"ctx": torch.full((2, 4), value)})

    with pytest.raises(ConfigError, match="different models"):
        Coordinator(cfg).setup([reply("a", "m1", 0.0), reply("b", "m2", 0.0)])
    with pytest.raises(ConfigError, match="start from different context vectors"):
        Coordinator(cfg).setup([reply("a", "m1", 0.0), reply("b", "m1", 1.0)])
    co = Coordinator(cfg)
    co.setup([reply("b", "m1", 0.5), reply("a", "m1", 0.5)])
    assert torch.equal(co.current["ctx"], torch.full((1, 2, 4), 0.5)) and co.trainable == 8


def test_fedpgp_sites_send_sigma_and_keep_their_low_rank_prompts(tmp_path, model_args, tiny_model, monkeypatch,
                                                                   capsys, run_sites, extract_sites, same_scores,
                                                                   same_metrics):
    """fedpgp (personal protocol): the server averages sigma, each site keeps its own U, V (in its state); only
    sigma crosses the wire; the run folder's metrics and summary equal `federate`'s."""
    sites = extract_sites(tmp_path, model_args, monkeypatch, capsys)
    opts = {**PROMPT, "rounds": 3, "algo": "fedpgp", "pgp_rank": 2, "text_model_config": str(tiny_model[0])}
    _, cfg = federate_config({**opts, "heldout": "", "sites": 3})
    clients = [SiteClient(p, cfg) for p in sites.values()]
    co = run_sites(clients, cfg, RunRecorder(cfg, tmp_path / "dep"))
    assert set(co.message(1)[1]) == {"sigma"}
    assert set(clients[0].own) == {"sigma", "U", "V"}  # the site's state: the personal part never left it
    dep = co.finish()
    fed = federate(tmp_path / "merged", FederateConfig(**opts, protocol="personal"), out=tmp_path / "run")
    for a, b in zip(dep["experiments"], fed["experiments"]):
        same_scores(a, b, heldout=False)
    for key in ("communication", "prompt", "notes", "mean"):
        assert dep[key] == pytest.approx(fed[key]) if key == "mean" else dep[key] == fed[key], key
    same_metrics(tmp_path / "dep", tmp_path / "run", loss_rtol=1e-4)
    np.testing.assert_allclose(torch.load(tmp_path / "dep" / "adapter.pt")["sigma"][0].numpy(),
                               torch.load(tmp_path / "run" / "adapter.pt")["sigma"][0].numpy(), rtol=1e-4, atol=1e-6)
    comm = dep["communication"]
    for r in dep["deployment"]["rounds"]:  # sigma alone: each way, every sampled site
        assert r["tensor_bytes_down"] == comm["bytes_per_adapter"]
        assert r["tensor_bytes_up"] == comm["bytes_up_per_round"] == 3 * comm["bytes_per_adapter"]
