"""The ClientApp of a deployment: a site (:class:`SiteClient`) answering the ServerApp's messages with the same pure
functions as the in-process loop (flwr 1.42's Message API: the ServerApp drives the grid itself, see
:mod:`fedclip_cache.flower.server_app`).

Protocol (one message per node per round; each message is ONE config record: settings or metrics, and the
adapter packed into one float32 byte string, see :mod:`fedclip_cache.flower.wire`):

* ``query.setup`` (once): each site answers with its facts (name, held out or not, dimension, classes, split
  sizes, cache identity) and, for ``--head prototype``, a training site adds its per-class sums of normalised
  features and class counts; the server sums them into the global class prototypes (``loop.build_heads``'s rule).
* ``train.round`` r = 1..R+1: carries the global adapter after round r-1 (and the prototype head), whether to
  evaluate it (it is the model whose metrics are round r-1's row; rounds as ``--eval-every`` picks them) and the
  names of the sites sampled to train in round r. Every site evaluates; a sampled site then trains from that same
  adapter (:func:`fedclip_cache.federated.train.local_update`, one lane, the algorithm's local objective) and
  returns it with its training-set size. Message R+1 only evaluates. The held-out site never trains.
* ``train.finetune`` (once, only with ``--finetune-steps K``): carries the selected global adapter (the best mean
  validation round's, kept by the server); each training site fine-tunes it for K steps on its own train split
  (``loop.finetune_adapters``: the schedule, seeds and fresh optimiser of ``federate``) and returns its test
  accuracy (``best.test_finetuned`` in the run folder).

Batches, splits, views (``--train-views``) and initialisation use the same seeds as ``fedclip-cache federate``, so
a deployment's rounds equal the in-process loop's (tested). Run config: ``cache`` (a shared cache whose training
clients are picked by node config ``partition-id=K``; leave it out for per-site caches, node config
``cache=PATH``), ``sites`` (nodes to wait for), ``heldout`` ("" for the personal protocol), ``out`` (the run folder
the ServerApp writes), fault tolerance (``round_timeout``, ``min_results``, ``startup_timeout``), ``poll_interval``
and any federate option (decoded by :func:`fedclip_cache.flower.task.federate_config`, which refuses in one line
the options the apps cannot honour).
Requires ``pip install 'fedclip-cache[flower]'``.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..cache.reader import FeatureCache, open_cache
from ..federated.algorithms import make_algorithm
from ..federated.config import ConfigError, FederateConfig
from ..federated.fpenv import flush_denormals
from ..federated.loop import (EvalPlan, class_sums, client_lanes, finetune_adapters, finetune_schedules, lane_setup,
                              text_head)
from ..federated.protocols import Client, Experiment, build_experiments, federation_name, split_client
from ..federated.train import batch_schedule, lane_key, local_update
from .task import federate_config
from .wire import HEAD, LocalUpdate, Payload, content, pack, read, unpack

try:
    from flwr.app import ConfigRecord, Context, Message
    from flwr.clientapp import ClientApp
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedclip_cache.flower.client_app needs Flower: pip install 'fedclip-cache[flower]'") from e


# ------------------------------------------------------------------------------------------------ a site

class SiteExperiment(NamedTuple):
    """A site's experiment (its one client, or the held-out domain) and whether the site is the held-out one."""

    experiment: Experiment
    heldout: bool


def site_experiment(cache: FeatureCache, cfg: FederateConfig) -> SiteExperiment:
    """A site's view of the run from its own cache (one domain): the experiment as ``federate`` names it (batch
    and split seeds derive from the names, so a site trains exactly as its lane of the in-process loop), and
    whether this site is the held-out domain (it then only evaluates)."""
    domains = cache.domain_names
    if len(domains) != 1:
        raise ConfigError(f"{cache.path}: a site cache holds one domain (this one: {', '.join(domains)}); extract "
                          f"each site's own images into its own cache")
    name, rows = domains[0], np.arange(len(cache))
    heldout = cfg.heldout[0] if cfg.heldout else None
    exp_name = federation_name(cfg)
    if name == heldout:
        return SiteExperiment(Experiment(exp_name, cfg.seed, [Client(name, rows[:0], rows[:0], rows)], heldout, rows),
                              True)
    return SiteExperiment(Experiment(exp_name, cfg.seed, [split_client(cache, name, rows, cfg, cfg.seed)], heldout),
                          False)


def model_digest(meta: dict) -> str:
    """A short digest of a cache's model fingerprint (``cache.json``): the server checks every site reports the
    same one (the sites' features and, for prompt learning, their text towers come from one model)."""
    blob = json.dumps(meta.get("fingerprint"), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class SiteClient:
    """One site: its cached features never leave it; only the adapter (and, once, class sums) travels -- with
    prompt learning only the context vectors, and with a personal algorithm (``promptlocal``) nothing: the site
    keeps its own context in the ``state`` :meth:`handle` is given (the ClientApp keeps it in Flower's
    ``context.state``). Either one training client of a shared cache (``partition_id``: its index among the run's
    training clients) or a site with its own cache (``partition_id=None``; the held-out site only evaluates). Holds
    no state of its own between messages (the personal state is the caller's)."""

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
        self.algo = make_algorithm(cfg)
        # the rows, adapter, logit scale and hyper-parameters of this site's lane, as `federate` sets them up
        lanes = lane_setup(cache, cfg, self.algo, torch.device("cpu"), trains=not self.heldout_site)
        self.X, self.Y, self.Xtrain, self.Ytrain, self.views = lanes.X, lanes.Y, lanes.Xtrain, lanes.Ytrain, \
            lanes.train_views
        self.kind, self.dim, self.hidden, self.hp = lanes.kind, lanes.dim, lanes.hidden, lanes.hp
        self.logit_scale, self.logit_scale_source = lanes.logit_scale, lanes.logit_scale_source
        self.opts = lanes.opts
        # prompt learning: the frozen text tower rebuilt from THIS site's cache's provenance, with the checks and
        # one-line errors of `federate` (promptsteps.prompt_learner); the site's lane then trains context vectors
        self.prompts = None
        if self.algo.prompts:
            from ..federated.promptsteps import prompt_learner, text_model

            self.prompts = prompt_learner(text_model(cache.meta, cfg), cache.classes, cfg)
        self.text = text_head(cache, cfg.template) if cfg.head == "text" and self.prompts is None else None
        self.own: dict = {}  # the personal state when handle() is given none (in-process drivers)

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
                "dropped": c.dropped, "model": model_digest(self.cache.meta),
                **(self.prompt_facts() if self.prompts is not None else {})}

    def prompt_facts(self) -> dict:
        """Prompt learning: the parameters this site trains and the context's shape (the server has no model)."""
        from ..federated.promptsteps import prompt_sizes

        trainable, shape = prompt_sizes(self.prompts)
        return {"trainable": trainable, "ctx_shape": list(shape)}

    def initial(self) -> dict:
        """The starting parameters of this site's lane as ``federate`` seeds them (prompt learning: the context of
        the experiment's seed, or ``--ctx-init``'s token embeddings, from this site's text tower)."""
        if self.prompts is None:
            raise ConfigError(f"--algo {self.cfg.algo}: the server seeds the adapter; a site has no initial one")
        from ..federated.promptsteps import prompt_init

        return prompt_init(self.prompts, self.exp.seed)

    def class_stats(self) -> dict:
        """Per-class sums of this site's normalised training features and class counts (``--head prototype``)."""
        sums, counts = class_sums(self.X, self.Y, self.client.train, len(self.cache.classes))
        return {"sums": sums, "counts": counts}

    def _head(self, head: Optional[torch.Tensor]) -> torch.Tensor:
        if self.text is not None:
            return self.text
        if head is None:
            raise ConfigError("--head prototype: the server sent no class prototypes")
        return head

    def fit(self, params: dict, rnd: int, head: Optional[torch.Tensor] = None) -> LocalUpdate:
        """This site's local update of round ``rnd`` from ``params`` (unstacked), and its training-set size."""
        sched = batch_schedule(self.client.train, self.exp.seed, rnd, lane_key(self.exp.name, self.client.name),
                               self.hp, self.views, len(self.Y))
        start = {n: v.unsqueeze(0) for n, v in params.items()}
        with flush_denormals(not self.cfg.keep_denormals):  # as run_loop
            if self.prompts is not None:  # the loop's prompt round (promptsteps.prompt_round), on this lane
                from ..federated.promptsteps import prompt_round

                new = prompt_round(self.prompts, self.cfg, start, [sched], self.Xtrain, self.Ytrain, rnd,
                                   self.logit_scale)
            else:
                new = local_update(self.kind, start, self.Xtrain, self.Ytrain, self._head(head).unsqueeze(0),
                                   [sched], self.hp, self.opts)
        return LocalUpdate({k: v[0] for k, v in new.items()}, len(self.client.train))

    def _scored(self, params: dict, head) -> tuple[torch.Tensor, dict]:
        """The class embeddings and the (stacked) parameters a split is scored with: the adapter against the head,
        or (prompt learning) no adapter against the class embeddings of the context, as the loop's ``_score``."""
        if self.prompts is None:
            return self._head(head).unsqueeze(0), {n: v.unsqueeze(0) for n, v in params.items()}
        from ..federated.promptsteps import prompt_heads

        with flush_denormals(not self.cfg.keep_denormals):  # as run_loop
            return prompt_heads(self.prompts, {n: v.unsqueeze(0) for n, v in params.items()}), {}

    def _score(self, params: dict, rows: np.ndarray, head) -> tuple[float, float]:
        """Accuracy and mean loss on ``rows``: one segment of the loop's own :class:`~..federated.loop.EvalPlan`,
        so a site scores its split exactly as ``federate`` scores that client's (NaN for an empty split)."""
        if not len(rows):
            return float("nan"), float("nan")
        heads, stacked = self._scored(params, head)
        plan = EvalPlan([[(0, rows)]], 1, self.X, heads, torch.device("cpu"))
        acc, loss = plan.score(self.kind, stacked, self.Y, self.logit_scale, self.opts)
        return float(acc[0]), float(loss[0])

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
        start = {n: v.unsqueeze(0) for n, v in params.items()}
        with flush_denormals(not self.cfg.keep_denormals):  # as run_loop
            if self.prompts is not None:  # the loop's prompt fine-tuning (promptsteps.prompt_finetune)
                from ..federated.promptsteps import prompt_finetune

                tuned = prompt_finetune(self.prompts, self.cfg, start,
                                        finetune_schedules(lanes, self.cfg.finetune_steps, self.hp), self.X, self.Y,
                                        self.logit_scale)
            else:
                tuned = finetune_adapters(self.kind, start, self.X, self.Y, self._head(head).unsqueeze(0), lanes,
                                          self.cfg.finetune_steps, self.hp, self.opts)
            return self._score({k: v[0] for k, v in tuned.items()}, self.client.test, head)[0]

    def setup_reply(self) -> Payload:
        """The set-up reply: the facts and, from a training site, what the server starts from -- its class sums
        (``--head prototype``) or, for prompt learning, its initial context (every site derives the same one; the
        server checks they agree). A personal algorithm's site sends no tensor: its context never leaves it."""
        if self.heldout_site:
            return Payload(self.facts(), {})
        if self.prompts is not None:
            return Payload(self.facts(), self.global_part(self.initial()))
        return Payload(self.facts(), self.class_stats() if self.cfg.head == "prototype" else {})

    def global_part(self, params: dict) -> dict:
        """The part of this site's parameters the server holds, and so the part that travels: the algorithm's own
        rule (its ``init_state``'s server state): all of it (promptfl), nothing when it communicates nothing
        (promptlocal), the global prompt of a method that keeps a personal part at each client."""
        if not self.algo.communicates:
            return {}
        server = self.algo.init_state({n: v.unsqueeze(0) for n, v in params.items()}, {}).server
        return {n: v[0] for n, v in server.items()}

    def handle(self, rec: dict, params: dict, state: Optional[dict] = None) -> Payload:
        """One message (config record, unpacked tensors) -> the reply's config record and tensors to pack.
        ``state``: the site's own parameters between messages (a personal algorithm's; updated in place), kept by
        the caller (the ClientApp: Flower's ``context.state``); None: this object keeps them."""
        if rec.get("phase") == "setup":
            return self.setup_reply()
        head = params.pop(HEAD, None)
        shared = list(params)  # what the server sent, and so what a trained reply sends back
        if self.algo.personal:  # its own model, kept here (the seeded start before round 1); the global part the
            state = self.own if state is None else state  # message carries, if any, replaces the site's copy
            if not state:
                state.update(self.initial())
            state.update(params)
            params = dict(state)
        out: dict = {"client": self.name, "heldout": self.heldout_site}
        if rec.get("phase") == "finetune":  # the held-out site never trains: it answers with nothing to record
            if not self.heldout_site:
                out.update(finetuned=True, test_finetuned=self.finetune(params, head))
            return Payload(out, {})
        if rec.get("evaluate"):
            out.update(self.evaluate(params, head), evaluated=True)
        if self.name in list(rec.get("train", [])) and not self.heldout_site:
            new, out["weight"] = self.fit(params, int(rec["round"]), head)
            out["trained"] = True
            if self.algo.personal:  # kept here; the reply carries only the global part (promptlocal: nothing)
                state.update(new)
                return Payload(out, {n: new[n] for n in shared})
            return Payload(out, new)
        return Payload(out, {})


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
            cache, cfg = federate_config(context.run_config)
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


STATE = "fc.site"  # the site's own parameters between messages (personal algorithms), in Flower's context.state


def load_state(context: Context) -> dict:
    """The site's own parameters kept in ``context.state`` (Flower persists it per node and run: across messages,
    and across the Ray actors of a simulation); {} before the first."""
    if STATE not in context.state:
        return {}
    rec = dict(context.state[STATE])
    return unpack(np.frombuffer(rec["packed"], np.float32), rec["layout"])


def save_state(context: Context, state: dict) -> None:
    if state:
        flat, layout = pack(state)
        context.state[STATE] = ConfigRecord({"packed": flat.tobytes(), "layout": layout})


@client_app.query("setup")
@client_app.train("round")
@client_app.train("finetune")
def _answer(message: Message, context: Context) -> Message:
    """Every message type: its one config record is the site's to handle (``SiteClient.handle`` reads the phase)."""
    rec, params = read(message.content)
    state = load_state(context)
    out, arrays = site_client(context).handle(rec, params, state)
    save_state(context, state)
    return Message(content(out, arrays), reply_to=message)

