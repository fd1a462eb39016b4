"""The algorithm interface: what a federated method declares, and the one hook each round calls.

An algorithm is a small class registered by name (``@register_algorithm``, in the spirit of timm's
``@register_model`` and Flower's ``Strategy``). It declares

* what it trains and who keeps what: ``trains`` (zeroshot: nothing), ``pooled`` (one lane per experiment over the
  union of the clients' data: centralised training), ``personal`` (every client keeps and is scored with its own
  model; nothing is averaged);
* its local objective terms (``proximal_mu``: FedProx) and, through :meth:`Algorithm.run_round`, anything else the
  clients do (SCAFFOLD's control variates);
* its server update (:meth:`Algorithm.server_update`: how the average of the clients' models becomes the new
  global model, with any server state such as momentum), a pure function so that the in-process loop and the
  Flower ServerApp share it;
* what it communicates (``communicates``, ``upload_factor``: adapters' worth of parameters each sampled client
  sends per round) and which options it reads (``uses``; other algorithms' options are reported as ignored).

The in-process loop (``federated/loop.py``) stacks every client of every experiment on a leading "lane" axis; an
algorithm sees that world only through a :class:`RoundContext`, so it never deals with lanes, devices or batching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Optional, Protocol

from ...errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

# The registry is imported by FederateConfig and the CLI (option help), which must not import torch (``info`` and
# ``--help`` stay fast): algorithm modules do their arithmetic with tensor methods (``x.sqrt()``, ``x.new_zeros``)
# on the tensors they are given, never ``import torch`` at module level.
Params = "dict[str, torch.Tensor]"


@dataclass
class TrainState:
    """Everything that persists between rounds. ``server``: the global model of each experiment, stacked (E, ...);
    ``clients``: models the clients keep between rounds, stacked over lanes (L, ...) (personal algorithms);
    ``extra``: the algorithm's own state (server momentum, control variates, ...), tensors stacked the same way."""

    server: dict
    clients: dict
    extra: dict = field(default_factory=dict)


class ServerUpdate(NamedTuple):
    """What :meth:`Algorithm.server_update` returns."""

    params: Params  # the new global model of each experiment, stacked (E, ...)
    extra: dict  # the algorithm's state after the update (see TrainState.extra)


class RoundContext(Protocol):
    """What the loop offers an algorithm in one round (see ``loop.LaneRound``)."""

    rnd: int  # 1-based round number
    lanes: np.ndarray  # the lanes (clients) that train this round, in lane order
    lane_exp: torch.Tensor  # experiment index of every lane (all lanes, not only this round's)

    def broadcast(self, server: Params) -> Params:
        """The global model of each sampled lane's experiment, stacked over the sampled lanes."""

    def select(self, per_lane: Params) -> Params:
        """Rows of an (L, ...) stack for the sampled lanes."""

    def scatter(self, per_lane: Params, rows: Params) -> Params:
        """``per_lane`` with the sampled lanes' rows replaced by ``rows`` (in place: not a copy of every lane)."""

    def train(self, start: Params, correction: Optional[Params] = None) -> tuple[Params, np.ndarray]:
        """Local training of the sampled lanes from ``start``; ``correction`` (stacked like ``start``) is added to
        every local gradient. Returns the trained parameters and the number of local steps of each lane."""

    def average(self, per_lane: Params) -> Params:
        """FedAvg of a stack over the sampled lanes, per experiment (weights: ``--weighting``), -> (E, ...)."""


class Algorithm:
    """Base class: FedAvg of whatever the clients train (the official FedCLIP server)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, shown by --help and list_algorithms()
    reference: ClassVar[str] = ""  # paper or code it follows
    trains: ClassVar[bool] = True
    pooled: ClassVar[bool] = False
    personal: ClassVar[bool] = False
    communicates: ClassVar[bool] = True
    client_state: ClassVar[bool] = False  # clients keep state between rounds: init_state gets per-lane copies
    prompts: ClassVar[bool] = False  # trains CoOp context vectors instead of an adapter (the loop loads the text tower)
    upload_factor: ClassVar[int] = 1  # adapters' worth of parameters a client sends (and receives) per round
    uses: ClassVar[tuple[str, ...]] = ()  # FederateConfig fields only some algorithms read

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # ---- client side
    def proximal_mu(self) -> float:
        """Weight of the proximal term mu/2 ||w - w_global||^2 added to the local objective (FedProx)."""
        return 0.0

    # ---- the round
    def init_state(self, server: Params, clients: Params) -> TrainState:
        """The state before round 1, from the initial global model (E, ...) and the lanes' copies (L, ...; given
        only to ``personal`` and ``client_state`` algorithms, empty otherwise: 100 clients' copies of a 512-d
        adapter are 210 MB)."""
        return TrainState(server=server, clients=clients if self.personal else {})

    def run_round(self, state: TrainState, ctx: RoundContext) -> TrainState:
        """One round: the sampled clients train from the global model, the server turns their average into the
        new global model (:meth:`server_update`); personal algorithms train each client's own model, no server."""
        if self.personal:
            trained, _ = ctx.train(ctx.select(state.clients))
            state.clients = ctx.scatter(state.clients, trained)
            return state
        trained, _ = ctx.train(ctx.broadcast(state.server))
        state.server, state.extra = self.server_update(state.server, ctx.average(trained), state.extra, ctx.rnd)
        return state

    def server_update(self, current: Params, averaged: Params, extra: dict, rnd: int) -> ServerUpdate:
        """The new global model from the current one and the clients' (weighted) average; pure (returns new
        tensors and state). FedAvg: the average itself."""
        return ServerUpdate(averaged, extra)

    # ---- evaluation
    def scored_params(self, state: TrainState) -> Params:
        """The parameters evaluation groups are scored with: one global model per experiment, or one per lane
        (personal algorithms)."""
        return state.clients if self.personal else state.server


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``--algo cls.name``."""
    if not cls.name or cls.name in ALGORITHMS:
        raise ValueError(f"algorithm name {cls.name!r} missing or registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str, flag: str = "--algo") -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ConfigError(f"{flag} {name!r} unknown; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def list_algorithms() -> list[str]:
    """Names ``--algo`` accepts, in registration order."""
    return list(ALGORITHMS)


def algorithms_help() -> str:
    return " | ".join(f"{n} ({c.summary})" for n, c in ALGORITHMS.items())
