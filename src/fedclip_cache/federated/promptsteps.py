"""Prompt learning's steps, shared by ``federate``'s loop (``loop.py``) and a Flower site
(``flower/client_app.py``): one rule per fact, so a deployment's prompt rounds are the in-process rounds.

* :func:`text_model`: the frozen model rebuilt from a cache's own provenance (``prompts.load_text_model``: the same
  paths, fingerprint check and one-line errors everywhere); :func:`prompt_learner`: its text tower with the run's
  class prompts;
* :func:`prompt_round`: the local update of round ``rnd`` (the round's step size, ``--prompt-schedule``, then
  ``PromptLearner.train`` with the prompt optimiser's settings);
* :func:`prompt_finetune`: ``--finetune-steps`` of a context (the prompt optimiser at ``--prompt-lr``).

* :func:`prompt_init`, :func:`prompt_heads`, :func:`prompt_sizes`: a lane's seeded start, the class embeddings
  of parameters, and the sizes a site reports (the site reaches the prompt learner only through this module).

Parameters are dicts of tensors, ``{"ctx": (L, *ctx_shape)}`` (L lanes side by side). Imports torch (through
``prompts``): imported lazily by the loop and the site, never by the algorithm registry.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .config import FederateConfig
from .prompts import PromptLearner, load_text_model, round_lr

CTX = "ctx"  # the one parameter of CoOp / PromptFL: the context vectors (what a deployment's messages carry)


def text_model(meta: dict, cfg: FederateConfig, device: torch.device | str = "cpu"):
    """The model of the cache whose ``cache.json`` is ``meta`` (checked against its recorded fingerprint;
    ``--text-model-config`` / ``--text-pretrained`` say where its files are when the recorded ones do not)."""
    return load_text_model(meta, device, cfg.text_model_config, cfg.text_pretrained)


def prompt_learner(lm, classes, cfg: FederateConfig, device: torch.device | str = "cpu"):
    """The algorithm's prompt parameters (``algo.learner``: ``prompts.ContextParams``, ``pgp.PGPLearner``) over the
    frozen text tower of ``lm`` (:func:`text_model`) with the class prompts of ``classes``: ``--n-ctx`` /
    ``--ctx-init`` / ``--prompt-csc`` / ``--prompt-full-context``."""
    from .algorithms import make_algorithm

    return make_algorithm(cfg).learner(PromptLearner(lm.model, lm.tokenizer, classes, cfg.n_ctx, cfg.ctx_init,
                                                     truncate=not cfg.prompt_full_context, device=device,
                                                     csc=cfg.prompt_csc, precision=cfg.precision))


def prompt_round(learner: PromptLearner, cfg: FederateConfig, start: dict, schedules: list[list[np.ndarray]], X,
                 Y: torch.Tensor, rnd: int, logit_scale: float) -> dict:
    """Round ``rnd``'s local update of the lanes ``start`` (``{"ctx": (L, ...)}``), lane k on ``schedules[k]``."""
    lr = round_lr(cfg.prompt_lr, rnd, cfg.rounds, cfg.prompt_schedule)
    return learner.train(start, schedules, X, Y, lr, logit_scale, cfg.prompt_momentum, cfg.prompt_weight_decay)


def prompt_finetune(learner: PromptLearner, cfg: FederateConfig, start: dict, schedules: list[list[np.ndarray]],
                    X, Y: torch.Tensor, logit_scale: float) -> dict:
    """``--finetune-steps``: the lanes' contexts ``start`` trained on ``schedules`` with the prompt optimiser at
    ``--prompt-lr`` (a fresh momentum buffer, as a round)."""
    return learner.train(start, schedules, X, Y, cfg.prompt_lr, logit_scale, cfg.prompt_momentum,
                         cfg.prompt_weight_decay)


def prompt_init(learner: PromptLearner, seed: int) -> dict:
    """A lane's starting parameters (unstacked), as ``federate`` seeds them: the seeded context, or ``--ctx-init``'s
    token embeddings."""
    return learner.init_params(seed)


def prompt_heads(learner: PromptLearner, params: dict) -> torch.Tensor:
    """Class embeddings (G, C, D) of stacked parameters (G, ...): what each group is scored against."""
    return learner.heads(params)


class PromptSizes(NamedTuple):
    """What a site reports of its prompt parameters: how many it trains, and the context's shape."""

    trainable: int
    ctx_shape: tuple


def prompt_sizes(learner: PromptLearner) -> PromptSizes:
    return PromptSizes(learner.num_params, tuple(learner.base.ctx_shape))
