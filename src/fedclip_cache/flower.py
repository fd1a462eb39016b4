"""Flower apps for real federated clients, built on the same pure functions as the in-process loop.

Each Flower client holds only its own rows (a training client of a shared cache, or a site with its own cache);
``fit`` is :func:`fedclip_cache.federated.train.local_update` with one lane and the algorithm's local objective;
the server is :class:`AlgorithmStrategy`, Flower's ``FedAvg`` averaging followed by the algorithm's own
``server_update`` (the same pure function the in-process loop calls: FedAvg, FedAvgM, FedAdam, ...). Clients report
``num_examples = 1`` for the official uniform average, or their training-set size with ``weighting = "samples"``.
Batches, splits and initialisation use the same seeds as ``fedclip-cache federate``, so one round of Flower equals
one round of the in-process loop (tested).

Run config: ``cache`` (a shared cache; leave it out for per-site caches and give ``sites = N``), ``heldout`` (the
domain left out; "" for the personal protocol), ``out`` (the run folder the ServerApp writes, as ``federate``),
fault tolerance (``round_timeout``, ``min_results``, ``startup_timeout``) and any federate option (``rounds``,
``lr``, ``algo`` ...). Node config: ``cache=PATH`` (a site's own cache) or ``partition-id=K`` (index of the
training client in a shared cache). Requires ``pip install 'fedclip-cache[flower]'``; text head only (prototype
heads need a federated sum of class statistics first).
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from logging import WARNING
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cache import FeatureCache, open_cache
from .federated.adapters import get_adapter, init_params
from .federated.algorithms import Algorithm, make_algorithm
from .federated.config import ConfigError, FederateConfig
from .federated.loop import resolve_logit_scale, text_head
from .federated.protocols import Client, Experiment, build_experiments, split_indices
from .federated.recorder import RunRecorder
from .federated.train import LocalHyper, batch_schedule, evaluate, lane_key, local_update

try:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.logger import log
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.serverapp import Grid
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedclip_cache.flower needs Flower: pip install 'fedclip-cache[flower]'") from e


# Run-config keys of a deployment besides the federate options: per-site caches' count, the run folder, and fault
# tolerance -- a round waits at most round_timeout seconds for replies; fewer than min_results training results
# leave the global model as it was; after round 1 a node that is gone is simply not sampled (nothing waits for it)
# and one that comes back is sampled again.
# ``poll_interval``: how often the ServerApp asks the SuperLink for replies (Flower's legacy server asks every 3 s, so
# every fit and every evaluate of a round costs at least 3 s however fast the clients answer).
DEPLOYMENT_KEYS = ("sites", "out", "round_timeout", "min_results", "startup_timeout", "poll_interval")
DEFAULT_ROUND_TIMEOUT = 600.0
DEFAULT_MIN_RESULTS = 1
DEFAULT_STARTUP_TIMEOUT = 300.0
DEFAULT_POLL_INTERVAL = 3.0  # Flower's own (flwr 1.42 http_grid.send_and_receive)


def _federate_config(run_config: dict) -> tuple[str, FederateConfig]:
    """(the shared cache path, or "" for per-site caches; the run's FederateConfig) from Flower's run config."""
    rc = dict(run_config)
    cache = rc.pop("cache", "")
    for key in DEPLOYMENT_KEYS:  # the deployment's own settings, not federate options
        rc.pop(key, None)
    heldout = rc.pop("heldout", "")
    cfg = FederateConfig.from_dict({**rc, "heldout": [heldout] if heldout else [],
                                    "protocol": "lodo" if heldout else "personal"}).validate()
    if cfg.head != "text":
        raise ConfigError("the Flower apps support --head text only")
    algo = make_algorithm(cfg)
    if not algo.communicates:
        raise ConfigError(f"--algo {cfg.algo}: nothing to federate (it trains without a server); use "
                          f"`fedclip-cache federate`")
    if algo.prompts:
        raise ConfigError(f"--algo {cfg.algo} (prompt learning) is not supported by the Flower apps yet; use "
                          f"`fedclip-cache federate`")
    if algo.client_state or type(algo).run_round is not Algorithm.run_round:  # e.g. SCAFFOLD's c_i
        raise ConfigError(f"--algo {cfg.algo} is not supported by the Flower apps yet (its clients keep state "
                          f"between rounds); use `fedclip-cache federate`")
    return cache, cfg


def site_experiment(cache: FeatureCache, cfg: FederateConfig) -> tuple[Experiment, bool]:
    """A site's view of the run from its own cache (one domain): the experiment as ``federate`` names it (batch
    and split seeds derive from the names, so a site trains exactly as its lane of the in-process loop), and
    whether this site is the held-out domain (it then only evaluates)."""
    domains = cache.domain_names
    if len(domains) != 1:
        raise ConfigError(f"{cache.path}: a site cache holds one domain (this one: {', '.join(domains)}); extract "
                          f"each site's own images into its own cache")
    if cfg.partition != "none" or cfg.split_source != "random" or cfg.client_key != "domain":
        raise ConfigError("per-site caches: a site is one client (use the default --partition none, "
                          "--split-source random, --client-key domain)")
    name, rows = domains[0], np.arange(len(cache))
    heldout = cfg.heldout[0] if cfg.heldout else None
    exp_name = f"heldout={heldout}/seed{cfg.seed}" if heldout else f"personal/seed{cfg.seed}"
    if name == heldout:
        return Experiment(exp_name, cfg.seed, [Client(name, rows[:0], rows[:0], rows)], heldout, rows), True
    tr, va, te = split_indices(rows, cfg.split, cfg.seed, name, cfg.split_tail)
    client = Client(name, tr, va, te, int(len(rows) - len(tr) - len(va) - len(te)))
    return Experiment(exp_name, cfg.seed, [client], heldout), False


class FedCLIPClient(NumPyClient):
    """One client: its cached features never leave it; only the adapter travels. Either one training client of a
    shared cache (``partition_id``: its index among the run's training clients) or a site with its own cache
    (:meth:`for_site`; the held-out site only evaluates)."""

    def __init__(self, cache_path: str, cfg: FederateConfig, partition_id: Optional[int] = None):
        cache = open_cache(cache_path)
        self.heldout_site = False
        if partition_id is None:
            exp, self.heldout_site = site_experiment(cache, cfg)
            partition_id = 0
        else:
            exp = build_experiments(cache, cfg)[0]
            if not 0 <= partition_id < len(exp.clients):
                raise ConfigError(f"partition-id {partition_id} out of range: {len(exp.clients)} training clients")
        self.cfg, self.exp, self.client = cfg, exp, exp.clients[partition_id]
        self.X, self.Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
        self.kind = get_adapter(cfg.adapter)
        self.hidden = cfg.hidden or self.kind.default_hidden(cache.dim)
        self.names = list(self.kind.shapes(cache.dim, self.hidden))
        self.dim = cache.dim
        self.head = text_head(cache, cfg.template)
        self.cache = cache
        self.logit_scale, self.logit_scale_source = resolve_logit_scale(cfg, cache)  # as `federate` on it
        self.hp = LocalHyper.from_config(cfg, make_algorithm(cfg).proximal_mu(), self.logit_scale)
        self.opts = {"residual_alpha": cfg.residual_alpha}

    @classmethod
    def for_site(cls, cache_path: str, cfg: FederateConfig) -> "FedCLIPClient":
        return cls(cache_path, cfg, None)

    def get_parameters(self, config):
        """The initial adapter (the same seeded init as ``federate``): lets a server without any cache start."""
        p = init_params(self.cfg.adapter, self.dim, self.hidden, self.cfg.seed)
        return [p[n].numpy() for n in self.names]

    def _stacked(self, parameters) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(np.asarray(p)).unsqueeze(0) for n, p in zip(self.names, parameters)}

    def fit(self, parameters, config):
        if self.heldout_site:  # never trains; weight 0 keeps it out of the average
            return [np.asarray(p) for p in parameters], 0, {"heldout": True}
        rnd = int(config.get("server_round", 1))
        sched = batch_schedule(self.client.train, self.exp.seed, rnd, lane_key(self.exp.name, self.client.name),
                               self.hp)
        new = local_update(self.kind, self._stacked(parameters), self.X, self.Y, self.head.unsqueeze(0), [sched],
                           self.hp, self.opts)
        n = 1 if self.cfg.weighting == "uniform" else len(self.client.train)
        return [new[k][0].numpy() for k in self.names], n, {}

    def _score(self, parameters, rows: np.ndarray) -> tuple[float, float]:
        """Accuracy and mean loss on ``rows``, summed in float64 as the in-process loop does (equal numbers)."""
        if not len(rows):
            return float("nan"), float("nan")
        correct, loss = evaluate(self.kind, self._stacked(parameters), self.X, self.Y, self.head.unsqueeze(0),
                                 torch.from_numpy(rows).unsqueeze(0), self.logit_scale, self.opts)
        return int(correct.sum()) / len(rows), float(loss.double().sum()) / len(rows)

    def evaluate(self, parameters, config):
        """The global adapter on this site's own splits, with the facts the server's run folder needs (the
        server holds no cache): sizes, model size, classes, logit scale, this cache's identity."""
        facts = {"client": self.client.name, "heldout": self.heldout_site, "dim": self.dim,
                 "num_classes": int(self.head.shape[0]), "model_params": int(self.cache.model_params or 0),
                 "cache": str(Path(self.cache.path).resolve()), "images": len(self.cache),
                 "complete": bool(self.cache.complete), "identity": json.dumps(self.cache.identity()),
                 "logit_scale": self.logit_scale, "logit_scale_source": self.logit_scale_source}
        if self.heldout_site:
            acc, loss = self._score(parameters, self.client.test)
            return loss, len(self.client.test), {"accuracy": acc, "heldout_accuracy": acc, "heldout_loss": loss,
                                                 "n": len(self.client.test), **facts}
        va, vl = self._score(parameters, self.client.val)
        ta, tl = self._score(parameters, self.client.test)
        c = self.client
        return tl, len(c.test), {"accuracy": ta, "test_accuracy": ta, "test_loss": tl, "test_n": len(c.test),
                                 "val_accuracy": va, "val_loss": vl, "val_n": len(c.val),
                                 "train_n": len(c.train), "dropped": c.dropped, **facts}


def initial_parameters(cache_path: str, cfg: FederateConfig) -> list[np.ndarray]:
    cache = open_cache(cache_path)
    kind = get_adapter(cfg.adapter)
    hidden = cfg.hidden or kind.default_hidden(cache.dim)
    p = init_params(cfg.adapter, cache.dim, hidden, cfg.seed)
    return [p[n].numpy() for n in kind.shapes(cache.dim, hidden)]


class AlgorithmStrategy(FedAvg):
    """Flower's FedAvg (sampling, weighting by ``num_examples``, failure handling), then the algorithm's server
    update on the average: the new global model and server state exactly as the in-process loop computes them."""

    def __init__(self, algo: Algorithm, names: list[str], recorder: Optional[RunRecorder] = None,
                 min_results: int = DEFAULT_MIN_RESULTS, wait_for_nodes: int = 0,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT, **kw):
        super().__init__(**kw)
        self.algo, self.names, self.recorder, self.min_results = algo, names, recorder, min_results
        self.wait_for_nodes, self.startup_timeout = wait_for_nodes, startup_timeout
        init = kw.get("initial_parameters")
        self.current = self._stack(parameters_to_ndarrays(init)) if init is not None else None
        self.extra: dict = {}

    def _stack(self, arrays) -> dict:
        return {n: torch.from_numpy(np.asarray(p)).unsqueeze(0) for n, p in zip(self.names, arrays)}

    def configure_fit(self, server_round, parameters, client_manager):
        if self.wait_for_nodes:  # once, before round 1: every node; later rounds sample whoever is connected
            if not _wait_for_nodes(client_manager, self.wait_for_nodes, self.startup_timeout):
                log(WARNING, "only %s of %s nodes connected within %ss; starting without the others",
                    client_manager.num_available(), self.wait_for_nodes, self.startup_timeout)
            self.wait_for_nodes = 0
        if self.current is None:  # initial parameters came from a client (per-site caches)
            self.current = self._stack(parameters_to_ndarrays(parameters))
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        trained = [r for r in results if not r[1].metrics.get("heldout", False)]  # the held-out site never trains
        if self.recorder:
            self.recorder.fit_round(server_round, len(trained), len(failures))
        if len(trained) < self.min_results or not trained:  # too few answers: the global model stays as it was
            log(WARNING, "round %s: %s training result(s), fewer than min_results=%s; the global adapter is "
                "unchanged", server_round, len(trained), self.min_results)
            if self.current is None:
                return None, {}
            return ndarrays_to_parameters([self.current[n][0].numpy() for n in self.names]), {}
        averaged, metrics = super().aggregate_fit(server_round, results, failures)
        if averaged is None:
            return None, metrics
        avg = self._stack(parameters_to_ndarrays(averaged))
        self.current, self.extra = self.algo.server_update(self.current, avg, self.extra, server_round)
        return ndarrays_to_parameters([self.current[n][0].numpy() for n in self.names]), metrics

    def aggregate_evaluate(self, server_round, results, failures):
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        if self.recorder and results:
            self.recorder.evaluate_round(server_round, [dict(res.metrics) for _, res in results], len(failures))
            if server_round == self.recorder.cfg.rounds:  # the last round: write the run folder
                trainable = sum(v[0].numel() for v in self.current.values())
                self.summary = self.recorder.write({n: v.clone() for n, v in self.current.items()}, trainable)
        return loss, metrics


def _wait_for_nodes(client_manager, n: int, timeout: float, interval: float = 0.1) -> bool:
    """Wait until ``n`` nodes are connected. Asks every ``interval`` s: ``num_available`` refreshes the node list
    from the SuperLink, whereas ``ClientManager.wait_for`` only sees the refresh Flower's compat layer does every
    5 s."""
    deadline = time.monotonic() + timeout
    while client_manager.num_available() < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# The clients of the runs this process has served, newest last: a long-lived ClientApp process (fedclip-cache site)
# opens a site's cache and builds its splits once per run, not once per message. Keyed by the run id and the whole
# node and run config, so two runs (or two configs) never share a client; FedCLIPClient keeps no state between
# messages (fit and evaluate are pure functions of the parameters and the round), so reusing it changes no result.
_CLIENTS: "OrderedDict[tuple, FedCLIPClient]" = OrderedDict()
_CLIENTS_MAX = 4
_CLIENTS_LOCK = threading.Lock()


def _client_key(context: Context) -> tuple:
    freeze = lambda d: tuple(sorted((str(k), repr(v)) for k, v in dict(d).items()))  # noqa: E731
    return int(context.run_id), freeze(context.node_config), freeze(context.run_config)


def client_fn(context: Context):
    key = _client_key(context)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            cache, cfg = _federate_config(context.run_config)
            node = context.node_config
            if "cache" in node:  # a site with its own cache (its own images only)
                client = FedCLIPClient.for_site(str(node["cache"]), cfg)
            else:
                client = FedCLIPClient(cache, cfg, int(node["partition-id"]))
            _CLIENTS[key] = client
            while len(_CLIENTS) > _CLIENTS_MAX:  # runs long finished: let their caches go
                _CLIENTS.popitem(last=False)
        _CLIENTS.move_to_end(key)
    return client.to_client()


def server_fn(context: Context):
    cache, cfg = _federate_config(context.run_config)
    algo = make_algorithm(cfg)
    if cache:  # one shared cache: the server knows the clients and the adapter's shape
        fc = open_cache(cache)
        n_clients = len(build_experiments(fc, cfg)[0].clients)
        kind = get_adapter(cfg.adapter)
        names = list(kind.shapes(fc.dim, cfg.hidden or kind.default_hidden(fc.dim)))
        initial = ndarrays_to_parameters(initial_parameters(cache, cfg))
    else:  # per-site caches: the server holds no data; a site sends the (seeded, identical) initial adapter
        n_clients = int(context.run_config.get("sites", 0))
        if n_clients < 1:
            raise ConfigError("per-site caches: set the run config's `sites` to the number of SuperNodes")
        kind = get_adapter(cfg.adapter)
        names = list(kind.shapes(1, 1))  # parameter order only (shapes come with the parameters)
        initial = None
    rc = context.run_config
    out = rc.get("out")
    recorder = RunRecorder(cfg, Path(str(out))) if out else None
    min_results = int(rc.get("min_results", DEFAULT_MIN_RESULTS))
    if not 1 <= min_results <= n_clients:
        raise ConfigError(f"min_results {min_results}: must be between 1 and the number of nodes ({n_clients})")
    strategy = AlgorithmStrategy(algo, names, recorder, min_results, wait_for_nodes=n_clients,
                                 startup_timeout=float(rc.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT)),
                                 # participation as in `federate`: max(int(n * fraction_fit), min_fit_clients)
                                 # clients per round (Flower's rule; Flower draws which ones)
                                 fraction_fit=cfg.fraction_fit, min_fit_clients=min(cfg.min_fit_clients, n_clients),
                                 fraction_evaluate=1.0, min_evaluate_clients=1,
                                 min_available_clients=1, initial_parameters=initial,
                                 on_fit_config_fn=lambda rnd: {"server_round": rnd})
    timeout = float(rc.get("round_timeout", DEFAULT_ROUND_TIMEOUT))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=timeout))


def _send_and_receive(grid: Grid, interval: float):
    """Flower's ``send_and_receive`` (flwr 1.42 ``HttpGrid``) asking for the replies every ``interval`` s instead of
    every 3 s: the same messages, the same timeout, the replies as soon as they are there."""

    def send_and_receive(messages, *, timeout=None):
        msg_ids = set(grid.push_messages(messages))
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret = []
        while timeout is None or time.time() < end_time:
            res_msgs = grid.pull_messages(msg_ids)
            ret.extend(res_msgs)
            msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
            if not msg_ids:
                break
            time.sleep(interval)
        return ret

    return send_and_receive


def quick_object_pulls(module, backoff: float) -> None:
    """Make ``module``'s ``pull_objects`` retry a missing object after ``backoff`` seconds (flwr 1.42: 1 s, then 2 s,
    4 s, ...). A message becomes visible before all its objects have been pushed, so a reader that polls fast
    regularly finds an object missing and, with flwr's backoff, waits a whole second for it."""
    import functools

    from flwr.supercore.inflatable import inflatable_utils

    module.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=backoff,
                                            backoff_cap=max(backoff, 1.0))


class FedCLIPServerApp(ServerApp):
    """Flower's ServerApp over :func:`server_fn`, polling the SuperLink for replies every ``poll_interval`` seconds
    (run config; Flower's 3 s by default)."""

    def __call__(self, grid: Grid, context: Context) -> None:
        interval = float(context.run_config.get("poll_interval", DEFAULT_POLL_INTERVAL))
        if not 0 < interval <= 60:
            raise ConfigError(f"poll_interval {interval}: must be in (0, 60] seconds")
        if interval != DEFAULT_POLL_INTERVAL:
            grid.send_and_receive = _send_and_receive(grid, interval)  # this grid object only
            import flwr.superlink.grid.http_grid as http_grid  # this process runs this ServerApp only

            quick_object_pulls(http_grid, interval)
        super().__call__(grid, context)


client_app = ClientApp(client_fn=client_fn)
server_app = FedCLIPServerApp(server_fn=server_fn)
