"""Adapters on the frozen image feature, written once as *batched* functions over a leading "lane" axis.

Weights are stored in (in, out) layout, i.e. ``x @ w`` (the transpose of torch.nn.Linear.weight).

A lane is one client's copy of the adapter. Parameters are stacked (L, ...) so that every client of a round,
of every held-out split and seed, trains in one batched matmul. The same functions with L = 1 are the
plain single-client model.

An adapter is a small class registered by name (``@register_adapter``, as algorithms are with
``@register_algorithm``): its parameter shapes, initialiser and forward, a one-line summary (``--adapter``'s help
lists the registry) and the FederateConfig fields its forward reads (``options``; :func:`adapter_options` builds
them from a configuration, for the in-process loop and a Flower site alike). Adding one is one class here (or in
the user's code, registered before ``federate`` runs) plus its tests.

The registry is imported by FederateConfig and the CLI (``--adapter``'s help and check), which must not import
torch (``info`` and ``--help`` stay fast): this module imports torch only inside the initialisers, and forwards
use methods of the tensors they are given.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

Params = dict[str, "torch.Tensor"]


class AdapterKind:
    """Base class of an adapter: what ``--adapter NAME`` trains, as pure functions of stacked parameters."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # a few words, shown by --adapter's help beside the name
    description: ClassVar[str] = ""  # the formula, one line
    options: ClassVar[tuple[str, ...]] = ()  # FederateConfig fields the forward reads from ``opts``
    listed: ClassVar[bool] = True  # offered by --adapter (False: the internal "none" of zeroshot and prompts)

    def shapes(self, d: int, h: int) -> dict[str, tuple[int, ...]]:
        """The parameter shapes of one lane for feature width ``d`` and hidden width ``h``."""
        raise NotImplementedError

    def init(self, d: int, h: int, g: torch.Generator) -> Params:
        """One lane's starting parameters, drawn from ``g`` (seeded by the run's seed)."""
        raise NotImplementedError

    def forward(self, p: Params, x: torch.Tensor, opts: dict) -> torch.Tensor:
        """The adapted features: params stacked (L, ...), x (L, B, D) -> (L, B, D)."""
        raise NotImplementedError

    def default_hidden(self, d: int) -> int:
        """The hidden width used when ``--hidden`` is not given."""
        return d


ADAPTERS: dict[str, AdapterKind] = {}


def register_adapter(cls: type[AdapterKind]) -> type[AdapterKind]:
    """Class decorator: make ``cls`` available as ``--adapter cls.name`` (the registry holds one instance)."""
    if not cls.name or cls.name in ADAPTERS:
        raise ValueError(f"adapter name {cls.name!r} missing or registered twice")
    ADAPTERS[cls.name] = cls()
    return cls


def _linear_init(out_f: int, in_f: int, g: torch.Generator, bias: bool = True) -> list[torch.Tensor]:
    """torch.nn.Linear's default init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), same for the bias),
    returned in (in, out) layout: weights are stored transposed so ``x @ w`` needs no transpose and gradients
    come back contiguous (a strided copy per step otherwise costs a quarter of the training time)."""
    import torch

    bound = 1.0 / math.sqrt(in_f)
    w = (torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound
    w = w.t().contiguous()
    return [w, (torch.rand(out_f, generator=g) * 2 - 1) * bound] if bias else [w]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # x (L,B,in) @ w (L,in,out) + b (L,out)
    if b is None:
        return x.bmm(w)
    return b.unsqueeze(1).baddbmm(x, w)


@register_adapter
class FedCLIPAdapter(AdapterKind):
    """The official attention adapter: Linear(d,d) -> Tanh -> Linear(d,d) -> Softmax(dim=1); f * adapter(f)."""

    name = "fedclip"
    summary = "official gate"
    description = "FedCLIP attention gate: softmax(W2 tanh(W1 f + b1) + b2) * f (official h = D)"

    def shapes(self, d, h):
        return {"w1": (d, h), "b1": (h,), "w2": (h, d), "b2": (d,)}  # (in, out) layout

    def init(self, d, h, g):
        w1, b1 = _linear_init(h, d, g)
        w2, b2 = _linear_init(d, h, g)
        return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}

    def forward(self, p, x, opts):
        att = _linear(_linear(x, p["w1"], p["b1"]).tanh(), p["w2"], p["b2"]).softmax(dim=-1)
        return att * x


@register_adapter
class ResidualAdapter(AdapterKind):
    """CLIP-Adapter (Gao et al.): bottleneck D -> D/r -> D with ReLU, mixed alpha * adapted + (1 - alpha) * f."""

    name = "residual"
    summary = "CLIP-Adapter"
    description = "CLIP-Adapter: alpha * relu(W2 relu(W1 f)) + (1 - alpha) * f, bottleneck h = D/4"
    options = ("residual_alpha",)

    def shapes(self, d, h):
        return {"w1": (d, h), "w2": (h, d)}

    def init(self, d, h, g):
        return {"w1": _linear_init(h, d, g, bias=False)[0], "w2": _linear_init(d, h, g, bias=False)[0]}

    def forward(self, p, x, opts):
        a = _linear(_linear(x, p["w1"], None).relu(), p["w2"], None).relu()
        alpha = opts.get("residual_alpha", 0.2)  # FederateConfig's default, for callers that pass no options
        return alpha * a + (1 - alpha) * x

    def default_hidden(self, d):
        return max(1, d // 4)


@register_adapter
class LinearAdapter(AdapterKind):
    """A linear map, initialised at the identity so that round 0 is zero-shot CLIP."""

    name = "linear"
    description = "W f + b, initialised at the identity"

    def shapes(self, d, h):
        return {"w": (d, d), "b": (d,)}

    def init(self, d, h, g):
        import torch

        return {"w": torch.eye(d), "b": torch.zeros(d)}  # (in, out) layout, like the others

    def forward(self, p, x, opts):
        return _linear(x, p["w"], p["b"])


@register_adapter
class NoAdapter(AdapterKind):
    """No adapter (zero-shot, prompt learning): the plain CLIP features."""

    name = "none"
    description = "no adapter: plain CLIP features"
    listed = False

    def shapes(self, d, h):
        return {}

    def init(self, d, h, g):
        return {}

    def forward(self, p, x, opts):
        return x

    def default_hidden(self, d):
        return 0


def adapter_width(kind: AdapterKind, hidden, d: int) -> int:
    """The hidden width a run trains with: ``--hidden`` when given, else the adapter's default for ``d``-dim
    features. The one rule the loop, a Flower site and the Flower server use."""
    return hidden or kind.default_hidden(d)


def get_adapter(name: str) -> AdapterKind:
    if name not in ADAPTERS:
        raise ConfigError(f"--adapter {name!r} unknown; choose one of {', '.join(list_adapters())}")
    return ADAPTERS[name]


def list_adapters() -> list[str]:
    """Names of the adapters ``--adapter`` accepts, in registration order."""
    return [n for n, a in ADAPTERS.items() if a.listed]


def adapters_help() -> str:
    """``--adapter``'s help: every registered adapter with its summary, in registration order."""
    return " | ".join(f"{n} ({ADAPTERS[n].summary})" if ADAPTERS[n].summary else n for n in list_adapters()) + "."


def adapter_options(cfg: Any) -> dict:
    """The options ``cfg.adapter``'s forward reads (its declared ``options``, by FederateConfig field name): the one
    place they are built, by the in-process loop and by a Flower site, so both run the same adapter."""
    kind = get_adapter(cfg.adapter)
    missing = [n for n in kind.options if not hasattr(cfg, n)]
    if missing:
        raise ValueError(f"adapter {kind.name!r} declares option(s) {', '.join(missing)} that FederateConfig lacks")
    return {n: getattr(cfg, n) for n in kind.options}


def num_params(kind: str, d: int, h: int) -> int:
    return sum(math.prod(s) for s in ADAPTERS[kind].shapes(d, h).values())


def init_params(kind: str, d: int, h: int, seed: int) -> Params:
    import torch

    g = torch.Generator().manual_seed(seed)
    return ADAPTERS[kind].init(d, h, g)


def cosine_logits(kind: AdapterKind, p: Params, x: torch.Tensor, targets: torch.Tensor, scale: float,
                  opts: dict) -> torch.Tensor:
    """The FedCLIP image path (adapter on the *raw* feature, then L2-normalise) scored against class or prompt
    embeddings: ``scale * normalise(adapter(x)) @ targets^T`` with targets already L2-normalised, (L,B,D) x (L,T,D) -> (L,B,T).

    The 1/norm is applied to the (B, T) logits rather than to the (B, D) features: the same value with one
    elementwise pass over D fewer (T is the number of classes or the batch size, D = 512)."""
    a = kind.forward(p, x, opts)
    inv = a.norm(dim=-1, keepdim=True).reciprocal() * scale
    return a.bmm(targets.transpose(1, 2)) * inv
