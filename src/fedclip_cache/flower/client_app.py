"""Flower apps for real federated sites, built on the same pure functions as the in-process loop (flwr 1.42's
Message API: the ServerApp drives the grid itself, see :mod:`fedclip_cache.flower.server_app`).

Protocol (one message per node per round; each message is ONE config record: settings or metrics, and the
adapter packed into one float32 byte string, see :func:`content`):

* ``query.setup`` (once): each site answers with its facts (name, held out or not, dimension, classes, split
  sizes, cache identity) and, for ``--head prototype``, a training site adds its per-class sums of normalised
  features and class counts; the server sums them into the global class prototypes (``loop.build_heads``'s rule).
* ``train.round`` r = 1..R+1: carries the global adapter after round r-1 (and the prototype head), whether to
  evaluate it (it is the model whose metrics are round r-1's row; rounds as ``--eval-every`` picks them) and the
  names of the sites sampled to train in round r. Every site evaluates; a sampled site then trains from that same
  adapter (:func:`fedclip_cache.federated.train.local_update`, one lane, the algorithm's local objective) and
  returns it with its weight. Message R+1 only evaluates. The held-out site never trains.
* ``train.finetune`` (once, only with ``--finetune-steps K``): carries the selected global adapter (the best mean
  validation round's, kept by the server); each training site fine-tunes it for K steps on its own train split
  (``loop.finetune_adapters``: the schedule, seeds and fresh optimiser of ``federate``) and returns its test
  accuracy (``best.test_finetuned`` in the run folder).

Batches, splits, views (``--train-views``) and initialisation use the same seeds as ``fedclip-cache federate``, so
a deployment's rounds equal the in-process loop's (tested). Run config: ``cache`` (a shared cache whose training
clients are picked by node config ``partition-id=K``; leave it out for per-site caches, node config
``cache=PATH``), ``sites`` (nodes to wait for), ``heldout`` ("" for the personal protocol), ``out`` (the run folder
the ServerApp writes), fault tolerance (``round_timeout``, ``min_results``, ``startup_timeout``), ``poll_interval``
and any federate option. Options the apps cannot honour are refused in one line (:func:`_federate_config`).
Requires ``pip install 'fedclip-cache[flower]'``.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..cache.reader import FeatureCache, open_cache
from ..federated.adapters import adapter_options, get_adapter
from ..federated.algorithms import Algorithm, make_algorithm
from ..federated.config import ConfigError, FederateConfig, option_flag
from ..federated.fpenv import flush_denormals
from ..federated.loop import (_class_sums, client_lanes, finetune_adapters, resolve_logit_scale, resolve_train_views,
                             text_head)
from ..federated.protocols import Client, Experiment, build_experiments, split_indices
from ..federated.train import LocalHyper, batch_schedule, evaluate, host_tensor, lane_key, local_update

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedclip_cache.flower.client_app needs Flower: pip install 'fedclip-cache[flower]'") from e


# Run-config keys of a deployment besides the federate options (see flower_server.py).
DEPLOYMENT_KEYS = ("sites", "out", "round_timeout", "min_results", "startup_timeout", "poll_interval")
HEAD = "__head__"  # the prototype head's entry in a packed array

# Federate options the Flower apps do not honour, each with what to do instead (a silently ignored option would
# give a run folder that looks like federate's but is not). Checked against the defaults.
UNSUPPORTED = {
    "device": "the sites train on their CPU; leave --device at cpu",
}


def check_deployment_keys(rc: dict) -> None:
    """A one-line ConfigError for a run config's ``sites``, ``min_results``, ``round_timeout`` or ``poll_interval``
    that the ServerApp cannot honour: checked by the ServerApp and, before anything starts, by ``deploy`` and
    ``simulate`` (a NaN round timeout never expired; a negative one failed every round as "no site answered")."""
    import math

    n_sites = int(rc.get("sites", 0))
    if n_sites < 1:
        raise ConfigError("set the run config's `sites` to the number of SuperNodes")
    min_results = int(rc.get("min_results", 1))
    if not 1 <= min_results <= n_sites:
        raise ConfigError(f"min_results {min_results}: must be between 1 and the number of nodes ({n_sites})")
    for key, hi in (("round_timeout", None), ("startup_timeout", None), ("poll_interval", 60.0)):
        if key in rc:
            v = float(rc[key])
            if not (math.isfinite(v) and v > 0 and (hi is None or v <= hi)):
                raise ConfigError(f"{key} {v}: must be a positive number of seconds"
                                  + (f", at most {hi:g}" if hi else ""))


def _federate_config(run_config: dict) -> tuple[str, FederateConfig]:
    """(the shared cache path, or "" for per-site caches; the run's FederateConfig) from Flower's run config, or a
    one-line ConfigError naming an option the apps cannot honour."""
    rc = dict(run_config)
    cache = rc.pop("cache", "")
    for key in DEPLOYMENT_KEYS:  # the deployment's own settings, not federate options
        rc.pop(key, None)
    heldout = rc.pop("heldout", "")
    if isinstance(rc.get("split"), str):  # Flower's run config holds scalars: "0.6,0.2,0.2"
        try:
            rc["split"] = tuple(float(x) for x in rc["split"].split(","))
        except ValueError:
            raise ConfigError(f"--split {rc['split']!r}: expected three fractions, e.g. 0.6,0.2,0.2") from None
    cfg = FederateConfig.from_dict({**rc, "heldout": [heldout] if heldout else [],
                                    "protocol": "lodo" if heldout else "personal"}).validate()
    default = FederateConfig()
    for name, why in UNSUPPORTED.items():
        if getattr(cfg, name) != getattr(default, name):
            raise ConfigError(f"{option_flag(name)} {getattr(cfg, name)}: not supported by the Flower apps: {why}")
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
    if not cache and (cfg.partition != "none" or cfg.split_source != "random" or cfg.client_key != "domain"):
        bad = next(n for n in ("partition", "split_source", "client_key") if getattr(cfg, n) != getattr(default, n))
        raise ConfigError(f"{option_flag(bad)} {getattr(cfg, bad)}: per-site caches: a site is one client (use the "
                          f"default --partition none, --split-source random, --client-key domain)")
    return cache, cfg


# ------------------------------------------------------------------------------------------------ the wire format

def pack(params: dict) -> tuple[np.ndarray, str]:
    """Named tensors -> one flat float32 array and its layout (JSON: [[name, shape], ...]): one Array (one object
    per hop) whatever the adapter's parameter count."""
    arrays = [np.asarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v, np.float32) for v in params.values()]
    layout = json.dumps([[n, list(a.shape)] for n, a in zip(params, arrays)])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    return flat, layout


def unpack(flat: np.ndarray, layout: str) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, shape in json.loads(layout):
        n = int(np.prod(shape)) if shape else 1
        out[name] = torch.from_numpy(np.array(flat[at:at + n], np.float32).reshape(shape))
        at += n
    return out


def content(config: dict, params: Optional[dict] = None) -> RecordDict:
    """A message's content: ONE config record holding the settings or metrics and, when there are tensors, their
    packed float32 bytes and layout -- three objects per message on each hop (message, record dict, record), where
    an ArrayRecord per tensor would add an ArrayRecord, an Array and an ArrayChunk per parameter."""
    rec = dict(config)
    if params:
        flat, rec["layout"] = pack(params)
        rec["packed"] = flat.tobytes()
    return RecordDict({"fc": ConfigRecord(rec)})


def read(msg_content: RecordDict) -> tuple[dict, dict]:
    """(config record as a dict, unpacked tensors) of a message's content."""
    rec = dict(msg_content["fc"])
    packed = rec.pop("packed", None)
    params = unpack(np.frombuffer(packed, np.float32), rec.pop("layout")) if packed is not None else {}
    return rec, params


# ------------------------------------------------------------------------------------------------ a site

def site_experiment(cache: FeatureCache, cfg: FederateConfig) -> tuple[Experiment, bool]:
    """A site's view of the run from its own cache (one domain): the experiment as ``federate`` names it (batch
    and split seeds derive from the names, so a site trains exactly as its lane of the in-process loop), and
    whether this site is the held-out domain (it then only evaluates)."""
    domains = cache.domain_names
    if len(domains) != 1:
        raise ConfigError(f"{cache.path}: a site cache holds one domain (this one: {', '.join(domains)}); extract "
                          f"each site's own images into its own cache")
    name, rows = domains[0], np.arange(len(cache))
    heldout = cfg.heldout[0] if cfg.heldout else None
    exp_name = f"heldout={heldout}/seed{cfg.seed}" if heldout else f"personal/seed{cfg.seed}"
    if name == heldout:
        return Experiment(exp_name, cfg.seed, [Client(name, rows[:0], rows[:0], rows)], heldout, rows), True
    tr, va, te = split_indices(rows, cfg.split, cfg.seed, name, cfg.split_tail)
    client = Client(name, tr, va, te, int(len(rows) - len(tr) - len(va) - len(te)))
    return Experiment(exp_name, cfg.seed, [client], heldout), False


class SiteClient:
    """One site: its cached features never leave it; only the adapter (and, once, class sums) travels. Either one
    training client of a shared cache (``partition_id``: its index among the run's training clients) or a site
    with its own cache (``partition_id=None``; the held-out site only evaluates). Stateless between messages."""

    def __init__(self, cache_path: str, cfg: FederateConfig, partition_id: Optional[int] = None):
        cache = open_cache(cache_path)
        self.heldout_site = False
        # its place among the run's training clients (the loop's order); -1: a site with its own cache
        self.order = -1 if partition_id is None else int(partition_id)
        if partition_id is None:
            exp, self.heldout_site = site_experiment(cache, cfg)
            partition_id = 0
        else:
            exp = build_experiments(cache, cfg)[0]
            if not 0 <= partition_id < len(exp.clients):
                raise ConfigError(f"partition-id {partition_id} out of range: {len(exp.clients)} training clients")
        self.cfg, self.exp, self.client, self.cache = cfg, exp, exp.clients[partition_id], cache
        self.X, self.Y = host_tensor(cache.features), torch.from_numpy(cache.labels)
        self.views = resolve_train_views(cfg, cache)  # --train-views: training gathers from the first k views
        if self.views > 1 and not self.heldout_site:
            v = cache.views(self.views)
            self.Xtrain, self.Ytrain = host_tensor(v.reshape(self.views * v.shape[1], -1)), self.Y.repeat(self.views)
        else:
            self.Xtrain, self.Ytrain = self.X, self.Y
        self.kind = get_adapter(cfg.adapter)
        self.dim = cache.dim
        self.hidden = cfg.hidden or self.kind.default_hidden(cache.dim)
        self.text = text_head(cache, cfg.template) if cfg.head == "text" else None
        self.logit_scale, self.logit_scale_source = resolve_logit_scale(cfg, cache)  # as `federate` on it
        self.hp = LocalHyper.from_config(cfg, make_algorithm(cfg).proximal_mu(), self.logit_scale)
        self.opts = adapter_options(cfg)

    @property
    def name(self) -> str:
        return self.client.name

    def facts(self) -> dict:
        """What the server's run folder needs from this site (the server holds no cache)."""
        c = self.client
        return {"client": c.name, "order": self.order, "heldout": self.heldout_site, "dim": self.dim,
                "num_classes": len(self.cache.classes), "model_params": int(self.cache.model_params or 0),
                "cache": str(Path(self.cache.path).resolve()), "images": len(self.cache),
                "complete": bool(self.cache.complete), "identity": json.dumps(self.cache.identity()),
                "logit_scale": self.logit_scale, "logit_scale_source": self.logit_scale_source,
                "train_views": self.views, "train_n": len(c.train), "val_n": len(c.val), "test_n": len(c.test),
                "dropped": c.dropped}

    def class_stats(self) -> dict:
        """Per-class sums of this site's normalised training features and class counts (``--head prototype``)."""
        sums, counts = _class_sums(self.X, self.Y, self.client.train, len(self.cache.classes))
        return {"sums": sums, "counts": counts}

    def _head(self, head: Optional[torch.Tensor]) -> torch.Tensor:
        if self.text is not None:
            return self.text
        if head is None:
            raise ConfigError("--head prototype: the server sent no class prototypes")
        return head

    def fit(self, params: dict, rnd: int, head: Optional[torch.Tensor] = None) -> tuple[dict, int]:
        """This site's local update of round ``rnd`` from ``params`` (unstacked), and its weight."""
        sched = batch_schedule(self.client.train, self.exp.seed, rnd, lane_key(self.exp.name, self.client.name),
                               self.hp, self.views, len(self.Y))
        with flush_denormals(not self.cfg.keep_denormals):  # as run_loop
            new = local_update(self.kind, {n: v.unsqueeze(0) for n, v in params.items()}, self.Xtrain, self.Ytrain,
                               self._head(head).unsqueeze(0), [sched], self.hp, self.opts)
        n = 1 if self.cfg.weighting == "uniform" else len(self.client.train)
        return {k: v[0] for k, v in new.items()}, n

    def _score(self, params: dict, rows: np.ndarray, head) -> tuple[float, float]:
        """Accuracy and mean loss on ``rows``, summed in float64 as the in-process loop does (equal numbers)."""
        if not len(rows):
            return float("nan"), float("nan")
        correct, loss = evaluate(self.kind, {n: v.unsqueeze(0) for n, v in params.items()}, self.X, self.Y,
                                 self._head(head).unsqueeze(0), torch.from_numpy(rows).unsqueeze(0),
                                 self.logit_scale, self.opts)
        return int(correct.sum()) / len(rows), float(loss.double().sum()) / len(rows)

    def evaluate(self, params: dict, head: Optional[torch.Tensor] = None) -> dict:
        """The global adapter on this site's own splits, with the facts (the recorder's report of this site)."""
        c = self.client
        if self.heldout_site:
            acc, loss = self._score(params, c.test, head)
            return {**self.facts(), "heldout_accuracy": acc, "heldout_loss": loss, "n": len(c.test)}
        va, vl = self._score(params, c.val, head)
        ta, tl = self._score(params, c.test, head)
        return {**self.facts(), "test_accuracy": ta, "test_loss": tl, "val_accuracy": va, "val_loss": vl}

    def finetune(self, params: dict, head: Optional[torch.Tensor] = None) -> float:
        """``--finetune-steps``: the selected global adapter ``params`` fine-tuned on this site's train split
        (``loop.finetune_adapters`` on this site's lane: the schedule, seed, key and fresh optimiser of ``federate``)
        and scored on its test split (NaN when it has none)."""
        lanes = client_lanes([Experiment(self.exp.name, self.exp.seed, [self.client])])
        with flush_denormals(not self.cfg.keep_denormals):  # as run_loop
            tuned = finetune_adapters(self.kind, {n: v.unsqueeze(0) for n, v in params.items()}, self.X, self.Y,
                                      self._head(head).unsqueeze(0), lanes, self.cfg.finetune_steps, self.hp,
                                      self.opts)
            return self._score({k: v[0] for k, v in tuned.items()}, self.client.test, head)[0]

    def handle(self, rec: dict, params: dict) -> tuple[dict, dict]:
        """One message (config record, unpacked tensors) -> the reply's (config record, tensors to pack)."""
        if rec.get("phase") == "setup":
            stats = self.class_stats() if self.cfg.head == "prototype" and not self.heldout_site else {}
            return self.facts(), stats
        head = params.pop(HEAD, None)
        out: dict = {"client": self.name, "heldout": self.heldout_site}
        if rec.get("phase") == "finetune":  # the held-out site never trains: it answers with nothing to record
            if not self.heldout_site:
                out.update(finetuned=True, test_finetuned=self.finetune(params, head))
            return out, {}
        if rec.get("evaluate"):
            out.update(self.evaluate(params, head), evaluated=True)
        if self.name in list(rec.get("train", [])) and not self.heldout_site:
            new, out["weight"] = self.fit(params, int(rec["round"]), head)
            out["trained"] = True
            return out, new
        return out, {}


# ------------------------------------------------------------------------------------------------ the ClientApp

# The clients of the runs this process has served, newest last: a long-lived ClientApp process (fedclip-cache site)
# opens a site's cache and builds its splits once per run, not once per message. Keyed by the run id and the whole
# node and run config, so two runs (or two configs) never share a client; SiteClient keeps no state between
# messages, so reusing it changes no result.
_CLIENTS: "OrderedDict[tuple, SiteClient]" = OrderedDict()
_CLIENTS_MAX = 4
_CLIENTS_LOCK = threading.Lock()


def _client_key(context: Context) -> tuple:
    freeze = lambda d: tuple(sorted((str(k), repr(v)) for k, v in dict(d).items()))  # noqa: E731
    return int(context.run_id), freeze(context.node_config), freeze(context.run_config)


def site_client(context: Context) -> SiteClient:
    key = _client_key(context)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            cache, cfg = _federate_config(context.run_config)
            node = context.node_config
            if "cache" in node:  # a site with its own cache (its own images only)
                client = SiteClient(str(node["cache"]), cfg)
            else:
                client = SiteClient(cache, cfg, int(node["partition-id"]))
            _CLIENTS[key] = client
            while len(_CLIENTS) > _CLIENTS_MAX:  # runs long finished: let their caches go
                _CLIENTS.popitem(last=False)
        _CLIENTS.move_to_end(key)
    return client


client_app = ClientApp()


@client_app.query("setup")
@client_app.train("round")
@client_app.train("finetune")
def _answer(message: Message, context: Context) -> Message:
    """Every message type: its one config record is the site's to handle (``SiteClient.handle`` reads the phase)."""
    rec, params = read(message.content)
    out, arrays = site_client(context).handle(rec, params)
    return Message(content(out, arrays), reply_to=message)


def quick_object_pulls(module, backoff: float) -> None:
    """Make ``module``'s ``pull_objects`` retry a missing object after ``backoff`` seconds (flwr 1.42: 1 s, then 2 s,
    4 s, ...). A message becomes visible before all its objects have been pushed, so a reader that polls fast
    regularly finds an object missing and, with flwr's backoff, waits a whole second for it."""
    import functools

    from flwr.supercore.inflatable import inflatable_utils

    module.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=backoff,
                                            backoff_cap=max(backoff, 1.0))
