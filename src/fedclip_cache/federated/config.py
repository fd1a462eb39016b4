"""The resolved configuration of a federated run; defaults are the official FedCLIP settings.

Official code: microsoft/PersonalizedFL, ``fedclip/`` (Adam lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight decay 0.2
re-created every round, batch 32, 1 local epoch, 200 rounds as in its README, uniform averaging, 60/20/20 splits,
leave-one-domain-out, selection by best mean validation accuracy).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A bad option or an incompatible cache; the message names the option and the fix."""


ALGOS = ("fedclip", "fedprox", "local", "central", "zeroshot")
LOSSES = ("contrastive", "ce")
HEADS = ("text", "prototype")
PROTOCOLS = ("lodo", "personal")
PARTITIONS = ("none", "iid", "dirichlet", "pathological")
WEIGHTINGS = ("uniform", "samples")


@dataclass
class FederateConfig:
    algo: str = "fedclip"
    adapter: str = "fedclip"
    hidden: Optional[int] = None  # adapter width; None = the adapter's default (D for fedclip, the official value)
    residual_alpha: float = 0.2
    head: str = "text"
    template: str = "0"  # index into the cache's templates, or "mean" (prompt ensemble)
    loss: str = "contrastive"
    # Temperature of the cosine logits. None = the model's own logit_scale.exp() recorded in the cache (100 for
    # OpenAI's CLIP, the constant of the official code); 100 with a recorded note when the cache has none.
    logit_scale: Optional[float] = None
    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    batch_size: int = 32
    local_epochs: int = 1
    rounds: int = 200
    mu: float = 0.0
    weighting: str = "uniform"
    protocol: str = "lodo"
    heldout: list[str] = field(default_factory=list)  # empty = every domain in turn
    partition: str = "none"
    alpha: float = 0.5
    num_clients: int = 4
    classes_per_client: int = 2
    partition_scope: str = "domain"  # split each domain into clients, or the pooled training domains
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_source: str = "random"  # or "cache": use the manifest's split column
    # Official boundaries: train = first int(.6n) of the shuffle, val = next int(.2n), test = next int(.2n); the 0-2
    # samples left over are dropped ("drop", counted in the summary) or given to test ("test": covers every sample).
    split_tail: str = "drop"
    client_key: str = "domain"  # or "client": the cache's client column defines the clients
    seed: int = 0
    eval_every: int = 1
    device: str = "cpu"
    # Denormal floats are flushed to zero on every computing thread while training (see federated/fpenv.py):
    # saturating softmaxes otherwise make the step cost grow ~7x within a long round. True opts out.
    keep_denormals: bool = False

    def validate(self) -> "FederateConfig":
        def one_of(name, value, options):
            if value not in options:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} unknown; choose one of {', '.join(options)}")

        one_of("algo", self.algo, ALGOS)
        one_of("loss", self.loss, LOSSES)
        one_of("head", self.head, HEADS)
        one_of("protocol", self.protocol, PROTOCOLS)
        one_of("partition", self.partition, PARTITIONS)
        one_of("weighting", self.weighting, WEIGHTINGS)
        one_of("partition_scope", self.partition_scope, ("domain", "pooled"))
        one_of("split_source", self.split_source, ("random", "cache"))
        one_of("split_tail", self.split_tail, ("drop", "test"))
        one_of("client_key", self.client_key, ("domain", "client"))
        from .adapters import get_adapter

        get_adapter(self.adapter)
        for name in ("lr", "batch_size", "local_epochs", "eval_every", "num_clients", "classes_per_client"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ConfigError(f"--logit-scale must be a finite number > 0 (got {self.logit_scale})")
        if self.rounds < 0 or self.mu < 0 or self.weight_decay < 0:
            raise ConfigError("--rounds, --mu and --weight-decay must not be negative")
        if self.hidden is not None and self.hidden <= 0:
            raise ConfigError(f"--hidden must be a positive width (got {self.hidden})")
        if self.alpha <= 0:
            raise ConfigError(f"--alpha must be > 0 (got {self.alpha})")
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6 or min(self.split) < 0:
            raise ConfigError(f"--split must be three fractions summing to 1, e.g. 0.6,0.2,0.2 (got {self.split})")
        if self.batch_size < 2 and self.loss == "contrastive":
            raise ConfigError("--batch-size must be >= 2 for the contrastive loss (batches of one are skipped)")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FederateConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown federate option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if "split" in d:
            d["split"] = tuple(d["split"])
        if isinstance(d.get("heldout"), str):
            d["heldout"] = [h for h in d["heldout"].split(",") if h]
        return cls(**d)
