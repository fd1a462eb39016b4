"""CoOp prompt learning on cached image features (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022), the local learner of PromptFL (Guo et al., 2023).

Each class prompt is ``[SOS] X_1 ... X_n {classname}. [EOT]``: the n learned context vectors X (shared by all
classes: CSC off) replace the token embeddings of n placeholder words, the rest of the prompt is the frozen token
embedding. The text tower (transformer, ln_final, text_projection) is frozen; only the context vectors get
gradients. Image features come from the cache (the image encoder is frozen too), so a training step is one text
forward over the C class prompts and a (B, C) matmul.

Exact speed-up: the text transformer is causal, so the features at the EOT token never depend on the tokens after
it. The prompts are therefore run truncated to the longest one (max EOT position + 1) instead of the full context
length (77): the same logits (to float rounding) for a fraction of the work.

This module imports torch; the algorithm registry (``algorithms/prompt.py``) imports it lazily.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..cache.sources import quoted
from .precision import autocast
from .sidebyside import StackedBatch, sgd_side_by_side

CTX_INIT_STD = 0.02  # CoOp: nn.init.normal_(ctx_vectors, std=0.02)
PLACEHOLDER = "X"  # CoOp's prompt_prefix = " ".join(["X"] * n_ctx)


def text_tower(model: torch.nn.Module):
    """The module holding token_embedding, positional_embedding, transformer, ln_final, text_projection, attn_mask
    (open_clip's CLIP itself, or CustomTextCLIP's ``.text``); ConfigError when prompts cannot be learned on it."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    need = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if tower is None or not all(hasattr(tower, n) for n in need):
        raise ConfigError(f"{type(model).__name__}: prompt learning needs an open_clip text transformer "
                          f"(token_embedding ... text_projection); this model's text tower has none")
    pool = getattr(tower, "text_pool_type", "argmax")
    if pool != "argmax" or getattr(tower, "cls_emb", None) is not None:
        raise ConfigError(f"prompt learning supports text towers pooled at the EOT token (argmax, OpenAI "
                          f"tokenizer); this one pools with {pool!r}")
    return tower


def context_length(tower, tokenizer) -> int:
    """Tokens a prompt may take: the tokenizer's context (what it pads and cuts to), never more than the text
    tower's positional embeddings."""
    n = getattr(tokenizer, "context_length", None) or int(tokenizer([""]).shape[1])
    return min(int(n), int(tower.positional_embedding.shape[0]))


def token_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens each text takes with its SOS and EOT, never cut: tokenised at a context longer than the longest text
    (byte-level BPE gives at most one token per UTF-8 byte; doubled while a text still reaches the end, in case the
    tokenizer's cleaning lengthens one). The EOT is the highest token id (OpenAI tokenizer)."""
    n = max((len(t.encode()) for t in texts), default=0) + 3
    while True:
        tok = tokenizer(list(texts), context_length=n)
        if not bool(tok[:, -1].any()):
            return (tok.argmax(-1) + 1).tolist()
        n *= 2


def fitted_prompts(tokenizer, names: Sequence[str], n_ctx: int, ctx_init: Optional[str],
                   length: int) -> tuple[list[str], int]:
    """The class prompts ``{context} {name}.`` and the context's token count (``ctx_init``'s own count when given,
    as CoOp). Refused in one line unless every class's real prompt fits the text tower's ``length`` tokens: the
    tokenizer cuts a longer prompt silently, and the class name goes first (``--n-ctx 75`` with 77 tokens: every
    class prompt is the same text). The error names the option, the longest class and the largest context that
    fits. ``n_ctx`` is checked against the names' own token counts before any prompt is built, so an absurd value
    allocates nothing."""
    if ctx_init is not None:
        n_ctx = token_lengths(tokenizer, [ctx_init])[0] - 2 if ctx_init else 0  # minus SOS and EOT
        if n_ctx < 1:
            raise ConfigError(f"--ctx-init {ctx_init!r}: no words to start the context from")
    elif n_ctx < 1:
        raise ConfigError(f"--n-ctx {n_ctx}: must be at least 1")
    # SOS + name + '.' + EOT of each class: what its prompt takes beside the context
    rest = token_lengths(tokenizer, [f"{n}." for n in names])
    if n_ctx + max(rest, default=0) > length:
        _refuse(names, rest, n_ctx, ctx_init, length)
    prefix = ctx_init or " ".join([PLACEHOLDER] * n_ctx)
    prompts = [f"{prefix} {n}." for n in names]
    real = token_lengths(tokenizer, prompts)  # the prompts themselves, as the text tower will see them
    if max(real, default=0) > length:
        _refuse(names, [r - n_ctx for r in real], n_ctx, ctx_init, length)
    return prompts, n_ctx


def _refuse(names: Sequence[str], rest: Sequence[int], n_ctx: int, ctx_init: Optional[str], length: int):
    i = int(np.argmax(rest))
    room = length - rest[i]  # the largest context that fits beside every class
    what = (f"--ctx-init {quoted(ctx_init, 40)} takes {n_ctx} tokens" if ctx_init else f"--n-ctx {n_ctx}")
    fix = ("no context fits beside this class name; shorten it" if room < 1 else
           f"use a phrase of at most {room} tokens" if ctx_init else f"use --n-ctx {room} or less")
    largest = "" if room < 1 else " (the largest that fits every class)"
    raise ConfigError(f"{what}: the prompt of class {quoted(names[i], 40)} would take {n_ctx + rest[i]} tokens ({n_ctx} "
                      f"context + {rest[i]} for SOS, its name, '.' and EOT), more than the text tower's {length}, "
                      f"and the tokenizer would cut its name; {fix}{largest}")


def _plain_blocks(transformer) -> bool:
    """Whether every block of an open_clip text transformer is the standard pre-LN block (ln_1 -> self-attention by
    a batch-first nn.MultiheadAttention without extras -> ls_1; ln_2 -> mlp -> ls_2) that :func:`_block` computes."""
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not getattr(transformer, "batch_first", False) or getattr(transformer, "grad_checkpointing",
                                                                                   False):
        return False
    need = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
    return all(all(hasattr(b, n) for n in need) and not hasattr(b, "ln_1_kv")
               and isinstance(b.attn, torch.nn.MultiheadAttention) and b.attn.batch_first
               and b.attn.in_proj_weight is not None and b.attn.bias_k is None and not b.attn.add_zero_attn
               and (b.attn.dropout == 0 or not b.attn.training) for b in blocks)


def _block(b, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One standard block (:func:`_plain_blocks`) on batch-first x (N, L, E): open_clip's ResidualAttentionBlock,
    with the attention written out (packed in-projection on the contiguous (N, L, E) input, scaled dot-product
    attention, out-projection) -- what nn.MultiheadAttention computes."""
    attn = b.attn
    n, length, e = x.shape
    heads = attn.num_heads
    y = b.ln_1(x)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(n, length, 3, heads, e // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, E / heads)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
    o = F.linear(o.transpose(1, 2).reshape(n, length, e), attn.out_proj.weight, attn.out_proj.bias)
    x = x + b.ls_1(o)
    return x + b.ls_2(b.mlp(b.ln_2(x)))


def text_transformer(transformer, x: torch.Tensor, mask: Optional[torch.Tensor], precision: str) -> torch.Tensor:
    """The text transformer on batch-first prompts x (N, L, width). fp32: the tower's own forward (the reference,
    unchanged). bf16 (called under bf16 autocast): the same blocks with the attention written out (:func:`_block`),
    when they are standard. Why: nn.MultiheadAttention (batch_first) transposes its input to (L, N, E) and its
    in-projection then multiplies the non-contiguous input by the weight expanded over the batch; in fp32 that
    expansion is a free view, but bf16 autocast materialises it (N copies of the 512 x 1536 weight per layer and
    pass) and the step was no faster than fp32 (ViT-B-32 text tower, 3 x 7 prompts of 20 tokens, 2 threads:
    0.53 s vs 0.48 s; measured 2026-12-07). Written out, the projections are single contiguous GEMMs."""
    if precision == "fp32" or not _plain_blocks(transformer):
        return transformer(x, attn_mask=mask)
    for b in transformer.resblocks:
        x = _block(b, x, mask)
    return x


class PromptLearner:
    """The frozen text tower with class prompts ``X*n_ctx classname.``; :meth:`class_embeddings` maps context
    vectors (n_ctx, width) to L2-normalised class embeddings (C, D), differentiable in the context only."""

    def __init__(self, model: torch.nn.Module, tokenizer, classnames: Sequence[str], n_ctx: int = 16,
                 ctx_init: Optional[str] = None, truncate: bool = True, device: torch.device | str = "cpu",
                 csc: bool = False, precision: str = "fp32"):
        self.tower = tower = text_tower(model)
        self.precision = precision  # of the training passes (--precision); evaluation (heads) is always fp32
        self.device = torch.device(device)
        self.ctx_init_vectors: Optional[torch.Tensor] = None
        if ctx_init is not None:
            ctx_init = ctx_init.replace("_", " ").strip()
        names = [name.replace("_", " ") for name in classnames]
        prompts, n_ctx = fitted_prompts(tokenizer, names, n_ctx, ctx_init, context_length(tower, tokenizer))
        self.n_ctx = n_ctx
        self.csc = bool(csc)
        self.n_cls = len(classnames)
        tokens = tokenizer(prompts).to(self.device)  # (C, context_length); every prompt fits (checked above)
        self.tokens = tokens
        self.eot = tokens.argmax(-1)  # the EOT token has the highest id (OpenAI tokenizer)
        self.full_length = tokens.shape[1]
        self.length = int(self.eot.max()) + 1 if truncate else self.full_length
        with torch.no_grad():
            emb = tower.token_embedding(tokens).float()  # (C, L, width)
        self.width = emb.shape[-1]
        if ctx_init is not None:
            self.ctx_init_vectors = emb[0, 1:1 + n_ctx].clone()
        self.prefix = emb[:, :1]  # SOS
        self.suffix = emb[:, 1 + n_ctx:]  # class name, '.', EOT, padding
        self.attn_mask = tower.attn_mask
        self.rows = torch.arange(len(classnames), device=self.device)

    @property
    def ctx_shape(self) -> tuple[int, ...]:
        """(n_ctx, width), or (C, n_ctx, width) with class-specific contexts (CSC)."""
        return (self.n_cls, self.n_ctx, self.width) if self.csc else (self.n_ctx, self.width)

    @property
    def num_params(self) -> int:
        return int(np.prod(self.ctx_shape))

    def init_ctx(self, seed: int) -> torch.Tensor:
        """Starting context (:attr:`ctx_shape`): the phrase's token embeddings (every class's, with CSC), or
        N(0, 0.02^2) seeded."""
        if self.ctx_init_vectors is not None:
            v = self.ctx_init_vectors.clone().cpu()
            return v.unsqueeze(0).repeat(self.n_cls, 1, 1) if self.csc else v
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(*self.ctx_shape, generator=g) * CTX_INIT_STD

    def class_embeddings(self, ctx: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        """L2-normalised class embeddings (C, D) for context vectors ``ctx`` (:attr:`ctx_shape`)."""
        return self.class_embeddings_many(ctx.unsqueeze(0), length)[0]

    def class_embeddings_many(self, ctx: torch.Tensor, length: Optional[int] = None,
                              precision: str = "fp32") -> torch.Tensor:
        """Class embeddings (A, C, D) of A contexts (A, *ctx_shape) in one text-tower pass over A x C prompts;
        ``precision`` bf16: the pass under bf16 autocast (:func:`text_transformer`), the embeddings fp32."""
        t = self.tower
        n = self.length if length is None else length
        a, c = ctx.shape[0], self.n_cls
        ctx = ctx if self.csc else ctx.unsqueeze(1).expand(-1, c, -1, -1)  # (A, C, n_ctx, width)
        prefix = self.prefix.unsqueeze(0).expand(a, -1, -1, -1)
        suffix = self.suffix[:, :max(n - 1 - self.n_ctx, 0)].unsqueeze(0).expand(a, -1, -1, -1)
        x = torch.cat([prefix, ctx, suffix], dim=2)[:, :, :n].reshape(a * c, n, self.width)
        cast = t.transformer.get_cast_dtype() if hasattr(t.transformer, "get_cast_dtype") else x.dtype
        x = x.to(cast) + t.positional_embedding[:n].to(cast)
        mask = self.attn_mask[:n, :n].contiguous() if self.attn_mask is not None else None
        with autocast(precision, x.device):
            x = text_transformer(t.transformer, x, mask, precision)
            x = t.ln_final(x)
            x = x[torch.arange(a * c, device=x.device), self.eot.repeat(a)]
            proj = t.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, torch.nn.Module) else x @ proj
        return F.normalize(x.float(), dim=-1).reshape(a, c, -1)

    def logits(self, ctx: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, C) logits of raw image features x (B, D): scale * normalise(x) @ class_embeddings^T."""
        return scale * F.normalize(x, dim=-1) @ self.class_embeddings(ctx).t()

    def train(self, start: torch.Tensor, schedules: list[list[np.ndarray]], X, Y: torch.Tensor, lr: float,
              scale: float, momentum: float = 0.0, weight_decay: float = 0.0,
              max_prompts: int = 4096) -> torch.Tensor:
        """Local training of several clients: client s starts from ``start[s]`` (:attr:`ctx_shape`) and takes one
        SGD step per batch of ``schedules[s]`` on the cross-entropy of its class logits, with torch.optim.SGD's
        semantics (``g += weight_decay * w; buf = momentum * buf + g; w -= lr * buf``; a fresh momentum buffer per
        call, i.e. per client and round). Returns the trained contexts.

        Clients are trained side by side: step t runs one text-tower pass over the prompts of every client that
        still has a t-th batch (at most ``max_prompts`` prompts per pass, so memory stays bounded); each client's
        loss depends on its own context only, so the summed loss gives every client its own gradient."""
        # Why side by side (one text pass over every sampled client's prompts): the text tower's cost is per step,
        # not per image, and one pass of 3 x 7 prompts beats 3 passes of 7 (ViT-B-32 text tower, PACS-shaped, 2
        # threads: 1.35x in fp32 on a quiet machine, bench/README; 2026-12-07 under load ~10, best of 3: fp32 14.2 s
        # vs 27.5 s per step of all three, bf16 8.7 s vs 20.4 s; with 1 thread the two are equal within noise).
        out = start.detach().clone()
        per = max(1, max_prompts // max(self.n_cls, 1))
        for lo in range(0, len(schedules), per):
            hi = min(len(schedules), lo + per)
            out[lo:hi] = self._train_side_by_side(out[lo:hi], schedules[lo:hi], X, Y, lr, scale, momentum,
                                                  weight_decay)
        return out

    def _train_side_by_side(self, ctx, schedules, X, Y, lr, scale, momentum, weight_decay) -> torch.Tensor:
        def loss(p: dict, batch: StackedBatch) -> torch.Tensor:  # each client's mean cross-entropy, summed
            T = self.class_embeddings_many(p["ctx"], precision=self.precision)  # (A, C, D), fp32
            logits = scale * torch.bmm(F.normalize(batch.xs, dim=-1), T.transpose(1, 2))
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.ys.reshape(-1), reduction="none")
            return ((ce.reshape(batch.valid.shape) * batch.valid).sum(1) / batch.sizes).sum()
        return sgd_side_by_side({"ctx": ctx}, schedules, X, Y, loss, lr, momentum, weight_decay)["ctx"]

    @torch.no_grad()
    def heads(self, ctxs: torch.Tensor) -> torch.Tensor:
        """Class embeddings of several contexts (G, *ctx_shape) -> (G, C, D), for evaluation."""
        per = max(1, 4096 // max(self.n_cls, 1))
        return torch.cat([self.class_embeddings_many(ctxs[i:i + per]) for i in range(0, len(ctxs), per)])


class ContextParams:
    """CoOp / PromptFL's parameter set ``{"ctx": (*ctx_shape)}`` over a :class:`PromptLearner`: the interface the
    loop trains and scores every prompt method through (``param_shapes``, ``init_params``, ``train``, ``heads``,
    ``num_params``, ``communicated_params``; FedPGP's is ``pgp.PGPLearner``). Parameters are dicts of tensors
    stacked over clients."""

    def __init__(self, base: PromptLearner):
        self.base = base

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"ctx": self.base.ctx_shape}

    @property
    def num_params(self) -> int:
        return self.base.num_params

    @property
    def communicated_params(self) -> int:
        return self.base.num_params

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        return {"ctx": self.base.init_ctx(seed)}

    def train(self, start: dict, schedules: list[list[np.ndarray]], X, Y: torch.Tensor, lr: float, scale: float,
              momentum: float = 0.0, weight_decay: float = 0.0) -> dict:
        return {"ctx": self.base.train(start["ctx"], schedules, X, Y, lr, scale, momentum, weight_decay)}

    def heads(self, params: dict) -> torch.Tensor:
        return self.base.heads(params["ctx"])


def round_lr(lr: float, rnd: int, rounds: int, schedule: str = "constant") -> float:
    """The prompt step size of round ``rnd`` (1-based) of ``rounds``: constant, or cosine annealing to zero stepped
    once per round (round 1 uses ``lr``)."""
    if schedule == "cosine" and rounds > 0:
        return 0.5 * lr * (1 + math.cos(math.pi * (rnd - 1) / rounds))
    return lr


# ------------------------------------------------------------------------------------------------ loading

def _spec_from_meta(meta: dict, model_config: Optional[str], pretrained: Optional[str]):
    """The ModelSpec that reproduces the cache's model, from its provenance (cache.json ``model``)."""
    from ..cache.config import ModelSpec

    m = meta.get("model") or {}
    name = m.get("name")
    if not name:
        raise ConfigError("the cache records no model (cache.json model.name); it cannot say which text tower "
                          "to learn prompts with")
    if (m.get("weights") or {}).get("arch_config_sha256") and not model_config:
        raise ConfigError(f"the cache's model {name!r} was built from a custom architecture JSON (extract "
                          f"--model-config), which the cache records only by hash; pass it with --text-model-config "
                          f"FILE")
    src = m.get("activation_source", "")
    quick = True if src == "--quick-gelu" else False if src == "--no-quick-gelu" else None
    pre = meta.get("preprocess") or {}
    return ModelSpec(model=name, pretrained=pretrained if pretrained is not None else m.get("pretrained"),
                     model_config=model_config, image_mean=pre.get("mean"), image_std=pre.get("std"),
                     seed=int((m.get("weights") or {}).get("seed", 0) or 0), quick_gelu=quick)


def load_text_model(meta: dict, device: torch.device | str = "cpu", model_config: Optional[str] = None,
                    pretrained: Optional[str] = None):
    """Load the cache's own model (same paths as ``extract``: tag, checkpoint file, ``--model-config``,
    ``local-dir:``) and check that its fingerprint is the one the cache records. ``model_config`` / ``pretrained``
    say where the architecture JSON and weights file are when the cache's recorded paths do not (a custom
    architecture's JSON is not recorded at all). One-line ConfigError when it cannot be loaded or differs."""
    import json

    from ..errors import FedclipCacheError
    from ..cache.models import load_model

    spec = _spec_from_meta(meta, model_config, pretrained)
    try:
        lm = load_model(spec, device)
    except FedclipCacheError as e:
        raise ConfigError(f"cannot load the cache's model for prompt learning: {' '.join(str(e).split())} "
                          f"(point at it with --text-model-config / --text-pretrained)") from None
    except Exception as e:  # noqa: BLE001  (open_clip raises many kinds; the user gets one line)
        raise ConfigError(f"cannot load the cache's model {spec.model!r} (pretrained={spec.pretrained!r}) for "
                          f"prompt learning: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                          f"(point at it with --text-model-config / --text-pretrained)") from None
    # the model's part of the recorded fingerprint (extract adds its own settings: precision, dtype, ...)
    got = json.loads(json.dumps(lm.fingerprint()))
    want = meta.get("fingerprint")
    if want is not None:
        want = {k: want.get(k) for k in got}
    if want is not None and got != want:
        diff = sorted(k for k in got if got[k] != want[k])
        raise ConfigError(f"the model loaded for prompt learning ({spec.model}, pretrained={spec.pretrained}) is "
                          f"not the cache's model: fingerprint differs in {', '.join(diff)}")
    return lm
