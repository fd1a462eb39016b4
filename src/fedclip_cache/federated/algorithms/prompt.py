"""Federated prompt learning on the cache: PromptFL (FedAvg of CoOp context vectors) and its local-only baseline.

PromptFL (Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn Prompts Instead of Models", IEEE
TMC 2023): every client trains CoOp's context vectors (Zhou et al., IJCV 2022) with the CLIP model frozen, and the
server averages them (FedAvg); a round moves n_ctx x width parameters (C x n_ctx x width with CSC) each way
(8,192 for 16 x 512). No adapter: image features go straight to L2-normalisation and the cosine logits against
the prompted class embeddings.

The loop (``loop.py``) builds the frozen text tower from the cache's provenance (``prompts.load_text_model``) when
an algorithm sets ``prompts = True``: local training (``ctx.train``) is then prompt training (SGD with
``--prompt-lr``, ``--prompt-momentum``, ``--prompt-weight-decay``, batches of ``--batch-size``, ``--local-epochs``,
cross-entropy with the model's logit scale) and evaluation scores each group against the class embeddings of its
own context. With ``--prompt-csc`` each class has its own context (C x n_ctx x width parameters).
"""
from __future__ import annotations

from .base import Algorithm, register_algorithm

# Registry rule: no ``import torch`` here (the CLI imports algorithms for --help).

PROMPT_OPTIONS = ("n_ctx", "ctx_init", "prompt_lr", "prompt_momentum", "prompt_weight_decay", "prompt_csc",
                  "prompt_schedule", "text_model_config", "text_pretrained", "prompt_full_context")


def context_learner(base):
    """CoOp's parameter set ``{"ctx"}`` over the frozen text tower ``base`` (``prompts.ContextParams``)."""
    from ..prompts import ContextParams

    return ContextParams(base)


@register_algorithm
class PromptFL(Algorithm):
    name = "promptfl"
    summary = "FedAvg of CoOp context vectors (--n-ctx x width), text tower frozen, no adapter"
    reference = ("Guo et al., PromptFL: Let Federated Participants Cooperatively Learn Prompts Instead of Models, "
                 "IEEE TMC 2023; Zhou et al., CoOp, IJCV 2022")
    prompts = True
    uses = PROMPT_OPTIONS

    def learner(self, base):
        """The prompt parameters this method trains over the frozen text tower ``base`` (prompts.PromptLearner)."""
        return context_learner(base)


@register_algorithm
class PromptLocal(Algorithm):
    name = "promptlocal"
    summary = "each client learns its own CoOp context vectors, nothing is shared"
    reference = "Zhou et al., Learning to Prompt for Vision-Language Models (CoOp), IJCV 2022"
    prompts = True
    personal = True
    communicates = False
    uses = PROMPT_OPTIONS

    def learner(self, base):
        return context_learner(base)
