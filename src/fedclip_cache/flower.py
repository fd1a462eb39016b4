"""Flower apps for real federated clients, built on the same pure functions as the in-process loop.

Each Flower client holds only its own rows of a cache (its domain's features and the class-prompt embeddings);
``fit`` is :func:`fedclip_cache.federated.train.local_update` with one lane and the algorithm's local objective;
the server is :class:`AlgorithmStrategy`, Flower's ``FedAvg`` averaging followed by the algorithm's own
``server_update`` (the same pure function the in-process loop calls: FedAvg, FedAvgM, FedAdam, ...). Clients report
``num_examples = 1`` for the official uniform average, or their training-set size with ``weighting = "samples"``. Batches, splits and initialisation use the same seeds as ``fedclip-cache federate``, so
one round of Flower equals one round of the in-process loop (tested).

Run config keys (``flwr run ... --run-config``): ``cache`` (path), ``heldout`` (the domain left out; "" for the
personal protocol) and any federate option (``rounds``, ``lr``, ``hidden`` ...). Node config: ``partition-id``
(index of the training client). Requires ``pip install 'fedclip-cache[flower]'``; only the text head is supported
(prototype heads need a federated sum of class statistics first).
"""
from __future__ import annotations

import numpy as np
import torch

from .cache import open_cache
from .federated.adapters import get_adapter, init_params
from .federated.algorithms import Algorithm, make_algorithm
from .federated.config import ConfigError, FederateConfig
from .federated.loop import resolve_logit_scale, text_head
from .federated.protocols import build_experiments
from .federated.train import LocalHyper, batch_schedule, evaluate, lane_key, local_update

try:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedclip_cache.flower needs Flower: pip install 'fedclip-cache[flower]'") from e


def _federate_config(run_config: dict) -> tuple[str, FederateConfig]:
    rc = dict(run_config)
    cache = rc.pop("cache")
    heldout = rc.pop("heldout", "")
    cfg = FederateConfig.from_dict({**rc, "heldout": [heldout] if heldout else [],
                                    "protocol": "lodo" if heldout else "personal"}).validate()
    if cfg.head != "text":
        raise ConfigError("the Flower apps support --head text only")
    algo = make_algorithm(cfg)
    if not algo.communicates:
        raise ConfigError(f"--algo {cfg.algo}: nothing to federate (it trains without a server); use "
                          f"`fedclip-cache federate`")
    if getattr(algo, "prompts", False):
        raise ConfigError(f"--algo {cfg.algo} (prompt learning) is not supported by the Flower apps yet; use "
                          f"`fedclip-cache federate`")
    if algo.client_state or type(algo).run_round is not Algorithm.run_round:  # e.g. SCAFFOLD's c_i
        raise ConfigError(f"--algo {cfg.algo} is not supported by the Flower apps yet (its clients keep state "
                          f"between rounds); use `fedclip-cache federate`")
    return cache, cfg


class FedCLIPClient(NumPyClient):
    """One training client: its cached features never leave it; only the adapter travels."""

    def __init__(self, cache_path: str, cfg: FederateConfig, partition_id: int):
        cache = open_cache(cache_path)
        exp = build_experiments(cache, cfg)[0]
        if not 0 <= partition_id < len(exp.clients):
            raise ConfigError(f"partition-id {partition_id} out of range: {len(exp.clients)} training clients")
        self.cfg, self.exp, self.client = cfg, exp, exp.clients[partition_id]
        self.X, self.Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
        self.kind = get_adapter(cfg.adapter)
        self.hidden = cfg.hidden or self.kind.default_hidden(cache.dim)
        self.names = list(self.kind.shapes(cache.dim, self.hidden))
        self.head = text_head(cache, cfg.template)
        self.logit_scale, _ = resolve_logit_scale(cfg, cache)  # the same value as `federate` on this cache
        self.hp = LocalHyper.from_config(cfg, make_algorithm(cfg).proximal_mu(), self.logit_scale)
        self.opts = {"residual_alpha": cfg.residual_alpha}

    def _stacked(self, parameters) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(np.asarray(p)).unsqueeze(0) for n, p in zip(self.names, parameters)}

    def fit(self, parameters, config):
        rnd = int(config.get("server_round", 1))
        sched = batch_schedule(self.client.train, self.exp.seed, rnd, lane_key(self.exp.name, self.client.name),
                               self.hp)
        new = local_update(self.kind, self._stacked(parameters), self.X, self.Y, self.head.unsqueeze(0), [sched],
                           self.hp, self.opts)
        n = 1 if self.cfg.weighting == "uniform" else len(self.client.train)
        return [new[k][0].numpy() for k in self.names], n, {}

    def evaluate(self, parameters, config):
        rows = torch.from_numpy(self.client.test).unsqueeze(0)
        correct, loss = evaluate(self.kind, self._stacked(parameters), self.X, self.Y, self.head.unsqueeze(0), rows,
                                 self.logit_scale, self.opts)
        return float(loss.mean()), len(self.client.test), {"accuracy": float(correct.float().mean())}


def initial_parameters(cache_path: str, cfg: FederateConfig) -> list[np.ndarray]:
    cache = open_cache(cache_path)
    kind = get_adapter(cfg.adapter)
    hidden = cfg.hidden or kind.default_hidden(cache.dim)
    p = init_params(cfg.adapter, cache.dim, hidden, cfg.seed)
    return [p[n].numpy() for n in kind.shapes(cache.dim, hidden)]


class AlgorithmStrategy(FedAvg):
    """Flower's FedAvg (sampling, weighting by ``num_examples``, failure handling), then the algorithm's server
    update on the average: the new global model and server state exactly as the in-process loop computes them."""

    def __init__(self, algo: Algorithm, names: list[str], **kw):
        super().__init__(**kw)
        self.algo, self.names = algo, names
        self.current = {n: torch.from_numpy(p).unsqueeze(0)
                        for n, p in zip(names, parameters_to_ndarrays(kw["initial_parameters"]))}
        self.extra: dict = {}

    def aggregate_fit(self, server_round, results, failures):
        averaged, metrics = super().aggregate_fit(server_round, results, failures)
        if averaged is None:
            return None, metrics
        avg = {n: torch.from_numpy(p).unsqueeze(0) for n, p in zip(self.names, parameters_to_ndarrays(averaged))}
        self.current, self.extra = self.algo.server_update(self.current, avg, self.extra, server_round)
        return ndarrays_to_parameters([self.current[n][0].numpy() for n in self.names]), metrics


def client_fn(context: Context):
    cache, cfg = _federate_config(context.run_config)
    return FedCLIPClient(cache, cfg, int(context.node_config["partition-id"])).to_client()


def server_fn(context: Context):
    cache, cfg = _federate_config(context.run_config)
    fc = open_cache(cache)
    n_clients = len(build_experiments(fc, cfg)[0].clients)
    kind = get_adapter(cfg.adapter)
    names = list(kind.shapes(fc.dim, cfg.hidden or kind.default_hidden(fc.dim)))
    strategy = AlgorithmStrategy(make_algorithm(cfg), names, fraction_fit=1.0, fraction_evaluate=1.0,
                                 min_fit_clients=n_clients, min_available_clients=n_clients,
                                 initial_parameters=ndarrays_to_parameters(initial_parameters(cache, cfg)),
                                 on_fit_config_fn=lambda rnd: {"server_round": rnd})
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.rounds))


client_app = ClientApp(client_fn=client_fn)
server_app = ServerApp(server_fn=server_fn)
