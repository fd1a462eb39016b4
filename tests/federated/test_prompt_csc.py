"""CoOp's class-specific context (--prompt-csc) in federated rounds: promptfl averages (C, n_ctx, width) contexts
with FedAvg, promptlocal keeps one per client; both equal a plain CoOp CSC re-implementation (torch.optim.SGD over
an nn.Parameter, full 77-token prompts through the model's own text path) run client by client."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip_cache.cache.config import ModelSpec
from fedclip_cache.cache.models import load_model


def coop_sgd(model, tokenizer, classnames, ctx0, batches, X, Y, lr, scale, momentum, decay):
    """CoOp's PromptLearner (class_token_position 'end'; CSC when ``ctx0`` is (C, n_ctx, width)) trained by SGD
    on the cross-entropy of cosine logits, one step per batch; returns the trained context."""
    n_ctx, c = ctx0.shape[-2], len(classnames)
    tokens = tokenizer([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "." for n in classnames])
    with torch.no_grad():
        emb = model.token_embedding(tokens)
    ctx = torch.nn.Parameter(ctx0.clone())
    opt = torch.optim.SGD([ctx], lr=lr, momentum=momentum, weight_decay=decay)
    for b in batches:
        b = torch.from_numpy(np.asarray(b))
        per_class = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(c, -1, -1)
        x = torch.cat([emb[:, :1], per_class, emb[:, 1 + n_ctx:]], dim=1) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        t = F.normalize(x[torch.arange(c), tokens.argmax(-1)] @ model.text_projection, dim=-1)
        opt.zero_grad()
        F.cross_entropy(scale * F.normalize(X[b], dim=-1) @ t.t(), Y[b]).backward()
        opt.step()
    return ctx.detach()


@pytest.mark.parametrize("algo", ["promptfl", "promptlocal"])
def test_csc_rounds_equal_coop_csc_reference(algo, cache_dir, tiny_model):
    from fedclip_cache import open_cache
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.loop import run_loop
    from fedclip_cache.federated.prompts import CTX_INIT_STD
    from fedclip_cache.federated.protocols import build_experiments
    from fedclip_cache.federated.train import LocalHyper, batch_schedule, lane_key

    cfg_file, _ = tiny_model
    cache = open_cache(cache_dir)
    cfg = FederateConfig(algo=algo, rounds=2, n_ctx=2, prompt_csc=True, prompt_lr=0.05, heldout=["art"],
                         batch_size=4, text_model_config=str(cfg_file)).validate()
    exps = build_experiments(cache, cfg)
    res = run_loop(cache, cfg, exps)
    lm = load_model(ModelSpec(model_config=str(cfg_file), pretrained=cache.meta["model"]["pretrained"]))
    X, Y = torch.from_numpy(np.asarray(cache.features)), torch.from_numpy(cache.labels)
    e = exps[0]
    c = len(cache.classes)
    start = torch.randn(c, 2, 64, generator=torch.Generator().manual_seed(e.seed)) * CTX_INIT_STD  # CoOp's init
    own = {cl.name: start for cl in e.clients}
    for rnd in (1, 2):
        for cl in e.clients:
            sched = batch_schedule(cl.train, e.seed, rnd, lane_key(e.name, cl.name), LocalHyper(batch_size=4))
            own[cl.name] = coop_sgd(lm.model, lm.tokenizer, cache.classes, own[cl.name], sched, X, Y, 0.05,
                                    res.logit_scale, 0.9, 5e-4)
        if algo == "promptfl":  # uniform FedAvg of the clients' (C, n_ctx, width) contexts, sent back to all
            mean = torch.stack(list(own.values())).mean(0)
            own = {k: mean for k in own}
    got = res.final_params["ctx"]
    assert got.shape == ((1 if algo == "promptfl" else len(e.clients)), c, 2, 64)
    if algo == "promptfl":
        torch.testing.assert_close(got[0], next(iter(own.values())), atol=2e-6, rtol=1e-5)
    else:  # one lane per client, largest train split first (loop.client_lanes)
        from fedclip_cache.federated.loop import client_lanes

        for li, ln in enumerate(client_lanes(exps)):
            torch.testing.assert_close(got[li], own[e.clients[ln.client].name], atol=2e-6, rtol=1e-5)
    assert not torch.allclose(got[0][0], got[0][1])  # the classes' contexts differ (drawn apart, trained apart)
    assert (got[0] - start).abs().max() > 1e-4


def test_csc_is_a_prompt_option():
    """--prompt-csc means nothing to adapter algorithms: reported as set-but-ignored (like every prompt option);
    refused with fedpgp, whose context is one shared sigma + U V (see test_fedpgp)."""
    from fedclip_cache.federated.config import FederateConfig

    assert FederateConfig(algo="fedclip", prompt_csc=True).validate().ignored_options() == ["prompt_csc"]
    assert FederateConfig(algo="promptlocal", prompt_csc=True).validate().ignored_options() == []
