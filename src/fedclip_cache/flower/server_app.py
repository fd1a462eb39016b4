"""The ServerApp of a deployment (flwr 1.42 Message API: ``@server_app.main()`` drives the grid itself).

:class:`Coordinator` is the whole server logic as pure steps, free of Flower (tests drive it with in-process
sites): what each round's message carries, and what the replies turn into -- the in-process loop's sampling rule
(``loop.sample_lanes``: max(int(n * fraction_fit), min_fit_clients) training sites per round, seeded, over the
sites in the loop's lane order), its FedAvg (``train.aggregate`` with ``train.client_weights``: uniform or by
training-set size) followed by the algorithm's ``server_update``, and the run folder (:class:`RunRecorder`).
:func:`main` moves the messages (the protocol: :mod:`fedclip_cache.flower.client_app`; the progress lines
``deploy`` follows: :mod:`fedclip_cache.flower.logproto`). With ``--finetune-steps`` the Coordinator keeps
the global adapter of the round selected so far (``RunRecorder.selected``: the run folder's own selection) and,
after the final evaluation, one more message sends it to the sites to fine-tune (``train.finetune``).

Fault tolerance: a round waits at most ``round_timeout`` seconds for replies; fewer than ``min_results`` trained
adapters leave the global model (and the server optimiser's state) as it was; a lost training site is averaged
out (uniform: each remaining site 1/k; samples: weights renormalised over the sites that answered). Per round the
run folder records the sampled sites that returned no adapter (``fit_failures``) and the known sites that sent no
evaluation (``evaluate_failures``). A node that misses a deadline is not waited for again (it is dropped until it
answers a message late); a site that restarts registers as a new node, is sent the next round's message and is
sampled again by its name.
"""
from __future__ import annotations

import os
import threading
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..federated.adapters import adapter_width, get_adapter, init_params
from ..federated.algorithms import make_algorithm
from ..federated.config import ConfigError, FederateConfig
from ..federated.loop import evaluated_rounds, prototype_head, sample_lanes
from ..federated.protocols import Experiment, federation_name
from ..federated.recorder import RunRecorder, client_key, lane_order
from ..federated.tracking import check_available, start_tracking, track_run
from ..federated.train import aggregate, client_weights
from . import logproto
from .polls import PollPlan
from .task import (DEFAULT_MIN_RESULTS, DEFAULT_POLL_INTERVAL, DEFAULT_ROUND_TIMEOUT, DEFAULT_STARTUP_TIMEOUT,
                   check_deployment_keys, federate_config)
from .flwr_internals import quick_object_pulls
from .wire import HEAD, LocalUpdate, Payload, content, read, tensor_bytes

from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp


class Coordinator:
    """The server's state and rules, message by message (no transport)."""

    def __init__(self, cfg: FederateConfig, recorder: Optional[RunRecorder] = None,
                 min_results: int = DEFAULT_MIN_RESULTS):
        if recorder is None and cfg.finetune_steps:  # the selection (which adapter to fine-tune) reads the reports
            recorder = RunRecorder(cfg, None)
        self.cfg, self.recorder, self.min_results = cfg, recorder, min_results
        self.selected: dict = {}  # --finetune-steps: the global adapter of the selected round so far (stacked)
        self.algo = make_algorithm(cfg)
        self.exp_name = federation_name(cfg)  # it seeds the sampling, as the loop's experiment
        self.sites: dict[str, dict] = {}  # name -> facts (every site that ever answered)
        self.current: dict = {}  # the global adapter, stacked (1, ...) as the loop's server state
        self.extra: dict = {}  # the server optimiser's state
        self.head: Optional[torch.Tensor] = None  # --head prototype
        self.recorded = evaluated_rounds(cfg.rounds, cfg.eval_every)
        self.sent_bytes = 0  # tensor bytes of the last round message (each node receives them)
        self.trainable = 0  # parameters a site trains, as the sites report it (prompt learning)
        self.ctx_shape: Optional[tuple] = None  # the context's shape, as the sites report it (prompt learning)

    # ---- set-up

    def setup(self, replies: list[Payload]) -> None:
        """The sites' facts (and class sums); the seeded initial adapter, as ``federate``'s."""
        if not replies:
            raise RuntimeError("no site answered the set-up message")
        for rec, _ in replies:
            self.learn(rec)
        dim = {int(r["dim"]) for r, _ in replies}
        if len(dim) != 1:
            raise ConfigError(f"the sites' caches disagree on the feature dimension ({sorted(dim)}): extract every "
                              f"site with the same model")
        models = {str(r["model"]) for r, _ in replies if "model" in r}
        if len(models) > 1:
            raise ConfigError("the sites' caches were extracted with different models (their cache.json "
                              "fingerprints differ): extract every site with the same model")
        d = dim.pop()
        if self.algo.prompts:  # the context vectors: no adapter, no class prototypes
            self.setup_prompts(replies)
            return
        kind = get_adapter(self.cfg.adapter)
        p = init_params(self.cfg.adapter, d, adapter_width(kind, self.cfg.hidden, d), self.cfg.seed)
        self.current = {n: v.unsqueeze(0) for n, v in p.items()}
        if self.cfg.head == "prototype":  # loop.build_heads: the sites' sums/counts added in the experiment's
            stats = {str(r["client"]): a for r, a in replies if a}  # client order (float32 sums: order matters)
            if not stats:
                raise RuntimeError("--head prototype: no training site sent class statistics")
            order = sorted(stats, key=self.client_order)
            s = sum(stats[c]["sums"] for c in order)
            n = sum(stats[c]["counts"] for c in order)
            self.head = prototype_head(s, n)

    def setup_prompts(self, replies: list[Payload]) -> None:
        """Prompt learning: the global context starts as the training sites' initial context (each site derives it
        from its own text tower and the seed, or ``--ctx-init``'s words, as ``federate`` seeds it; the server holds
        no model) -- the same on every site, or a one-line error; a personal algorithm has no global context."""
        self.trainable = max((int(r.get("trainable", 0)) for r, _ in replies), default=0)
        self.ctx_shape = next((tuple(int(x) for x in r["ctx_shape"]) for r, _ in replies if "ctx_shape" in r), None)
        if not self.algo.communicates:  # each site keeps its own context: the server holds none
            return
        inits = sorted(((str(r["client"]), a) for r, a in replies if a), key=lambda x: self.client_order(x[0]))
        if not inits:
            raise RuntimeError(f"--algo {self.cfg.algo}: no training site sent its initial context")
        first_site, first = inits[0]
        for site, a in inits[1:]:
            if set(a) != set(first) or not all(torch.equal(a[n], first[n]) for n in first):
                raise ConfigError(f"--algo {self.cfg.algo}: sites {first_site} and {site} start from different "
                                  f"context vectors (their text towers differ): give every site the same model "
                                  f"and the same prompt options")
        self.current = {n: v.unsqueeze(0) for n, v in first.items()}

    def learn(self, rec: dict) -> None:
        if "dim" in rec:  # a full report (setup, evaluation): a site's facts
            self.sites[str(rec["client"])] = {k: rec[k] for k in ("heldout", "train_n", "dim", "order") if k in rec}

    def client_order(self, name: str) -> tuple:
        """Sort key of a site in the order of the experiment's clients: a shared cache's partition index, which the
        site reports; sites with their own caches: by name, as the domains of one cache are ordered."""
        return client_key(name, self.sites[name])

    def training_sites(self) -> list[str]:
        """Training sites in the loop's lane order: the order of the experiment's clients (:meth:`client_order`),
        then largest training split first (a stable sort, as ``loop.client_lanes``)."""
        return lane_order([n for n, f in self.sites.items() if not f.get("heldout")], self.sites)

    def sampled(self, rnd: int) -> list[str]:
        order = self.training_sites()
        exp = Experiment(self.exp_name, self.cfg.seed, [])
        return [order[i] for i in sample_lanes([np.arange(len(order))], [exp], self.cfg, rnd)]

    # ---- rounds

    def message(self, rnd: int) -> Payload:
        """Message ``rnd`` (1..R+1): its config record and tensors (the global adapter after round rnd-1)."""
        rec: dict = {"phase": "round", "round": rnd, "evaluate": (rnd - 1) in self.recorded}
        if rnd <= self.cfg.rounds:
            self.sample = self.sampled(rnd)
            if self.sample:
                rec["train"] = list(self.sample)
        else:
            self.sample = []
        params = {n: v[0] for n, v in self.current.items()}  # {} for a personal algorithm: nothing travels
        if self.head is not None:
            params[HEAD] = self.head
        self.sent_bytes = tensor_bytes(params)
        return Payload(rec, params)

    def receive(self, rnd: int, replies: list[Payload]) -> None:
        """The replies to message ``rnd``: round rnd-1's evaluation, round rnd's aggregation."""
        for rec, _ in replies:
            self.learn(rec)
        if (rnd - 1) in self.recorded and self.recorder:
            evals = [rec for rec, _ in replies if rec.get("evaluated")]
            seen = {str(r["client"]) for r in evals}
            self.recorder.evaluate_round(rnd - 1, evals, len(set(self.sites) - seen))
            if self.finetunes and self.recorder.selected():  # the adapter these evaluations scored
                self.selected = {n: v.clone() for n, v in self.current.items()}
        if rnd > self.cfg.rounds:
            return
        trained, seen = {}, set()
        for rec, params in replies:
            name = str(rec["client"])
            if rec.get("trained") and name in self.sample and name not in seen:  # one adapter per site
                seen.add(name)
                trained[name] = LocalUpdate(params, float(rec["weight"]))
        order = [n for n in self.sample if n in trained]  # the sample is in lane order
        if self.recorder:  # with the tensor bytes that crossed the wire: what each node received, what came back
            self.recorder.fit_round(rnd, len(order), len(self.sample) - len(order), sampled=len(self.sample),
                                    wire={"tensor_bytes_down": self.sent_bytes,
                                          "tensor_bytes_up": sum(tensor_bytes(p) for _, p in replies)})
        if not self.current:  # nothing global (promptlocal: each site trained its own context and kept it)
            return
        if len(order) < self.min_results or not order:  # too few answers: the global model stays as it was
            log(WARNING, "round %s: %s trained adapter(s), fewer than min_results=%s; the global adapter is "
                "unchanged", rnd, len(order), self.min_results)
            return
        stacked = {n: torch.stack([trained[s].params[n] for s in order]) for n in self.current}
        # FedAvg as the in-process loop: uniform, or by the training-set size a site reports
        w = client_weights(np.array([trained[s].weight for s in order]), self.cfg.weighting)
        averaged = aggregate(stacked, [np.arange(len(order))], [w])
        self.current, self.extra = self.algo.server_update(self.current, averaged, self.extra, rnd)

    # ---- --finetune-steps (after the final evaluation)

    @property
    def finetunes(self) -> bool:
        """Whether the fine-tune message follows the rounds (``--finetune-steps``; a personal algorithm keeps a
        model per client already: ignored, as ``federate`` says in a note)."""
        return bool(self.cfg.finetune_steps) and not self.algo.personal

    def finetune_message(self) -> Payload:
        """The fine-tune message: the selected round's global adapter (as ``federate``'s ``best_server``)."""
        rec = {"phase": "finetune", "steps": self.cfg.finetune_steps}
        params = {n: v[0] for n, v in (self.selected or self.current).items()}
        if self.head is not None:
            params[HEAD] = self.head
        return Payload(rec, params)

    def receive_finetune(self, replies: list[Payload]) -> None:
        """Each training site's test accuracy after fine-tuning, in the loop's lane order; a training site that
        did not answer is recorded as a failure (no number, never imputed)."""
        acc = {}
        for rec, _ in replies:
            self.learn(rec)
            name = str(rec["client"])
            if rec.get("finetuned") and not rec.get("heldout") and name not in acc:
                acc[name] = float(rec["test_finetuned"])
        order = self.training_sites()
        missing = [n for n in order if n not in acc]
        if missing:
            log(WARNING, "--finetune-steps: no answer from %s", ", ".join(missing))
        if len(acc) < self.min_results:
            log(WARNING, "--finetune-steps: %s site(s) answered, fewer than min_results=%s", len(acc),
                self.min_results)
        tuned = {n: acc[n] for n in order + sorted(set(acc) - set(order)) if n in acc and not np.isnan(acc[n])}
        if self.recorder:
            self.recorder.finetune_round(tuned, missing)

    def finish(self) -> dict:
        params = {n: v.clone() for n, v in self.current.items()}  # a personal algorithm's stay at the sites: {}
        # what a client trains (prompt learning: as the sites report it; a personal part never reaches the server)
        trainable = self.trainable if self.algo.prompts else sum(v[0].numel() for v in params.values())
        if not self.recorder:
            return {}
        communicated = sum(v[0].numel() for v in params.values()) if self.algo.prompts else None
        return self.recorder.write(params, trainable, ctx_shape=None if params else self.ctx_shape,
                                   communicated=communicated)


# ------------------------------------------------------------------------------------------------ transport

class NodeError(NamedTuple):
    """An error reply: the node it came from and the SuperLink's reason."""

    node: int
    reason: str


class Exchange:
    """Sends a message to nodes and collects the replies, polling as :class:`~fedclip_cache.flower.polls.PollPlan`
    says (one plan per message type: fast around the time the last reply came in recent rounds, backing off to
    ``cap`` seconds otherwise); remembers nodes that missed a deadline."""

    def __init__(self, grid: Grid, cap: float):
        self.grid, self.cap = grid, cap
        self.lost: dict[str, int] = {}  # message id of a node's unanswered message -> node id
        self.errors: list[NodeError] = []  # every error reply
        self.plans: dict[str, PollPlan] = {}

    def live_nodes(self) -> list[int]:
        return sorted(set(self.grid.get_node_ids()) - set(self.lost.values()))

    def __call__(self, nodes: list[int], message_type: str, rec: dict, params: dict, group: str,
                 timeout: float) -> list[Payload]:
        body = content(rec, params)
        # flwr 1.42's Grid.create_message, which it deprecates for the constructor (the grid sets run and source)
        msgs = [Message(body, dst_node_id=nid, message_type=message_type, group_id=group) for nid in nodes]
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: nid for mid, nid in zip(ids, nodes) if mid}
        replies: list[Payload] = []
        end = time.monotonic() + timeout
        plan = self.plans.setdefault(message_type, PollPlan(self.cap))
        plan.start()
        while True:
            ask = set(pending) | set(self.lost)
            for m in self.grid.pull_messages(ask):
                mid = m.metadata.reply_to_message_id
                if mid in self.lost:  # a node that missed a deadline answered after all: send to it again
                    if not m.has_error():  # (an error reply: the SuperLink gave up on it; it stays excluded)
                        log(INFO, "node %s answered late; it is sent messages again", self.lost.pop(mid))
                    continue
                node = pending.pop(mid, None)
                if node is None:
                    continue
                if m.has_error():
                    log(WARNING, "node %s: %s", node, m.error.reason)
                    self.errors.append(NodeError(node, m.error.reason))
                    continue
                replies.append(read(m.content))
            left = end - time.monotonic()
            if not pending:
                plan.arrived()
                break
            if left <= 0:
                break
            time.sleep(min(plan.pause(), left))
        for mid, nid in pending.items():
            log(WARNING, "node %s did not answer %s within %.3g s: not waited for again", nid, group, timeout)
            self.lost[mid] = nid
        return replies


def wait_for_nodes(grid: Grid, n: int, timeout: float, interval: float) -> list[int]:
    deadline = time.monotonic() + timeout
    backoff = PollPlan(interval)  # no wait started: its back-off alone (0.01 s, 1.5x, up to interval)
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            log(WARNING, "only %s of %s nodes connected within %ss; starting without the others", len(nodes), n,
                timeout)
            return nodes
        time.sleep(backoff.pause())


def _import_plots() -> None:
    try:
        from ..plots import pyplot

        pyplot()
    except Exception:  # noqa: BLE001  (the run folder's own import reports it)
        pass


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.monotonic()
    rc = context.run_config
    _, cfg = federate_config(rc)
    check_deployment_keys(rc)
    check_available(cfg.log)  # --log: the trackers' packages, before any round
    tracker = start_tracking(Path(str(rc["out"])), cfg.log, cfg.mlflow_uri) if rc.get("out") else None  # warm
    n_sites = int(rc.get("sites", 0))
    min_results = int(rc.get("min_results", DEFAULT_MIN_RESULTS))
    interval = float(rc.get("poll_interval", DEFAULT_POLL_INTERVAL))
    import flwr.superlink.grid.http_grid as http_grid  # this process runs this ServerApp only

    quick_object_pulls(http_grid, min(interval, 0.05))
    out = rc.get("out")
    co = Coordinator(cfg, RunRecorder(cfg, Path(str(out))) if out else None, min_results)
    timeout = float(rc.get("round_timeout", DEFAULT_ROUND_TIMEOUT))
    ex = Exchange(grid, interval)
    log(INFO, logproto.start(n_sites))
    startup = float(rc.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT))
    nodes = wait_for_nodes(grid, n_sites, startup, interval)
    log(INFO, logproto.nodes(len(nodes), time.monotonic() - t0))
    # the set-up message: each site opens its cache first (minutes for a big one), so it gets the start-up timeout
    # when that is longer than a round's
    replies = ex(nodes, "query.setup", {"phase": "setup"}, {}, "setup", max(timeout, startup))
    if ex.errors:  # a site that cannot even start (a bad cache, an option its cache cannot honour): stop here
        raise RuntimeError(f"node {ex.errors[0].node} failed the set-up message: {ex.errors[0].reason}")
    co.setup(replies)
    log(INFO, logproto.setup(list(co.sites)))
    if out:  # the run folder's plots need matplotlib (~0.6 s to import): imported while the rounds wait for replies
        threading.Thread(target=_import_plots, name="import-plots", daemon=True).start()
    pause = float(os.environ.get("FEDCLIP_FLOWER_ROUND_DELAY", 0))  # test hook (DEVELOPERS.md): slower rounds
    for rnd in range(1, cfg.rounds + 2):
        time.sleep(pause)
        t = time.perf_counter()
        rec, params = co.message(rnd)
        replies = ex(ex.live_nodes(), "train.round", rec, params, str(rnd), timeout)
        t2 = time.perf_counter()
        co.receive(rnd, replies)
        log(INFO, logproto.round_done(rnd, cfg.rounds, len(replies), t2 - t, time.perf_counter() - t2))
    if co.finetunes:  # one more message: each training site fine-tunes the selected adapter
        t = time.perf_counter()
        rec, params = co.finetune_message()
        replies = ex(ex.live_nodes(), "train.finetune", rec, params, "finetune", timeout)
        co.receive_finetune(replies)
        log(INFO, logproto.finetune_done(len(replies), time.perf_counter() - t))
    co.finish()
    if out:  # plots/, as `federate` draws them (matplotlib was imported during the rounds)
        from ..plots import run_plots

        run_plots(Path(str(out)))
        if cfg.log:  # the complete run folder to the trackers (a failing one is warned about, never raised)
            track_run(Path(str(out)), cfg.log, cfg.mlflow_uri, tracker)
