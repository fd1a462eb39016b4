"""Adapters on the frozen image feature, written once as *batched* functions over a leading "lane" axis.

Weights are stored in (in, out) layout, i.e. ``x @ w`` (the transpose of torch.nn.Linear.weight).

A lane is one client's copy of the adapter. Parameters are stacked (L, ...) so that every client of a round,
of every held-out split and seed, trains in one batched matmul. The same functions with L = 1 are the
plain single-client model.

Registry (``ADAPTERS``): name -> :class:`AdapterKind` with its parameter shapes, initialiser and forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterKind:
    name: str
    shapes: Callable[[int, int], dict[str, tuple[int, ...]]]  # (D, hidden) -> param shapes
    forward: Callable[[Params, torch.Tensor, dict], torch.Tensor]  # params (L,..), x (L,B,D) -> (L,B,D)
    init: Callable[[int, int, torch.Generator], Params]
    default_hidden: Callable[[int], int]
    description: str


def _linear_init(out_f: int, in_f: int, g: torch.Generator, bias: bool = True) -> list[torch.Tensor]:
    """torch.nn.Linear's default init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), same for the bias),
    returned in (in, out) layout: weights are stored transposed so ``x @ w`` needs no transpose and gradients
    come back contiguous (a strided copy per step otherwise costs a quarter of the training time)."""
    bound = 1.0 / math.sqrt(in_f)
    w = (torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound
    w = w.t().contiguous()
    return [w, (torch.rand(out_f, generator=g) * 2 - 1) * bound] if bias else [w]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # x (L,B,in) @ w (L,in,out) + b (L,out)
    if b is None:
        return torch.bmm(x, w)
    return torch.baddbmm(b.unsqueeze(1), x, w)


# ---- FedCLIP attention adapter (official: Linear(d,d) -> Tanh -> Linear(d,d) -> Softmax(dim=1); f * adapter(f))

def _fedclip_shapes(d: int, h: int):
    return {"w1": (d, h), "b1": (h,), "w2": (h, d), "b2": (d,)}  # (in, out) layout


def _fedclip_init(d: int, h: int, g: torch.Generator) -> Params:
    w1, b1 = _linear_init(h, d, g)
    w2, b2 = _linear_init(d, h, g)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def _fedclip_forward(p: Params, x: torch.Tensor, opts: dict) -> torch.Tensor:
    att = torch.softmax(_linear(torch.tanh(_linear(x, p["w1"], p["b1"])), p["w2"], p["b2"]), dim=-1)
    return att * x


# ---- CLIP-Adapter (Gao et al.): bottleneck D -> D/r -> D with ReLU, mixed alpha * adapted + (1 - alpha) * f

def _residual_shapes(d: int, h: int):
    return {"w1": (d, h), "w2": (h, d)}


def _residual_init(d: int, h: int, g: torch.Generator) -> Params:
    return {"w1": _linear_init(h, d, g, bias=False)[0], "w2": _linear_init(d, h, g, bias=False)[0]}


def _residual_forward(p: Params, x: torch.Tensor, opts: dict) -> torch.Tensor:
    a = torch.relu(_linear(torch.relu(_linear(x, p["w1"], None)), p["w2"], None))
    alpha = opts.get("residual_alpha", 0.2)
    return alpha * a + (1 - alpha) * x


# ---- a linear map, initialised at the identity so that round 0 is zero-shot CLIP

def _linear_shapes(d: int, h: int):
    return {"w": (d, d), "b": (d,)}


def _linear_adapter_init(d: int, h: int, g: torch.Generator) -> Params:
    return {"w": torch.eye(d), "b": torch.zeros(d)}  # (in, out) layout, like the others


def _linear_forward(p: Params, x: torch.Tensor, opts: dict) -> torch.Tensor:
    return _linear(x, p["w"], p["b"])


# ---- no adapter (zero-shot / prototype-only)

def _none_forward(p: Params, x: torch.Tensor, opts: dict) -> torch.Tensor:
    return x


ADAPTERS: dict[str, AdapterKind] = {
    "fedclip": AdapterKind("fedclip", _fedclip_shapes, _fedclip_forward, _fedclip_init, lambda d: d,
                           "FedCLIP attention gate: softmax(W2 tanh(W1 f + b1) + b2) * f (official h = D)"),
    "residual": AdapterKind("residual", _residual_shapes, _residual_forward, _residual_init, lambda d: max(1, d // 4),
                            "CLIP-Adapter: alpha * relu(W2 relu(W1 f)) + (1 - alpha) * f, bottleneck h = D/4"),
    "linear": AdapterKind("linear", _linear_shapes, _linear_forward, _linear_adapter_init, lambda d: d,
                          "W f + b, initialised at the identity"),
    "none": AdapterKind("none", lambda d, h: {}, _none_forward, lambda d, h, g: {}, lambda d: 0,
                        "no adapter: plain CLIP features"),
}


def get_adapter(name: str) -> AdapterKind:
    if name not in ADAPTERS:
        raise ConfigError(f"--adapter {name!r} unknown; choose one of {', '.join(a for a in ADAPTERS if a != 'none')}")
    return ADAPTERS[name]


def list_adapters() -> list[str]:
    """Names of the adapters ``--adapter`` accepts."""
    return [a for a in ADAPTERS if a != "none"]


def num_params(kind: str, d: int, h: int) -> int:
    return sum(math.prod(s) for s in ADAPTERS[kind].shapes(d, h).values())


def init_params(kind: str, d: int, h: int, seed: int) -> Params:
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
    return torch.bmm(a, targets.transpose(1, 2)) * inv
