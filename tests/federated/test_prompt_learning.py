"""Prompt learning on the cache (PromptFL / CoOp) on a tiny random open_clip model."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip_cache.federated.prompts import PromptLearner
from fedclip_cache.cache.models import load_model
from fedclip_cache.cache.config import ModelSpec

CLASSES = ["cat", "dog", "fish", "golden_retriever", "sea lion"]


@pytest.fixture(scope="module")
def lm(tiny_model):
    cfg, ckpt = tiny_model
    return load_model(ModelSpec(model_config=str(cfg), pretrained=str(ckpt)))


def tower_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class CoOpReference(torch.nn.Module):
    """A plain CoOp implementation (Zhou et al.'s PromptLearner + TextEncoder): full 77-token context,
    nn.Parameter context vectors, the model's own text path."""

    def __init__(self, model, tokenizer, classnames, ctx):
        super().__init__()
        self.model = model
        n_ctx = ctx.shape[0]
        prompts = [" ".join(["X"] * n_ctx) + " " + c.replace("_", " ") + "." for c in classnames]
        self.tokens = tokenizer(prompts)
        with torch.no_grad():
            emb = model.token_embedding(self.tokens)
        self.register_buffer("prefix", emb[:, :1])
        self.register_buffer("suffix", emb[:, 1 + n_ctx:])
        self.ctx = torch.nn.Parameter(ctx.clone())

    def forward(self, image_features, scale):
        m = self.model
        c = self.prefix.shape[0]
        x = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(c, -1, -1), self.suffix], dim=1)
        x = x + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(c), self.tokens.argmax(-1)] @ m.text_projection
        t = x / x.norm(dim=-1, keepdim=True)
        f = image_features / image_features.norm(dim=-1, keepdim=True)
        return scale * f @ t.t()


def test_truncated_equals_full_context_and_open_clip(lm):
    full = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4, truncate=False)
    short = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4)
    assert full.length == 77 and short.length == int(short.eot.max()) + 1 < 20
    ctx = short.init_ctx(3)
    torch.testing.assert_close(short.class_embeddings(ctx), full.class_embeddings(ctx), atol=1e-5, rtol=0)
    x = torch.randn(7, short.class_embeddings(ctx).shape[1])
    torch.testing.assert_close(short.logits(ctx, x, 100.0), full.logits(ctx, x, 100.0), atol=1e-5 * 100, rtol=0)
    # with the placeholder words' own embeddings as context it is exactly open_clip's encode_text of the prompts
    words = full.tokens[0, 1:5]
    with torch.no_grad():
        placeholder = lm.model.token_embedding(words)
        want = F.normalize(lm.model.encode_text(full.tokens), dim=-1)
    torch.testing.assert_close(short.class_embeddings(placeholder), want, atol=1e-5, rtol=0)


def test_ctx_init_from_a_phrase(lm):
    pl = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=16, ctx_init="a photo of a")
    assert pl.n_ctx == 4 and pl.num_params == 4 * 64
    with torch.no_grad():
        want = F.normalize(lm.model.encode_text(lm.tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])),
                           dim=-1)
    torch.testing.assert_close(pl.class_embeddings(pl.init_ctx(0)), want, atol=1e-5, rtol=0)
    rand = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=16).init_ctx(0)
    assert rand.shape == (16, 64) and 0.015 < float(rand.std()) < 0.025


def _room(tokenizer, classes, length=77):
    """The largest n_ctx whose prompts keep every class name, counted with the tokenizer's own BPE (not the
    code under test): SOS + n_ctx + name + '.' + EOT <= length."""
    return length - max(len(tokenizer.encode(f"{c.replace('_', ' ')}.")) + 2 for c in classes)


def test_every_class_prompt_keeps_its_name_or_is_refused(lm):
    """The real prompt of every class is counted against the text model's 77 tokens: an --n-ctx that would let the
    tokenizer cut the class names off (74/75) is refused in one line."""
    from fedclip_cache.errors import ConfigError

    classes = CLASSES + ["a very long class name of several words"]
    room = _room(lm.tokenizer, classes)
    assert 60 < room < 75
    pl = PromptLearner(lm.model, lm.tokenizer, classes, n_ctx=room)  # the largest that fits: every name whole
    names = [lm.tokenizer.encode(f"{c.replace('_', ' ')}.") for c in classes]
    for k, want in enumerate(names):
        got = pl.tokens[k, 1 + room:int(pl.eot[k])].tolist()
        assert got == want  # the class name and the '.' survive, right before the EOT
    assert int(pl.eot.max()) == 76
    for n_ctx in (room + 1, 74, 75, 76, 80):
        with pytest.raises(ConfigError) as e:
            PromptLearner(lm.model, lm.tokenizer, classes, n_ctx=n_ctx)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"--n-ctx {n_ctx}: the prompt of class "
                                                     f"'a very long class name of several words' would take "
                                                     f"{n_ctx + 77 - room} tokens")
        assert f"use --n-ctx {room} or less" in msg and "77" in msg


def test_a_ctx_init_phrase_too_long_for_the_prompts_is_refused_not_cut(lm):
    from fedclip_cache.errors import ConfigError

    room = _room(lm.tokenizer, CLASSES)
    phrase = " ".join(["photo"] * 100)  # 100 tokens: was cut to 75 and reported as "sets n_ctx = 75"
    with pytest.raises(ConfigError) as e:
        PromptLearner(lm.model, lm.tokenizer, CLASSES, ctx_init=phrase)
    msg = str(e.value)
    assert msg.startswith("--ctx-init 'photo photo") and "takes 100 tokens" in msg and "'golden retriever'" in msg
    assert f"use a phrase of at most {room} tokens" in msg and "\n" not in msg
    ok = PromptLearner(lm.model, lm.tokenizer, CLASSES, ctx_init=" ".join(["photo"] * room))
    assert ok.n_ctx == room and ok.init_ctx(0).shape == (room, 64)
    with pytest.raises(ConfigError, match="use a phrase of at most"):
        PromptLearner(lm.model, lm.tokenizer, CLASSES, ctx_init=" ".join(["photo"] * (room + 1)))
    with pytest.raises(ConfigError, match="no words to start the context from"):
        PromptLearner(lm.model, lm.tokenizer, CLASSES, ctx_init="   ")  # was silently a random context


def test_an_absurd_n_ctx_is_refused_before_any_allocation(lm):
    """--n-ctx 99999999999 built a prompt string of 10^11 placeholder words (~200 GB) before any check."""
    import tracemalloc

    from fedclip_cache.errors import ConfigError

    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"^--n-ctx 99999999999: .* use --n-ctx \d+ or less"):
            PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=99_999_999_999)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("momentum,decay,lr", [(0.0, 0.0, 0.5), (0.9, 5e-4, 0.05)])
def test_steps_equal_coop_reference_and_only_the_context_changes(lm, momentum, decay, lr):
    torch.manual_seed(0)
    n, d = 40, lm.model.text_projection.shape[1]
    X, Y = torch.randn(n, d), torch.randint(0, len(CLASSES), (n,))
    rng = np.random.default_rng(0)
    sched = [rng.permutation(n)[:8] for _ in range(4)] + [rng.permutation(n)[:3]]  # a short last batch
    pl = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4)
    start = pl.init_ctx(1)
    before = tower_state(lm.model)
    scale = 50.0  # with large steps (lr * 1 / (1 - momentum) = 0.5), so that a wrong gradient shows
    ref = CoOpReference(lm.model, lm.tokenizer, CLASSES, start)
    # PromptFL's optimiser: Dassl's SGD (momentum 0.9, weight decay 5e-4) over the prompt learner only
    opt = torch.optim.SGD([ref.ctx], lr=lr, momentum=momentum, weight_decay=decay)
    for k, b in enumerate(sched):
        bt = torch.from_numpy(b)
        opt.zero_grad()
        F.cross_entropy(ref(X[bt], scale), Y[bt]).backward()
        opt.step()
        # one call over the first k+1 batches = the reference after k+1 steps (momentum is per call)
        ours = pl.train(start.unsqueeze(0), [sched[:k + 1]], X, Y, lr, scale, momentum, decay)[0]
        torch.testing.assert_close(ours, ref.ctx.detach(), atol=1e-5, rtol=1e-5)
    assert (ours - start).abs().max() > 1e-3  # it moved
    after = tower_state(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the text tower is frozen
    assert not any(p.requires_grad for p in lm.model.parameters())
    # several clients in one call: each trains from its own start, independently
    # several clients in one call (side by side, schedules of different lengths): each trains from its own start,
    # independently, exactly as if alone; also when they are cut into passes of at most max_prompts prompts
    starts, parts = torch.stack([start, start * 2, -start]), [sched[:2], sched[2:], sched[1:4]]
    alone = [pl.train(s0.unsqueeze(0), [p], X, Y, lr, scale, momentum, decay)[0] for s0, p in zip(starts, parts)]
    for cap in (4096, len(CLASSES)):
        together = pl.train(starts, parts, X, Y, lr, scale, momentum, decay, max_prompts=cap)
        for k in range(3):
            torch.testing.assert_close(together[k], alone[k], atol=1e-5, rtol=1e-5)


def test_class_specific_context_equals_coop_csc_reference(lm):
    """CSC: every class has its own n_ctx vectors; steps equal CoOp with an (C, n_ctx, width) nn.Parameter."""
    torch.manual_seed(1)
    n, d = 30, lm.model.text_projection.shape[1]
    X, Y = torch.randn(n, d), torch.randint(0, len(CLASSES), (n,))
    pl = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=3, csc=True)
    start = pl.init_ctx(2)
    assert start.shape == (len(CLASSES), 3, 64) and pl.num_params == len(CLASSES) * 3 * 64
    assert not torch.equal(start[0], start[1])
    ref = CoOpReference(lm.model, lm.tokenizer, CLASSES, start[0])
    ref.ctx = torch.nn.Parameter(start.clone())

    def forward(image_features, scale):  # the reference with per-class contexts (CoOp's CSC branch)
        m, c = ref.model, ref.prefix.shape[0]
        x = torch.cat([ref.prefix, ref.ctx, ref.suffix], dim=1) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        t = F.normalize(x[torch.arange(c), ref.tokens.argmax(-1)] @ m.text_projection, dim=-1)
        return scale * F.normalize(image_features, dim=-1) @ t.t()

    opt = torch.optim.SGD([ref.ctx], lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = [np.arange(k, k + 10) % n for k in range(0, 30, 10)]
    for b in sched:
        opt.zero_grad()
        F.cross_entropy(forward(X[torch.from_numpy(b)], 50.0), Y[torch.from_numpy(b)]).backward()
        opt.step()
    ours = pl.train(start.unsqueeze(0), [sched], X, Y, 0.05, 50.0, 0.9, 5e-4)[0]
    torch.testing.assert_close(ours, ref.ctx.detach(), atol=1e-5, rtol=1e-5)
    # with a phrase every class starts from it
    ph = PromptLearner(lm.model, lm.tokenizer, CLASSES, ctx_init="a photo of a", csc=True).init_ctx(0)
    assert ph.shape == (len(CLASSES), 4, 64) and all(torch.equal(ph[0], ph[k]) for k in range(len(CLASSES)))


# ------------------------------------------------------------------------------------------- the CLI on a cache


@pytest.mark.parametrize("algo,csc", [("promptfl", False), ("promptlocal", False), ("promptfl", True)])
def test_federate_prompt_learning_writes_summary(algo, csc, cache_dir, tiny_model, tmp_path, monkeypatch, capsys, run):
    cfg, _ = tiny_model
    out = tmp_path / "run"
    ctx = ["--n-ctx", "4"] if algo == "promptfl" else ["--ctx-init", "a photo of a"]  # 4 tokens
    code, o, e = run("federate", cache_dir, "--algo", algo, "--rounds", "2", *ctx,
                     "--heldout", "art", "--text-model-config", cfg, "--out", out, *(["--prompt-csc"] * csc))
    assert code == 0, o + e
    s = json.loads((out / "summary.json").read_text())
    assert s["adapter"] == "none" and s["loss"] == "ce" and s["prompt"]["n_ctx"] == 4 and s["prompt"]["width"] == 64
    assert s["mean"]["heldout_best"] is not None and s["mean"]["test_mean_best"] is not None
    cfg_json = json.loads((out / "config.json").read_text())
    assert s["prompt"]["class_specific"] is csc and s["prompt"]["momentum"] == 0.9
    # --ctx-init decides n_ctx (CoOp); the default --n-ctx 16 it overrides is said, not silently dropped
    overridden = [n for n in s["notes"] if "--n-ctx 16 is not used" in n]
    assert overridden == (["--ctx-init 'a photo of a' sets n_ctx = 4, its token count (as CoOp); --n-ctx 16 is not "
                           "used"] if algo == "promptlocal" else [])
    assert cfg_json["federate"]["prompt_momentum"] == 0.9 and cfg_json["federate"]["prompt_weight_decay"] == 5e-4
    n = 4 * 64 * (3 if csc else 1)  # the cache has 3 classes: CSC learns a context per class
    comm = s["communication"]
    assert comm["trainable_params"] == n and comm["bytes_per_adapter"] == n * 4
    if algo == "promptfl":  # 2 training clients, each downloads and uploads the context every round
        assert comm["bytes_up_per_round"] == 2 * n * 4 and comm["bytes_total"] == 2 * 2 * 2 * n * 4
    else:
        assert comm["bytes_total"] == 0


def test_prompt_learning_refuses_a_model_it_cannot_load_or_that_is_not_the_caches(cache_dir, tmp_path, monkeypatch,
                                                                                    capsys, tiny_model, run):
    from fedclip_cache.synthetic import write_tiny_model

    def one_line_error(*args):
        code, o, e = run("federate", cache_dir, "--algo", "promptfl", "--rounds", "1",
                         "--heldout", "art", *args)
        msg = e.strip()
        assert code == 2 and "Traceback" not in o + e and msg.startswith("error:") and "\n" not in msg, (code, o, e)
        return msg

    # the custom architecture is recorded by hash only
    assert "--text-model-config" in one_line_error()
    # weights that cannot be loaded
    other_cfg, other_ckpt = write_tiny_model(tmp_path / "other", seed=1)
    msg = one_line_error("--text-model-config", other_cfg, "--text-pretrained", tmp_path / "missing.pt")
    assert "cannot load" in msg
    # another model's weights (same architecture, other seed): the fingerprint differs
    msg = one_line_error("--text-model-config", other_cfg, "--text-pretrained", other_ckpt)
    assert "not the cache's model" in msg and "weights" in msg
    # more context vectors than the text tower's 77 tokens hold beside a class name (75: was accepted, every
    # class prompt cut to the same text)
    for n_ctx in ("80", "75"):
        msg = one_line_error("--text-model-config", tiny_model[0], "--n-ctx", n_ctx)
        assert msg.startswith(f"error: --n-ctx {n_ctx}: the prompt of class ") and "the text tower's 77" in msg
        assert "or less (the largest that fits every class)" in msg


def test_promptfl_rounds_are_fedavg_of_client_prompts_and_are_scored_with_them(cache_dir, tiny_model):
    """Two rounds by hand: every client trains the global context on its own batches (PromptLearner.train, checked
    against CoOp above) with the round's step size (cosine: lr, then lr / 2), the server takes their uniform mean;
    validation accuracy is that context's."""
    from fedclip_cache import open_cache
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.loop import run_loop
    from fedclip_cache.federated.protocols import build_experiments
    from fedclip_cache.federated.train import LocalHyper, batch_schedule, lane_key

    cfg_file, _ = tiny_model
    cache = open_cache(cache_dir)
    cfg = FederateConfig(algo="promptfl", rounds=2, n_ctx=2, prompt_lr=0.05, heldout=["art"], batch_size=4,
                         prompt_schedule="cosine", text_model_config=str(cfg_file)).validate()
    exps = build_experiments(cache, cfg)
    res = run_loop(cache, cfg, exps)
    lm = load_model(ModelSpec(model_config=str(cfg_file), pretrained=cache.meta["model"]["pretrained"]))
    pl = PromptLearner(lm.model, lm.tokenizer, cache.classes, n_ctx=2)
    X, Y = torch.from_numpy(np.asarray(cache.features)), torch.from_numpy(cache.labels)
    e = exps[0]
    hp = LocalHyper(batch_size=4)
    want = pl.init_ctx(e.seed)
    for rnd, lr in ((1, 0.05), (2, 0.025)):
        trained = [pl.train(want.unsqueeze(0), [batch_schedule(cl.train, e.seed, rnd, lane_key(e.name, cl.name), hp)],
                            X, Y, lr, res.logit_scale, cfg.prompt_momentum, cfg.prompt_weight_decay)[0]
                   for cl in e.clients]
        want = torch.stack(trained).mean(0)
    torch.testing.assert_close(res.final_params["ctx"][0], want, atol=1e-6, rtol=1e-5)
    assert (want - pl.init_ctx(e.seed)).abs().max() > 1e-4
    # the loop scores each client's validation split against the averaged context's class embeddings
    T = pl.class_embeddings(want).detach()
    assert len(e.clients) == 2 and sum(seg["split"] == "val" for seg in res.segments) == 2
    for si, seg in enumerate(res.segments):
        if seg["split"] == "val":
            cl = next(c for c in e.clients if c.name == seg["client"])
            acc = float((F.normalize(X[cl.val], dim=-1) @ T.t()).argmax(-1).eq(Y[cl.val]).float().mean())
            assert res.acc[-1, si] == pytest.approx(acc)


def test_training_beats_misaligned_zero_shot_prompts(lm):
    """Image features lie at the class embeddings of the phrase 'a photo of a'; the learner starts from random
    context (zero-shot prompts misaligned with them) and recovers with the default step size (PromptFL's 0.001)."""
    classes = ["cat", "dog", "fish", "bird", "horse"]
    pl = PromptLearner(lm.model, lm.tokenizer, classes, n_ctx=4)
    target = PromptLearner(lm.model, lm.tokenizer, classes, ctx_init="a photo of a").init_ctx(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        T = pl.class_embeddings(target)
    Y = torch.randint(0, len(classes), (200,), generator=g)
    X = T[Y] + 0.01 * torch.randn(200, T.shape[1], generator=g)
    start = pl.init_ctx(0)

    def acc(ctx):
        with torch.no_grad():
            return float(pl.logits(ctx, X, 100.0).argmax(-1).eq(Y).float().mean())

    rng = np.random.default_rng(0)
    trained = pl.train(start.unsqueeze(0), [[rng.permutation(200)[:32] for _ in range(30)]], X, Y, 0.001, 100.0)[0]
    zero, after = acc(start), acc(trained)
    assert zero < 0.6 and after > zero + 0.3, (zero, after)


def test_shipped_prompt_pipeline_loads():
    from pathlib import Path

    from fedclip_cache.pipeline import load

    cfg = load(Path(__file__).resolve().parents[2] / "pipelines" / "pacs-promptfl.toml")
    f = cfg["federate"]
    assert (f["algo"], f["n_ctx"], f["prompt_lr"], f["batch_size"]) == ("promptfl", 16, 0.001, 32)
    assert cfg["sweep"]["grid"]["algo"] == ["promptfl", "promptlocal"]
    assert (f["prompt_momentum"], f["prompt_weight_decay"]) == (0.9, 5e-4)  # PromptFL's (Dassl's) SGD
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.sweep import expand

    points = expand(FederateConfig(algo="promptfl"), cfg["sweep"]["grid"])
    assert len(points) == 8 and sum(p.prompt_csc for p in points) == 4


def test_adapter_options_are_reported_as_ignored_by_prompt_learning():
    from fedclip_cache.federated.config import FederateConfig

    assert FederateConfig(algo="promptfl", lr=0.1, adapter="residual", n_ctx=4).ignored_options() == \
        ["adapter", "lr"]
    assert FederateConfig(algo="fedclip", lr=0.1, n_ctx=4).ignored_options() == ["n_ctx"]
    assert FederateConfig(algo="promptlocal", prompt_lr=0.01).ignored_options() == []


def test_round_lr():
    from fedclip_cache.federated.prompts import round_lr

    assert [round_lr(0.1, r, 4) for r in (1, 4)] == [0.1, 0.1]
    assert [round_lr(0.1, r, 4, "cosine") for r in (1, 3)] == pytest.approx([0.1, 0.05])


def test_finetune_steps_fine_tune_the_selected_prompt_per_client(cache_dir, tiny_model):
    """--finetune-steps with promptfl: each client fine-tunes the selected global context for K steps with the prompt
    optimiser (PromptLearner.train, checked against CoOp above) on its own train batches; its test split is scored
    against its own context's class embeddings."""
    from fedclip_cache import open_cache
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.loop import finetune_schedule, run_loop
    from fedclip_cache.federated.protocols import build_experiments
    from fedclip_cache.federated.results import federate
    from fedclip_cache.federated.train import LocalHyper, lane_key

    cfg_file, _ = tiny_model
    cache = open_cache(cache_dir)
    base = dict(algo="promptfl", rounds=3, n_ctx=2, prompt_lr=0.05, heldout=["art"], batch_size=4,
                text_model_config=str(cfg_file))
    s = federate(cache, FederateConfig(**base, finetune_steps=3).validate())
    e = s["experiments"][0]
    assert not any("finetune" in n for n in s["notes"])
    best = e["best"]["round"]
    upto = run_loop(cache, FederateConfig(**{**base, "rounds": best}).validate(),
                    build_experiments(cache, FederateConfig(**base).validate()))
    g = upto.final_params["ctx"][0]
    lm = load_model(ModelSpec(model_config=str(cfg_file), pretrained=cache.meta["model"]["pretrained"]))
    pl = PromptLearner(lm.model, lm.tokenizer, cache.classes, n_ctx=2)
    X, Y = torch.from_numpy(np.asarray(cache.features)), torch.from_numpy(cache.labels)
    exp = build_experiments(cache, FederateConfig(**base).validate())[0]
    moved = 0.0
    for cl in exp.clients:
        sched = finetune_schedule(cl.train, exp.seed, lane_key(exp.name, cl.name), 3, LocalHyper(batch_size=4))
        ctx = pl.train(g.unsqueeze(0), [sched], X, Y, 0.05, upto.logit_scale, 0.9, 5e-4)[0]
        moved = max(moved, float((ctx - g).abs().max()))
        t = torch.from_numpy(cl.test)
        acc = float(pl.logits(ctx, X[t], 1.0).argmax(-1).eq(Y[t]).float().mean())
        assert e["best"]["test_finetuned"][cl.name] == pytest.approx(acc, abs=1e-6), cl.name
    assert moved > 1e-4
