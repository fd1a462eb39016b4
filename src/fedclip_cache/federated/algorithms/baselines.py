"""Non-federated reference points: each client alone, all data pooled, and no training at all."""
from __future__ import annotations

from .base import Algorithm, register_algorithm


@register_algorithm
class Local(Algorithm):
    name = "local"
    summary = "each client trains its own adapter, nothing is shared"
    personal = True
    communicates = False


@register_algorithm
class Central(Algorithm):
    """One pooled lane per experiment: its 'average' is itself, so the global model is the pooled model."""

    name = "central"
    summary = "one adapter trained on the union of the training clients' data (upper reference)"
    pooled = True
    communicates = False


@register_algorithm
class ZeroShot(Algorithm):
    name = "zeroshot"
    summary = "no training: frozen CLIP features against the head"
    trains = False
    communicates = False
