"""--finetune-steps with prompt methods: each client fine-tunes the selected global context (shared or
class-specific) for K steps and is scored on its own test split, equal to a plain CoOp re-implementation
(torch.optim.SGD over an nn.Parameter, the model's own text path) run from that context; the adapters' code path
(loop.finetune_schedule / finetune) picks the batches and the model. Personal prompt methods say it is ignored."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip_cache.cache.config import ModelSpec
from fedclip_cache.cache.models import load_model


class CoOp(torch.nn.Module):
    """CoOp's prompt learner and text encoder (class token at the end; CSC when ctx is (C, n_ctx, width))."""

    def __init__(self, model, tokenizer, classnames, ctx):
        super().__init__()
        self.model, self.c, n_ctx = model, len(classnames), ctx.shape[-2]
        self.tokens = tokenizer([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "." for n in classnames])
        with torch.no_grad():
            emb = model.token_embedding(self.tokens)
        self.prefix, self.suffix = emb[:, :1], emb[:, 1 + n_ctx:]
        self.ctx = torch.nn.Parameter(ctx.clone())

    def text(self):
        m = self.model
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(self.c, -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        return F.normalize(x[torch.arange(self.c), self.tokens.argmax(-1)] @ m.text_projection, dim=-1)

    def forward(self, x, scale):
        return scale * F.normalize(x, dim=-1) @ self.text().t()


@pytest.mark.parametrize("csc", [False, True])
def test_finetuned_prompt_accuracy_equals_coop_reference(csc, cache_dir, tiny_model):
    from fedclip_cache import open_cache
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.loop import finetune_schedule, run_loop
    from fedclip_cache.federated.protocols import build_experiments
    from fedclip_cache.federated.results import federate
    from fedclip_cache.federated.train import LocalHyper, lane_key

    cfg_file, _ = tiny_model
    cache = open_cache(cache_dir)
    base = dict(algo="promptfl", rounds=2, n_ctx=2, prompt_lr=0.05, heldout=["art"], batch_size=4,
                prompt_csc=csc, text_model_config=str(cfg_file))
    s = federate(cache, FederateConfig(**base, finetune_steps=3).validate())
    e = s["experiments"][0]
    # the selected round's global context: the same run stopped there
    exps = build_experiments(cache, FederateConfig(**base).validate())
    g = run_loop(cache, FederateConfig(**{**base, "rounds": e["best"]["round"]}).validate(), exps)
    start, scale = g.final_params["ctx"][0], g.logit_scale
    assert start.dim() == (3 if csc else 2)
    lm = load_model(ModelSpec(model_config=str(cfg_file), pretrained=cache.meta["model"]["pretrained"]))
    X, Y = torch.from_numpy(np.asarray(cache.features)), torch.from_numpy(cache.labels)
    exp = exps[0]
    accs = []
    for cl in exp.clients:
        ref = CoOp(lm.model, lm.tokenizer, cache.classes, start)
        opt = torch.optim.SGD([ref.ctx], lr=0.05, momentum=0.9, weight_decay=5e-4)  # a fresh prompt optimiser
        sched = finetune_schedule(cl.train, exp.seed, lane_key(exp.name, cl.name), 3, LocalHyper(batch_size=4))
        assert len(sched) == 3  # K steps, over more than one epoch of a small split
        for b in sched:
            b = torch.from_numpy(b)
            opt.zero_grad()
            F.cross_entropy(ref(X[b], scale), Y[b]).backward()
            opt.step()
        assert (ref.ctx.detach() - start).abs().max() > 1e-4
        t = torch.from_numpy(cl.test)
        with torch.no_grad():
            acc = float(ref(X[t], scale).argmax(-1).eq(Y[t]).float().mean())
        assert e["best"]["test_finetuned"][cl.name] == pytest.approx(acc, abs=1e-6), cl.name
        accs.append(acc)
    assert s["mean"]["test_mean_finetuned"] == pytest.approx(np.mean(accs))


@pytest.mark.parametrize("algo", ["promptlocal", "fedpgp"])
def test_personal_prompt_methods_say_finetuning_is_ignored(algo):
    from fedclip_cache.federated.algorithms import get_algorithm
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.loop import finetune_notes

    cfg = FederateConfig(algo=algo, finetune_steps=5).validate()
    assert finetune_notes(cfg, get_algorithm(algo)(cfg), 1) == [
        f"--finetune-steps ignored: {algo} keeps a model per client already"]
