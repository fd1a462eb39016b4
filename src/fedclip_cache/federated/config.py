"""The resolved configuration of a federated run; defaults are the official FedCLIP settings.

Official code: microsoft/PersonalizedFL, ``fedclip/`` (Adam lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight decay 0.2
re-created every round, batch 32, 1 local epoch, 200 rounds as in its README, uniform averaging, 60/20/20 splits,
leave-one-domain-out, selection by best mean validation accuracy).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Mapping, Optional
from ..errors import FedclipCacheError


class ConfigError(FedclipCacheError, ValueError):
    """A bad option or an incompatible cache; the message names the option and the fix."""


ALGOS = ("fedclip", "fedprox", "local", "central", "zeroshot")
LOSSES = ("contrastive", "ce")
HEADS = ("text", "prototype")
PROTOCOLS = ("lodo", "personal")
PARTITIONS = ("none", "iid", "dirichlet", "pathological")
WEIGHTINGS = ("uniform", "samples")
DEVICES = ("cpu", "cuda", "auto")  # and cuda:N

# Field kinds for validation: the type every source (CLI, TOML, --set, --grid, a library caller) must give.
_INTS = {"hidden", "batch_size", "local_epochs", "rounds", "num_clients", "classes_per_client", "seed", "eval_every"}
_FLOATS = {"residual_alpha", "logit_scale", "lr", "beta1", "beta2", "eps", "weight_decay", "mu", "alpha"}
_STRS = {"algo", "adapter", "head", "template", "loss", "weighting", "protocol", "partition", "partition_scope",
         "split_source", "client_key", "device"}
_OPTIONAL = {"hidden", "logit_scale"}  # None = the default (adapter width D; the cache's logit scale)


def _said(flag: str, value: Any) -> str:
    """How the user wrote an option and its value: ``--lr nan``, ``--grid hidden=0``,
    ``p.toml: federate.rounds = 'two'`` (a label ending in ``=`` or a space takes the value directly)."""
    return f"{flag}{'' if flag.endswith(('=', ' ')) else ' '}{_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, list):
        return ",".join(map(str, value)) if all(isinstance(v, str) for v in value) else repr(value)
    return repr(value) if isinstance(value, str) else str(value)


def _check_field(cfg: "FederateConfig", name: str, flag: str) -> None:
    """Type check (and light normalisation) of one field; ranges are checked by ``validate``."""
    v = getattr(cfg, name)
    if name in _OPTIONAL and v is None:
        return
    if name in _INTS:
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ConfigError(f"{_said(flag, v)}: expected a whole number")
        setattr(cfg, name, int(v))
    elif name in _FLOATS:
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ConfigError(f"{_said(flag, v)}: expected a number")
        if not math.isfinite(v):
            raise ConfigError(f"{_said(flag, v)}: must be a finite number (nan and inf would train a NaN adapter)")
        setattr(cfg, name, float(v))
    elif name == "split":
        if (not isinstance(v, (tuple, list)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, Real) for x in v)):
            raise ConfigError(f"{_said(flag, v)}: expected three fractions, e.g. 0.6,0.2,0.2")
        if not all(math.isfinite(x) for x in v):
            raise ConfigError(f"{_said(flag, v)}: fractions must be finite numbers")
        setattr(cfg, name, tuple(float(x) for x in v))
    elif name == "heldout":
        if not isinstance(v, (list, tuple)) or not all(isinstance(h, str) and h for h in v):
            raise ConfigError(f"{_said(flag, v)}: expected domain names, e.g. [\"photo\", \"sketch\"] or "
                              f"\"photo,sketch\"")
        setattr(cfg, name, list(v))
    elif name == "template" and isinstance(v, Integral) and not isinstance(v, bool):
        setattr(cfg, name, str(v))  # TOML `template = 1`
    elif name in _STRS and not isinstance(v, str):
        raise ConfigError(f"{_said(flag, v)}: expected a string")


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

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "FederateConfig":
        """Check every field's type and range; raise :class:`ConfigError` naming the option as the user wrote it.

        ``names`` maps a field to that spelling (a CLI flag such as ``--clients``, a TOML key such as
        ``federate.rounds``, a grid key); fields it does not name read as ``--field-name``. Non-finite numbers
        (nan, inf) are always rejected: they would train an all-NaN adapter.
        """
        names = dict(names or {})

        def flag(name: str) -> str:
            return names.get(name) or "--" + name.replace("_", "-")

        for f in dataclasses.fields(self):
            _check_field(self, f.name, flag(f.name))

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{_said(flag(name), getattr(self, name))}: {why}")

        def one_of(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"{_said(flag(name), getattr(self, name))} unknown; "
                                  f"choose one of {', '.join(options)}")

        one_of("algo", ALGOS)
        one_of("loss", LOSSES)
        one_of("head", HEADS)
        one_of("protocol", PROTOCOLS)
        one_of("partition", PARTITIONS)
        one_of("weighting", WEIGHTINGS)
        one_of("partition_scope", ("domain", "pooled"))
        one_of("split_source", ("random", "cache"))
        one_of("split_tail", ("drop", "test"))
        one_of("client_key", ("domain", "client"))
        from .adapters import ADAPTERS

        one_of("adapter", tuple(a for a in ADAPTERS if a != "none"))
        if not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", self.device)):
            raise bad("device", f"unknown device; choose one of {'|'.join(DEVICES)}")
        if self.template != "mean" and not re.fullmatch(r"\d+", self.template):
            raise bad("template", "give a template index (0, 1, ...) or 'mean'")

        def at_least(name, low):
            if getattr(self, name) < low:
                raise bad(name, f"must be at least {low}")

        for name in ("batch_size", "local_epochs", "eval_every", "num_clients", "classes_per_client"):
            at_least(name, 1)
        at_least("seed", 0)
        if self.seed >= 2**63:
            raise bad("seed", "must be below 2**63")
        if self.hidden is not None:
            at_least("hidden", 1)
        at_least("rounds", 0)  # 0: nothing is trained, the starting adapter is scored once (round 0)
        if self.algo != "zeroshot" and self.rounds > 0:  # zeroshot trains nothing: rounds are not used
            if self.eval_every > self.rounds:
                raise bad("eval_every", f"must not exceed {_said(flag('rounds'), self.rounds)} (only the last round "
                                        f"would be evaluated)")
        for name in ("lr", "eps", "alpha"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise bad("logit_scale", "must be > 0")
        for name in ("weight_decay", "mu"):
            at_least(name, 0)
        if not 0 <= self.residual_alpha <= 1:
            raise bad("residual_alpha", "must be between 0 and 1")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1)")
        if min(self.split) < 0 or max(self.split) > 1 or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"{flag('split').rstrip('= ')} must be three fractions in [0, 1] summing to 1, "
                              f"e.g. 0.6,0.2,0.2 (got {_show(self.split)})")
        if self.split[0] == 0 and self.split_source == "random":
            raise bad("split", "the train fraction must be > 0")
        if self.batch_size < 2 and self.loss == "contrastive":
            raise bad("batch_size", "must be >= 2 for the contrastive loss (batches of one are skipped)")
        if self.heldout:
            if self.protocol != "lodo":
                raise bad("heldout", f"only the lodo protocol holds domains out "
                                     f"({_said(flag('protocol'), self.protocol)} does not)")
            if len(set(self.heldout)) != len(self.heldout):
                dup = next(h for h in self.heldout if self.heldout.count(h) > 1)
                raise bad("heldout", f"domain {dup!r} is given twice")
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
        if isinstance(d.get("split"), list):
            d["split"] = tuple(d["split"])
        if isinstance(d.get("heldout"), str):
            d["heldout"] = [h for h in d["heldout"].split(",") if h]
        return cls(**d)
