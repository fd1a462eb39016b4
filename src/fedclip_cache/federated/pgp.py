"""FedPGP's local learner on cached image features (Cui et al., "Harmonizing Generalization and Personalization in
Federated Prompt Learning", ICML 2024; official code: github.com/TianyuCuiOvO/FedPGP, ``trainers/fedpgp.py``).

Each client's context is ``sigma + U @ V``: ``sigma`` (n_ctx x width) is the global prompt, averaged by the server;
``U`` (n_ctx x rank) and ``V`` (rank x width) are the client's personal low-rank part, never sent. The local loss is
CoOp's cross-entropy with the full context plus ``mu`` times a CLIP-guided contrastive term over the classes: for
class c, with the L2-normalised class embeddings ``t0`` (the frozen prompt: the placeholder words' own token
embeddings, or the --ctx-init phrase's), ``ts`` (context sigma alone) and ``tf`` (sigma + U V),

    -log( exp(<t0, ts> / temp) / (exp(<t0, ts> / temp) + exp(<ts, tf> / temp)) ),

averaged over the classes: the global prompt is pulled towards CLIP's own prompt (generalisation) and pushed away
from the personalised one (official ``forward_backward``: positive ``cos(text_features_0, text_features_sigma)``,
negative ``cos(text_features_sigma, text_features)``, target 0).

The text tower is the one of :class:`prompts.PromptLearner` (same prompts, truncation and frozen weights); training
runs clients side by side (one text-tower pass per step over every active client's two contexts) with
torch.optim.SGD's semantics over sigma, U and V together, as the official trainer's one optimiser over the prompt
learner.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .algorithms.fedpgp import GLOBAL_PARAMS
from .prompts import CTX_INIT_STD, PromptLearner
from .sidebyside import StackedBatch, sgd_side_by_side


def pgp_contrastive(t0: torch.Tensor, ts: torch.Tensor, tf: torch.Tensor, temp: float) -> torch.Tensor:
    """FedPGP's CLIP-guided contrastive loss of each client (A,): class embeddings (A, C, D) of the global context
    ``ts`` and of the personalised one ``tf``, against CLIP's own prompts ``t0`` (C, D); all L2-normalised."""
    pos = (t0.unsqueeze(0) * ts).sum(-1)  # (A, C) cosine of normalised vectors
    neg = (ts * tf).sum(-1)
    logits = torch.stack([pos, neg], dim=-1) / temp  # (A, C, 2); the positive is class 0
    return -F.log_softmax(logits, dim=-1)[..., 0].mean(-1)


class PGPLearner:
    """FedPGP's prompts over a :class:`PromptLearner`'s frozen text tower: parameters ``sigma`` (n_ctx, width), ``U``
    (n_ctx, rank), ``V`` (rank, width); the context a client is scored with is ``sigma + U @ V``."""

    def __init__(self, base: PromptLearner, rank: int, mu: float, temp: float):
        self.base, self.rank, self.mu, self.temp = base, int(rank), float(mu), float(temp)
        with torch.no_grad():  # CLIP's own prompts: the context words' frozen token embeddings
            words = base.tower.token_embedding(base.tokens[0, 1:1 + base.n_ctx]).float()
            self.anchor = base.class_embeddings(words)  # (C, D)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        n, w, r = self.base.n_ctx, self.base.width, self.rank
        return {"sigma": (n, w), "U": (n, r), "V": (r, w)}

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self.param_shapes.values()))

    @property
    def communicated_params(self) -> int:
        return int(sum(np.prod(self.param_shapes[n]) for n in GLOBAL_PARAMS))

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        """U, V, sigma ~ N(0, 0.02^2), drawn in that order from one generator seeded with ``seed`` (official:
        ``nn.init.normal_(., std=0.02)`` on each); sigma is the --ctx-init phrase's embeddings when one is given."""
        g = torch.Generator().manual_seed(int(seed))
        shapes = self.param_shapes
        out = {n: torch.randn(*shapes[n], generator=g) * CTX_INIT_STD for n in ("U", "V", "sigma")}
        if self.base.ctx_init_vectors is not None:
            out["sigma"] = self.base.ctx_init_vectors.clone().cpu()
        return out

    @staticmethod
    def context(params: dict) -> torch.Tensor:
        """The personalised context sigma + U V of stacked parameters (A, n_ctx, width)."""
        return params["sigma"] + params["U"] @ params["V"]

    def losses(self, params: dict, batch: StackedBatch, scale: float) -> torch.Tensor:
        """Each client's local loss (A,): mean cross-entropy of its batch with the personalised context, plus mu
        times the contrastive term. One text-tower pass over both contexts of every client."""
        a = params["sigma"].shape[0]
        T = self.base.class_embeddings_many(torch.cat([self.context(params), params["sigma"]]),
                                            precision=self.base.precision)  # --precision: the training pass
        tf, ts = T[:a], T[a:]
        logits = scale * torch.bmm(F.normalize(batch.xs, dim=-1), tf.transpose(1, 2))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.ys.reshape(-1), reduction="none")
        ce = (ce.reshape(batch.valid.shape) * batch.valid).sum(1) / batch.sizes
        return ce + self.mu * pgp_contrastive(self.anchor, ts, tf, self.temp)

    def train(self, start: dict, schedules: list[list[np.ndarray]], X, Y: torch.Tensor, lr: float, scale: float,
              momentum: float = 0.0, weight_decay: float = 0.0, max_prompts: int = 4096) -> dict:
        """Local training of several clients from ``start`` (sigma, U, V stacked per client): one SGD step per batch
        of ``schedules[s]``, over at most ``max_prompts`` prompts per text-tower pass."""
        out = {n: v.detach().clone() for n, v in start.items()}
        per = max(1, max_prompts // max(2 * self.base.n_cls, 1))

        def loss_fn(leaves: dict, batch: StackedBatch) -> torch.Tensor:
            return self.losses(leaves, batch, scale).sum()

        for lo in range(0, len(schedules), per):
            hi = min(len(schedules), lo + per)
            part = sgd_side_by_side({n: v[lo:hi] for n, v in out.items()}, schedules[lo:hi], X, Y, loss_fn, lr,
                                    momentum, weight_decay)
            for n, v in part.items():
                out[n][lo:hi] = v
        return out

    @torch.no_grad()
    def heads(self, params: dict) -> torch.Tensor:
        """Class embeddings (G, C, D) of the personalised contexts of stacked parameters (G, ...)."""
        return self.base.heads(self.context(params))
