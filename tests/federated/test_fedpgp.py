"""FedPGP (--algo fedpgp) on a tiny random open_clip model: local steps equal a plain re-implementation of the
official trainer (github.com/TianyuCuiOvO/FedPGP, trainers/fedpgp.py), rounds average sigma only and keep U V per
client, and the options are declared and refused in one line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip_cache.cache.config import ModelSpec
from fedclip_cache.cache.models import load_model
from fedclip_cache.federated.pgp import PGPLearner
from fedclip_cache.federated.prompts import PromptLearner

CLASSES = ["cat", "dog", "fish", "golden_retriever", "sea lion"]


@pytest.fixture(scope="module")
def lm(tiny_model):
    cfg, ckpt = tiny_model
    return load_model(ModelSpec(model_config=str(cfg), pretrained=str(ckpt)))


class FedPGPReference(torch.nn.Module):
    """The official PromptLearner + CustomCLIP + forward_backward, written plainly: U, V, sigma nn.Parameters, the
    context U @ V + sigma, full 77-token prompts through the model's own text path, the frozen prompt's features
    as the positive of sigma's, the personalised prompt's as its negative (torch CosineSimilarity), CE + mu * CE."""

    def __init__(self, model, tokenizer, classnames, U, V, sigma, mu, temp):
        super().__init__()
        self.model, self.mu, self.temp = model, mu, temp
        n_ctx = sigma.shape[0]
        prompts = [" ".join(["X"] * n_ctx) + " " + c.replace("_", " ") + "." for c in classnames]
        self.tokens = tokenizer(prompts)
        with torch.no_grad():
            self.embedding = model.token_embedding(self.tokens)  # the frozen prompts (text_features_0)
        self.prefix, self.suffix = self.embedding[:, :1], self.embedding[:, 1 + n_ctx:]
        self.U, self.V, self.sigma = (torch.nn.Parameter(t.clone()) for t in (U, V, sigma))

    def encode(self, prompts):
        m = self.model
        x = m.ln_final(m.transformer(prompts + m.positional_embedding, attn_mask=m.attn_mask))
        x = x[torch.arange(x.shape[0]), self.tokens.argmax(-1)] @ m.text_projection
        return x / x.norm(dim=-1, keepdim=True)

    def with_ctx(self, ctx):
        c = self.prefix.shape[0]
        return torch.cat([self.prefix, ctx.unsqueeze(0).expand(c, -1, -1), self.suffix], dim=1)

    def loss(self, image_features, labels, scale):
        cos = torch.nn.CosineSimilarity(dim=-1)
        ctx = self.U @ self.V + self.sigma
        t = self.encode(self.with_ctx(ctx))
        t0, ts = self.encode(self.embedding), self.encode(self.with_ctx(self.sigma))
        f = image_features / image_features.norm(dim=-1, keepdim=True)
        loss = F.cross_entropy(scale * f @ t.t(), labels)
        logits = torch.cat((cos(t0, ts).reshape(-1, 1), cos(ts, t).reshape(-1, 1)), dim=1) / self.temp
        return loss + self.mu * F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def test_init_follows_the_official_shapes_and_scale(lm):
    pl = PGPLearner(PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=16), rank=8, mu=0.5, temp=0.5)
    p = pl.init_params(0)
    assert {n: tuple(v.shape) for n, v in p.items()} == {"U": (16, 8), "V": (8, 64), "sigma": (16, 64)}
    assert all(0.015 < float(v.std()) < 0.025 for v in p.values())
    assert pl.num_params == 16 * 8 + 8 * 64 + 16 * 64 and pl.communicated_params == 16 * 64
    torch.testing.assert_close(pl.init_params(0)["sigma"], p["sigma"])  # seeded
    assert not torch.equal(pl.init_params(1)["sigma"], p["sigma"])
    # the anchor is CLIP's own prompt: the placeholder words' token embeddings as context = encode_text
    with torch.no_grad():
        want = F.normalize(lm.model.encode_text(pl.base.tokens), dim=-1)
    torch.testing.assert_close(pl.anchor, want, atol=1e-5, rtol=0)
    # --ctx-init: sigma starts from the phrase, the anchor is the phrase's prompt
    ph = PGPLearner(PromptLearner(lm.model, lm.tokenizer, CLASSES, ctx_init="a photo of a"), 2, 0.5, 0.5)
    torch.testing.assert_close(ph.init_params(0)["sigma"], ph.base.ctx_init_vectors)
    torch.testing.assert_close(ph.anchor, ph.base.class_embeddings(ph.base.ctx_init_vectors), atol=1e-6, rtol=0)


@pytest.mark.parametrize("momentum,decay,lr,mu", [(0.0, 0.0, 0.5, 1.0), (0.9, 5e-4, 0.05, 0.5)])
def test_steps_equal_the_official_trainer_reimplemented(lm, momentum, decay, lr, mu):
    torch.manual_seed(0)
    n, d = 40, lm.model.text_projection.shape[1]
    X, Y = torch.randn(n, d), torch.randint(0, len(CLASSES), (n,))
    rng = np.random.default_rng(0)
    sched = [rng.permutation(n)[:8] for _ in range(2)] + [rng.permutation(n)[:3]]  # a short last batch
    pl = PGPLearner(PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4), rank=2, mu=mu, temp=0.5)
    start = pl.init_params(1)
    start["U"], start["V"] = start["U"] * 10, start["V"] * 10  # a personal part large enough to matter
    scale = 50.0
    ref = FedPGPReference(lm.model, lm.tokenizer, CLASSES, start["U"], start["V"], start["sigma"], mu, 0.5)
    opt = torch.optim.SGD([ref.U, ref.V, ref.sigma], lr=lr, momentum=momentum, weight_decay=decay)  # Dassl's SGD
    for b in sched:
        bt = torch.from_numpy(b)
        opt.zero_grad()
        ref.loss(X[bt], Y[bt], scale).backward()
        opt.step()
    ours = pl.train({k: v.unsqueeze(0) for k, v in start.items()}, [sched], X, Y, lr, scale, momentum, decay)
    for k in ("U", "V", "sigma"):  # float32 rounding (truncated vs 77-token prompts) grows with lr 0.5 steps
        torch.testing.assert_close(ours[k][0], getattr(ref, k).detach(), atol=5e-5, rtol=1e-5)
        assert (ours[k][0] - start[k]).abs().max() > 1e-3, k  # every part moved, far beyond the tolerance
    if momentum:
        return
    # side by side: three clients from their own starts, schedules of different lengths, in passes of any size
    starts = {k: torch.stack([v, 2 * v, -v]) for k, v in start.items()}
    parts = [sched[:2], sched[2:], sched[1:3]]
    alone = [pl.train({k: v[i:i + 1] for k, v in starts.items()}, [parts[i]], X, Y, lr, scale, momentum, decay)
             for i in range(3)]
    for cap in (4096, 2 * len(CLASSES)):
        together = pl.train(starts, parts, X, Y, lr, scale, momentum, decay, max_prompts=cap)
        for i in range(3):
            for k in starts:
                torch.testing.assert_close(together[k][i], alone[i][k][0], atol=1e-5, rtol=1e-5)


def test_contrastive_term_pulls_sigma_to_clip_and_away_from_the_personal_prompt():
    """The term is -log softmax([<t0,ts>, <ts,tf>] / temp)[0], averaged over classes: smaller when sigma's class
    embeddings agree with CLIP's prompts than with the personalised ones."""
    from fedclip_cache.federated.pgp import pgp_contrastive

    e = torch.eye(3)
    near, far = pgp_contrastive(e, e.unsqueeze(0), -e.unsqueeze(0), 0.5), \
        pgp_contrastive(e, -e.unsqueeze(0), e.unsqueeze(0), 0.5)
    assert float(near) == pytest.approx(-np.log(np.exp(2) / (np.exp(2) + np.exp(-2))), rel=1e-5)  # float32
    assert float(far) == pytest.approx(np.log(2), rel=1e-5) and float(far) > float(near)


# ------------------------------------------------------------------------------------------- rounds on a cache


def test_rounds_average_sigma_keep_u_v_and_score_each_client_with_its_own(cache_dir, tiny_model):
    """Three rounds by hand with half the clients sampled per round: each sampled client trains (sigma, U, V) from the
    global sigma and its own U V; the server's new sigma is the mean of the sampled clients' sigma; an unsampled
    client keeps its U V and receives the new sigma; each client is scored with sigma + its own U V."""
    from fedclip_cache import open_cache
    from fedclip_cache.federated.algorithms import make_algorithm
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.loop import build_lanes, run_loop, sample_lanes
    from fedclip_cache.federated.protocols import build_experiments
    from fedclip_cache.federated.train import LocalHyper, batch_schedule

    cfg_file, _ = tiny_model
    cache = open_cache(cache_dir)
    cfg = FederateConfig(algo="fedpgp", rounds=3, n_ctx=2, pgp_rank=2, prompt_lr=0.05, heldout=["art"], batch_size=4,
                         fraction_fit=0.5, text_model_config=str(cfg_file)).validate()
    exps = build_experiments(cache, cfg)
    res = run_loop(cache, cfg, exps)
    lm = load_model(ModelSpec(model_config=str(cfg_file), pretrained=cache.meta["model"]["pretrained"]))
    pl = PGPLearner(PromptLearner(lm.model, lm.tokenizer, cache.classes, n_ctx=2), 2, cfg.pgp_mu, cfg.pgp_temp)
    X, Y = torch.from_numpy(np.asarray(cache.features)), torch.from_numpy(cache.labels)
    lanes = build_lanes(make_algorithm(cfg), exps)
    assert len(lanes) == 2
    init = pl.init_params(exps[0].seed)
    state = [dict(init) for _ in lanes]
    for rnd in (1, 2, 3):
        sampled = sample_lanes([np.arange(len(lanes))], exps, cfg, rnd)
        assert len(sampled) == 1
        trained = {}
        for i in sampled:
            ln = lanes[i]
            sched = batch_schedule(ln.train, ln.seed, rnd, ln.key, LocalHyper(batch_size=4))
            out = pl.train({k: v.unsqueeze(0) for k, v in state[i].items()}, [sched], X, Y, 0.05, res.logit_scale,
                           cfg.prompt_momentum, cfg.prompt_weight_decay)
            trained[i] = {k: v[0] for k, v in out.items()}
        sigma = torch.stack([trained[i]["sigma"] for i in sampled]).mean(0)
        for i in range(len(lanes)):
            state[i] = {**state[i], **{k: trained[i][k] for k in ("U", "V")}} if i in trained else state[i]
            state[i]["sigma"] = sigma
    for i in range(len(lanes)):
        for k in ("sigma", "U", "V"):
            torch.testing.assert_close(res.final_params[k][i], state[i][k], atol=1e-6, rtol=1e-5)
    assert torch.equal(res.final_params["sigma"][0], res.final_params["sigma"][1])  # one global prompt ...
    assert not torch.equal(res.final_params["U"][0], res.final_params["U"][1])  # ... personal parts of their own
    # each client's validation split is scored against its own sigma + U V
    e = exps[0]
    for si, seg in enumerate(res.segments):
        if seg["split"] == "val":
            i = next(k for k, ln in enumerate(lanes) if e.clients[ln.client].name == seg["client"])
            T = pl.base.class_embeddings(state[i]["sigma"] + state[i]["U"] @ state[i]["V"]).detach()
            v = torch.from_numpy(e.clients[lanes[i].client].val)
            acc = float((F.normalize(X[v], dim=-1) @ T.t()).argmax(-1).eq(Y[v]).float().mean())
            assert res.acc[-1, si] == pytest.approx(acc)


def test_cli_summary_counts_what_travels(cache_dir, tiny_model, tmp_path, run):
    cfg, _ = tiny_model
    out = tmp_path / "run"
    code, o, e = run("federate", cache_dir, "--algo", "fedpgp", "--rounds", "2", "--n-ctx", "4", "--pgp-rank", "2",
                     "--heldout", "art", "--text-model-config", cfg, "--out", out)
    assert code == 0, o + e
    s = json.loads((out / "summary.json").read_text())
    assert s["algo"] == "fedpgp" and s["adapter"] == "none" and s["head"] == "prompt"
    assert (s["prompt"]["n_ctx"], s["prompt"]["width"], s["prompt"]["rank"]) == (4, 64, 2)
    assert (s["prompt"]["mu"], s["prompt"]["temp"]) == (0.5, 0.5)
    comm, sigma = s["communication"], 4 * 64
    assert comm["trainable_params"] == sigma + 4 * 2 + 2 * 64 and comm["bytes_per_adapter"] == sigma * 4
    assert comm["bytes_up_per_round"] == 2 * sigma * 4 and comm["bytes_total"] == 2 * 2 * 2 * sigma * 4
    assert s["mean"]["test_mean_best"] is not None and not any("ignored" in n for n in s["notes"])


def test_options_are_declared_once_and_refused_in_one_line(run, one_line_error, cache_dir):
    from fedclip_cache.errors import ConfigError
    from fedclip_cache.federated.config import FederateConfig

    assert FederateConfig(algo="fedclip", pgp_rank=4).ignored_options() == ["pgp_rank"]
    assert FederateConfig(algo="promptfl", pgp_mu=1.0).ignored_options() == ["pgp_mu"]
    assert FederateConfig(algo="fedpgp", pgp_mu=1.0, n_ctx=4, prompt_lr=0.01).ignored_options() == []
    for bad, msg in ((dict(pgp_rank=0), "--pgp-rank 0: must be at least 1"),
                     (dict(pgp_temp=0.0), "--pgp-temp 0.0: must be > 0"),
                     (dict(pgp_mu=-1.0), "--pgp-mu -1.0: must be at least 0"),
                     (dict(prompt_csc=True), "--prompt-csc True: fedpgp learns one context"),
                     (dict(pgp_rank=5, n_ctx=4), "--pgp-rank 5: above --n-ctx 4")):
        with pytest.raises(ConfigError) as err:
            FederateConfig(algo="fedpgp", **bad).validate()
        assert str(err.value).startswith(msg) and "\n" not in str(err.value), str(err.value)
    code, o, e = run("federate", cache_dir, "--algo", "fedpgp", "--prompt-csc", "--heldout", "art")
    one_line_error(code, o, e, "--prompt-csc", "promptfl and promptlocal")
    from fedclip_cache.sweep import expand

    points = expand(FederateConfig(algo="fedpgp"), {"pgp_rank": [1, 8], "pgp_mu": [0.0, 1.0]})
    assert sorted((p.pgp_rank, p.pgp_mu) for p in points) == [(1, 0.0), (1, 1.0), (8, 0.0), (8, 1.0)]
