"""The in-process federated loop: every experiment (held-out domain x seed) and every client trains together.

A *lane* is one client's copy of the adapter; the lanes of every experiment are stacked on a leading axis so that
one batched matmul trains them all. Per round: the sampled lanes run their local update (vectorised), and the
algorithm (``algorithms/``) turns the result into the new state -- FedAvg, a server optimiser, SCAFFOLD, or
nothing for local training. Then validation is scored, and test/held-out only when it is needed (see
:class:`Evaluator`). Selection (official): the round with the best mean validation accuracy over training clients;
the held-out domain never takes part in training or selection.

Reading order: ``run_loop`` -> ``build_heads`` -> ``build_lanes`` -> ``Evaluator`` -> ``LaneRound`` (what an
algorithm sees of a round) -> ``finetune``.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..cache.reader import FeatureCache
from .adapters import (ADAPTERS, AdapterKind, Params, adapter_options, adapter_width, get_adapter, init_params,
                       num_params)
from .algorithms import Algorithm, TrainState, make_algorithm
from .config import ConfigError, FederateConfig, option_flag
from .fpenv import flush_denormals
from .precision import check_precision
from .protocols import ClassSplit, Experiment, class_split
from .train import (LocalHyper, Rows, aggregate, batch_schedule, client_weights, evaluate, host_tensor, lane_key,
                    local_update)

NOVEL = "_novel"  # --base-to-novel: the split name of a test or held-out segment's novel-class rows ("test_novel")
EVAL_CHUNK = 1024  # rows per evaluation matmul: small enough to stay in cache (measured: -15 % vs one piece)
# Evaluation rows are gathered once and kept across rounds only up to this size: gathering them again each round
# costs one pass over them, which matters when rounds are short (PACS: ~40 MB, -15 % of the run) and is noise when
# they are long (DomainNet, one held-out domain: 565 MB re-gathered in ~0.3 s against ~20 s of training).
EVAL_GATHER_MAX_BYTES = 256 << 20
FALLBACK_LOGIT_SCALE = 100.0  # the official FedCLIP constant (= OpenAI CLIP's learned scale)
PROTOTYPE_CHUNK = 65_536  # rows normalised at a time for class sums (no normalised copy of the whole matrix)


@dataclass
class Lane:
    exp: int
    client: int  # index in the experiment's clients, -1 for central's pooled lane
    train: np.ndarray
    seed: int
    key: int


@dataclass
class LoopResult:
    experiments: list[Experiment]
    segments: list[dict]  # experiment, client, split, n
    rounds: list[int]
    acc: np.ndarray  # (R, S); NaN where a segment was not scored that round (lazy evaluation)
    loss: np.ndarray  # (R, S)
    trainable_params: int
    seconds: float
    final_params: dict = field(default_factory=dict)
    logit_scale: float = 100.0  # the value used for training and evaluation
    logit_scale_source: str = ""
    val_mean: Optional[np.ndarray] = None  # (R, E) mean validation accuracy per experiment (the selection curve)
    finetuned: Optional[dict] = None  # experiment -> client -> test accuracy after --finetune-steps
    fit_clients: list[int] = field(default_factory=list)  # clients that trained per round, summed over experiments
    notes: list[str] = field(default_factory=list)
    train_views: int = 1  # --train-views resolved against the cache
    communicated_params: Optional[int] = None  # parameters a client sends per round when not all it trains (fedpgp)
    classes: Optional[ClassSplit] = None  # --base-to-novel: the base and novel classes


def _normalise(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def text_head(cache: FeatureCache, template: str) -> torch.Tensor:
    T = torch.from_numpy(cache.text_embeddings)
    if template == "mean":  # prompt ensemble: mean of normalised prompts, renormalised (CLIP's recipe)
        return _normalise(_normalise(T).mean(0))
    try:
        i = int(template)
        return _normalise(T[i])
    except (ValueError, IndexError):
        raise ConfigError(f"--template {template!r}: give an index below {T.shape[0]} or 'mean' "
                          f"(templates in this cache: {cache.templates})") from None


def resolve_logit_scale(cfg: FederateConfig, cache: FeatureCache) -> tuple[float, str]:
    """The logit scale to train and evaluate with, and where it came from: ``--logit-scale`` when given, else the
    model's own ``logit_scale.exp()`` recorded in the cache, else 100 (the official constant) with a note."""
    if cfg.logit_scale is not None:
        return float(cfg.logit_scale), "--logit-scale"
    raw = cache.meta.get("model", {}).get("logit_scale")
    if raw is None:
        return FALLBACK_LOGIT_SCALE, (f"fallback {FALLBACK_LOGIT_SCALE:g}: the cache records no model logit_scale "
                                      f"(pass --logit-scale to choose)")
    try:
        val = float(raw)
    except (TypeError, ValueError):
        val = float("nan")
    if not (np.isfinite(val) and val > 0):
        raise ConfigError(f"{cache.path}: cache.json records model.logit_scale = {raw!r}, not a finite number > 0; "
                          f"pass --logit-scale to choose one")
    return val, "cache (model.logit_scale)"


def resolve_train_views(cfg: FederateConfig, cache: FeatureCache) -> int:
    """``--train-views`` as a number of views, checked against the views the cache holds."""
    from .config import option_flag

    have = cache.num_views
    if cfg.train_views == "all":
        return have
    k = int(cfg.train_views)
    if k > have:
        raise ConfigError(f"{option_flag('train_views')} {k}: the cache {cache.path} holds {have} view(s) per image; "
                          f"use --train-views {have} or all, or re-extract with --views {k}")
    return k


def class_sums(X: Rows, Y: torch.Tensor, rows: np.ndarray, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the L2-normalised features of ``rows`` per class, and class counts: a client's share of the
    prototype head (``build_heads`` here, a Flower site's set-up reply there; :func:`prototype_head` sums them)."""
    sums = torch.zeros(c, X.shape[1], device=Y.device)
    for s in range(0, len(rows), PROTOTYPE_CHUNK):
        r = torch.from_numpy(rows[s:s + PROTOTYPE_CHUNK])
        sums.index_add_(0, Y[r.to(Y.device)], _normalise(X[r]))
    r = torch.from_numpy(rows).to(Y.device)
    return sums, torch.bincount(Y[r], minlength=c).float()


def prototype_head(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Class prototypes from summed normalised features and class counts (a class nobody holds stays zero): the
    rule ``build_heads`` and the Flower server share."""
    return _normalise(sums / counts.clamp(min=1).unsqueeze(1))


# ------------------------------------------------------------------------------------------------ set-up

@dataclass
class LaneSetup:
    """What every lane of a run trains and is scored with: the rows, the adapter kind and size, the logit scale and
    the local hyper-parameters. ``federate``'s loop and a Flower site both build it with :func:`lane_setup`, so a
    site trains exactly as its lane of the in-process loop."""

    X: Rows  # view 0 of every row: evaluation (and fine-tuning) gathers here
    Y: torch.Tensor
    Xtrain: Rows  # what the rounds gather from: X, or the first k views view-major (--train-views k)
    Ytrain: torch.Tensor
    train_views: int
    dim: int
    kind_name: str  # "none" when nothing trains an adapter (zeroshot, prompt learning)
    kind: AdapterKind
    hidden: int
    logit_scale: float
    logit_scale_source: str
    hp: LocalHyper
    opts: dict  # the options the adapter's forward reads (adapters.adapter_options)


def lane_setup(cache: FeatureCache, cfg: FederateConfig, algo: Algorithm, device: torch.device,
               resident: Optional[bool] = None, trains: bool = True) -> LaneSetup:
    """The :class:`LaneSetup` of a run on ``cache``. ``resident`` as :class:`~.train.Rows` (None: copied to the
    device when they fit); ``trains=False`` (a Flower site that only evaluates) reads no extra views.
    ``--precision bf16`` is refused here, in one line, where the device has no bf16 matmul."""
    if trains:
        check_precision(cfg.precision, device, option_flag("precision"))
    k = resolve_train_views(cfg, cache)
    # training gathers from every view (view-major rows), evaluation from view 0 only; the views first, as before
    # the features: on a GPU whichever is made first is the first to be copied when it fits
    if k > 1 and trains:
        views = cache.views(k)
        Xtrain = Rows(host_tensor(views.reshape(k * views.shape[1], -1)), device, resident=resident)
    X = Rows(host_tensor(cache.features), device, resident=resident)
    # --base-to-novel: each label as an index among its own group's classes (the heads are base or novel only)
    Y = torch.from_numpy(class_split(len(cache.classes)).local_labels(cache.labels) if cfg.base_to_novel
                         else cache.labels).to(device)
    Xtrain, Ytrain = (Xtrain, Y.repeat(k)) if k > 1 and trains else (X, Y)
    # prompt learning uses no adapter: image features go straight to normalise + logits
    kind_name = "none" if not algo.trains or algo.prompts else cfg.adapter
    kind = get_adapter(kind_name) if kind_name != "none" else ADAPTERS["none"]
    d = X.shape[1]
    logit_scale, source = resolve_logit_scale(cfg, cache)
    return LaneSetup(X, Y, Xtrain, Ytrain, k, d, kind_name, kind, adapter_width(kind, cfg.hidden, d), logit_scale,
                     source, LocalHyper.from_config(cfg, algo.proximal_mu(), logit_scale), adapter_options(cfg))


def build_heads(cache: FeatureCache, cfg: FederateConfig, X: Rows, Y: torch.Tensor, experiments: list[Experiment],
                device: torch.device) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The class embeddings logits are taken against: per experiment (global model) and per client (local
    training). Text prompts from the cache, or class prototypes aggregated from per-client sums and counts (no
    feature leaves a client)."""
    d, c = X.shape[1], len(cache.classes)
    if cfg.head == "text":
        T = text_head(cache, cfg.template).to(device)
        if T.shape[-1] != d:
            raise ConfigError(f"{cache.path}: text embeddings have D={T.shape[-1]} but image features D={d}")
        return [T for _ in experiments], [[T for _ in e.clients] for e in experiments]
    exp_head, client_head = [], []
    for e in experiments:
        parts = [class_sums(X, Y, cl.train, c) for cl in e.clients]
        s = sum(p[0] for p in parts)
        n = sum(p[1] for p in parts)
        exp_head.append(prototype_head(s, n))
        client_head.append([prototype_head(*p) for p in parts])
    return exp_head, client_head


def build_lanes(algo: Algorithm, experiments: list[Experiment]) -> list[Lane]:
    """One lane per client (or one pooled lane per experiment for centralised training), largest first: the
    lanes still busy at local step t are then always a prefix, so the vectorised update works on views."""
    if not algo.trains:
        return []
    if not algo.pooled:
        return client_lanes(experiments)
    lanes = [Lane(ei, -1, np.sort(np.concatenate([cl.train for cl in e.clients])), e.seed, lane_key(e.name, "central"))
             for ei, e in enumerate(experiments)]
    lanes.sort(key=lambda ln: -len(ln.train))
    return lanes


def client_lanes(experiments: list[Experiment]) -> list[Lane]:
    """One lane per training client of every experiment (never a held-out domain), with its seed and key, largest
    train split first: the rounds' lanes, and the lanes that fine-tune (``--finetune-steps``)."""
    lanes = [Lane(ei, ci, cl.train, e.seed, lane_key(e.name, cl.name))
             for ei, e in enumerate(experiments) for ci, cl in enumerate(e.clients)]
    lanes.sort(key=lambda ln: -len(ln.train))
    return lanes


# ------------------------------------------------------------------------------------------------ evaluation

class EvalPlan:
    """Rows of several evaluation groups (each scored with its own parameters and head), padded into one (G, M)
    index matrix and scored in one batched pass. ``segment_rows[g]`` lists (segment id, row indices)."""

    def __init__(self, segment_rows: list[list[tuple[int, np.ndarray]]], n_segments: int, X: Rows,
                 heads: torch.Tensor, device: torch.device):
        self.n_segments, self.X, self.heads = n_segments, X, heads
        self.segments = sorted({s for g in segment_rows for s, _ in g})
        m = max((sum(len(r) for _, r in g) for g in segment_rows), default=0)
        self.empty = m == 0
        rows = torch.full((len(segment_rows), m), -1, dtype=torch.long)
        seg = torch.full((len(segment_rows), m), n_segments, dtype=torch.long)  # padding -> a dummy segment
        for g, parts in enumerate(segment_rows):
            if parts:
                r = np.concatenate([p for _, p in parts])
                s = np.concatenate([np.full(len(p), i) for i, p in parts])
                rows[g, :len(r)] = torch.from_numpy(r)
                seg[g, :len(s)] = torch.from_numpy(s)
        self.rows, self.seg = rows.to(device), seg.to(device).flatten()
        # Evaluation inputs never change: gather them once when that is small (see EVAL_GATHER_MAX_BYTES);
        # otherwise each round gathers chunk by chunk, holding one chunk at a time.
        small = self.rows.numel() * X.shape[1] * X.dtype.itemsize <= EVAL_GATHER_MAX_BYTES
        self.gathered = [X[self.rows[:, s:s + EVAL_CHUNK].clamp(min=0)]
                         for s in range(0, self.rows.shape[1], EVAL_CHUNK)] if small and not self.empty else None
        self.seg_n = torch.bincount(self.seg, minlength=n_segments + 1).clamp(min=1).double()

    def score(self, kind: AdapterKind, params: Params, Y: torch.Tensor, logit_scale: float, opts: dict,
              groups: Optional[torch.Tensor] = None) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and mean loss of every segment (NaN for segments not in this plan)."""
        acc = np.full(self.n_segments, np.nan)
        lo = np.full(self.n_segments, np.nan)
        if self.empty:
            return acc, lo
        corr, loss = evaluate(kind, params, self.X, Y, self.heads, self.rows, logit_scale, opts,
                              chunk=EVAL_CHUNK, gathered=self.gathered)
        a = torch.bincount(self.seg, weights=corr.flatten().double(), minlength=self.n_segments + 1) / self.seg_n
        lf = torch.bincount(self.seg, weights=loss.flatten().double(), minlength=self.n_segments + 1) / self.seg_n
        acc[self.segments] = a[:-1].cpu().numpy()[self.segments]
        lo[self.segments] = lf[:-1].cpu().numpy()[self.segments]
        return acc, lo


def evaluated_rounds(rounds: int, eval_every: int) -> list[int]:
    """The rounds a run scores: every ``eval_every``-th and the last; a run of no rounds scores its starting point
    once, as round 0. ``federate``'s loop and a deployment's server evaluate the same rounds."""
    return [0] if rounds == 0 else [r for r in range(1, rounds + 1) if r % eval_every == 0 or r == rounds]


def segment(exp: Experiment, client: str, split: str, n: int) -> dict:
    """One scored segment of a run (a client's val or test split, or the held-out domain): a row group of
    ``metrics.parquet``, as the loop's :class:`Evaluator` and a deployment's recorder name it."""
    return {"experiment": exp.name, "heldout": exp.heldout_name, "seed": exp.seed, "client": client, "split": split,
            "n": int(n)}


def improves(val_mean: np.ndarray, best_val: np.ndarray, has_val: np.ndarray) -> np.ndarray:
    """Per experiment, whether this round's mean validation accuracy beats its best so far: the rounds whose test
    and held-out numbers the lazy evaluation scores (besides the last one), in ``federate`` and in a deployment's
    run folder (``recorder.RunRecorder``). An experiment without validation data never improves: its reported
    model is the last round's (``results.summarise``), which is scored in full and is what ``--finetune-steps``
    starts from."""
    return (np.asarray(val_mean) > best_val) & np.asarray(has_val, dtype=bool)


class Evaluator:
    """Scores the groups of a run: one per experiment (its global model), or one per lane (personal algorithms,
    each client with its own model, on its own splits and the held-out domain).

    Lazy by default, same answers: validation every evaluated round (model selection needs it); test and held-out
    only when some experiment's best validation improves (that round may be selected) and at the last round. The
    selected and last-round numbers are therefore those of scoring everything every round; ``--curves`` does so
    for the plots."""

    def __init__(self, algo: Algorithm, experiments: list[Experiment], lanes: list[Lane], X: Rows,
                 exp_head: list[torch.Tensor], lane_head: Optional[torch.Tensor], device: torch.device,
                 classes: Optional[ClassSplit] = None, labels: Optional[np.ndarray] = None):
        self.segments: list[dict] = []
        self.classes = classes  # --base-to-novel: test rows of novel classes are scored by self.novel
        val_groups, rest_groups, novel_groups, heads, source = [], [], [], [], []

        def add(e: Experiment, client: str, split: str, idx: np.ndarray, into: list):
            if len(idx) == 0:
                return
            self.segments.append(segment(e, client, split, len(idx)))
            into.append((len(self.segments) - 1, idx))

        def add_tested(e: Experiment, client: str, split: str, idx: np.ndarray, rest: list, novel: list):
            if classes is None:
                return add(e, client, split, idx, rest)
            base = classes.is_base(labels[idx])
            add(e, client, split, idx[base], rest)
            add(e, client, split + NOVEL, idx[~base], novel)

        def add_group(e: Experiment, clients, heldout_label: str, head: torch.Tensor, src: int):
            val, rest, novel = [], [], []
            for cl in clients:
                add(e, cl.name, "val", cl.val, val)
                add_tested(e, cl.name, "test", cl.test, rest, novel)
            if e.heldout is not None:
                add_tested(e, heldout_label, "heldout", e.heldout, rest, novel)
            val_groups.append(val), rest_groups.append(rest), novel_groups.append(novel)
            heads.append(head), source.append(src)

        if algo.personal:
            for li, ln in enumerate(lanes):
                e = experiments[ln.exp]
                add_group(e, [e.clients[ln.client]], e.clients[ln.client].name, lane_head[li], li)
        else:
            for ei, e in enumerate(experiments):
                add_group(e, e.clients, e.heldout_name, exp_head[ei], ei)
        heads_t = torch.stack(heads)
        n = len(self.segments)
        self.val = EvalPlan(val_groups, n, X, heads_t, device)
        self.rest = EvalPlan(rest_groups, n, X, heads_t, device)
        self.novel = EvalPlan(novel_groups, n, X, heads_t, device) if classes is not None else None
        self.set_heads(heads_t)
        self.source = torch.tensor(source, dtype=torch.long, device=device)
        self.val_segments = [[i for i, s in enumerate(self.segments) if s["experiment"] == e.name
                              and s["split"] == "val"] for e in experiments]

    def set_heads(self, heads: torch.Tensor) -> None:
        """The class embeddings (G, C, D) of every group (prompt learning: new each round); with
        ``--base-to-novel`` validation and base-class test rows are scored among the base classes, novel-class
        test rows among the novel classes."""
        if self.classes is None:
            self.val.heads = self.rest.heads = heads
            return
        self.val.heads = self.rest.heads = heads[:, torch.from_numpy(self.classes.base).to(heads.device)]
        self.novel.heads = heads[:, torch.from_numpy(self.classes.novel).to(heads.device)]

    def score_tests(self, *args) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and loss of the test and held-out segments (NaN elsewhere): :meth:`EvalPlan.score`'s
        arguments."""
        acc, loss = self.rest.score(*args)
        if self.novel is not None:
            a2, l2 = self.novel.score(*args)
            acc, loss = np.where(np.isnan(acc), a2, acc), np.where(np.isnan(loss), l2, loss)
        return acc, loss


# ------------------------------------------------------------------------------------------------ a round

class LaneRound:
    """What an algorithm sees of one round (:class:`algorithms.RoundContext`): the sampled lanes, and training,
    broadcasting and averaging restricted to them."""

    def __init__(self, loop: "_Loop", rnd: int, lanes: np.ndarray):
        self.loop, self.rnd, self.lanes = loop, rnd, lanes
        self.everyone = len(lanes) == len(loop.lanes)
        self.lane_exp = loop.lane_exp
        self.idx = torch.as_tensor(lanes, dtype=torch.long, device=loop.device)

    def select(self, per_lane: Params) -> Params:
        return per_lane if self.everyone else {n: v[self.idx] for n, v in per_lane.items()}

    def scatter(self, per_lane: Params, rows: Params) -> Params:
        """Writes in place (and returns ``per_lane``): a copy of 100 clients' adapters per round would cost more
        than the 10 that trained."""
        if self.everyone:
            return rows
        for n, v in per_lane.items():
            v[self.idx] = rows[n]
        return per_lane

    def broadcast(self, server: Params) -> Params:
        exp = self.lane_exp if self.everyone else self.lane_exp[self.idx]
        return {n: v[exp] for n, v in server.items()}  # the server sends each client its experiment's model

    def train(self, start: Params, correction: Optional[Params] = None) -> tuple[Params, np.ndarray]:
        lp = self.loop
        schedules = [batch_schedule(lp.lanes[i].train, lp.lanes[i].seed, self.rnd, lp.lanes[i].key, lp.hp,
                                    lp.train_views, len(lp.Y)) for i in self.lanes]
        if lp.prompts is not None:  # prompt learning: the clients train context vectors (federated/prompts.py)
            from .promptsteps import prompt_round  # (a Flower site calls it too)

            out = prompt_round(lp.train_prompts, lp.cfg, start, schedules, lp.Xtrain, lp.Ytrain, self.rnd,
                               lp.logit_scale)
            return out, np.array([len(s) for s in schedules])
        heads = lp.lane_head if self.everyone else lp.lane_head[self.idx]
        out = local_update(lp.kind, start, lp.Xtrain, lp.Ytrain, heads, schedules, lp.hp, lp.opts, correction)
        return out, np.array([len(s) for s in schedules])

    def average(self, per_lane: Params) -> Params:
        lp = self.loop
        pos = {lane: k for k, lane in enumerate(self.lanes)}
        members = [np.array([pos[i] for i in m if i in pos]) for m in lp.members]
        weights = [client_weights(np.array([len(lp.lanes[i].train) for i in m if i in pos]), lp.cfg.weighting)
                   for m in lp.members]
        return aggregate(per_lane, members, weights)


def sample_lanes(members: list[np.ndarray], experiments: list[Experiment], cfg: FederateConfig,
                 rnd: int) -> np.ndarray:
    """The lanes that train in round ``rnd``: every client (``--fraction-fit 1``, the official setting), or per
    experiment max(int(n * fraction_fit), min_fit_clients) clients drawn without replacement (Flower's rule),
    seeded by the experiment's seed, its name and the round."""
    if cfg.fraction_fit >= 1:
        return np.sort(np.concatenate(members)) if members else np.array([], dtype=np.int64)
    picked = []
    for m, e in zip(members, experiments):
        k = min(len(m), max(int(len(m) * cfg.fraction_fit), cfg.min_fit_clients, 1))
        rng = np.random.default_rng([e.seed, rnd, zlib.crc32(e.name.encode())])
        picked.append(m[rng.choice(len(m), k, replace=False)])
    return np.sort(np.concatenate(picked))


# ------------------------------------------------------------------------------------------------ memory

def effective_batch(cfg: FederateConfig, lanes: list[Lane]) -> int:
    """The largest batch any lane trains on: --batch-size, or the largest training split when that is smaller (a
    client's one batch per epoch is then its whole split; local_update pads to it, not to --batch-size)."""
    return min(cfg.batch_size, max((len(ln.train) for ln in lanes), default=1))


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def free_bytes(device: torch.device) -> int:
    """Bytes the run can still allocate on ``device``: the GPU's free memory, or what this process may allocate
    on the host (cache.available_memory: MemAvailable, rlimits, the cgroup limit)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from ..cache.reader import available_memory

    return int(available_memory())


def check_memory(loop: "_Loop") -> None:
    """Refuse, before any adapter is allocated, a run whose local training cannot fit (``training_bytes``, a lower
    bound): ``--hidden 99999999`` asked for ~100 GB and died in the allocator. One line naming the option that
    dominates the estimate and the bytes."""
    from .train import training_bytes

    cfg, lanes = loop.cfg, loop.lanes
    if not lanes:
        return
    batch = effective_batch(cfg, lanes)
    need = training_bytes(loop.kind, loop.dim, loop.hidden, len(lanes), len(loop.experiments), batch,
                          len(loop.cache.classes), cfg.loss)
    total, have = need["params"] + need["activations"], free_bytes(loop.device)
    if total <= have:
        return
    from .config import option_flag

    what = (f"{option_flag('hidden')} {loop.hidden}" if need["params"] >= need["activations"]
            else f"{option_flag('batch_size')} {cfg.batch_size}")
    raise ConfigError(f"{what}: local training would hold at least {_gib(total)} ({len(lanes)} client adapter(s) "
                      f"of {need['per_adapter']:,} parameters with gradients and Adam moments: {_gib(need['params'])}; "
                      f"one batch of {batch} through a hidden layer of {loop.hidden}: {_gib(need['activations'])}), "
                      f"more than the {_gib(have)} free on {loop.device.type}; lower {what.split()[0]}")


# ------------------------------------------------------------------------------------------------ the loop

def run_loop(cache: FeatureCache, cfg: FederateConfig, experiments: list[Experiment],
             on_round: Optional[Callable[[int, int], None]] = None,
             stream: Optional[bool] = None) -> LoopResult:
    """Train and evaluate every experiment together. Denormal floats are flushed to zero on every computing thread
    for the duration (``cfg.keep_denormals`` opts out; see ``fpenv.py``). ``stream`` forces features to stay in
    host memory and be gathered per batch (True) or to be copied to the device (False); default: copied when they
    fit in the device's free memory (always on CPU, where nothing is copied)."""
    with flush_denormals(not cfg.keep_denormals):
        return _Loop(cache, cfg, experiments, stream).run(on_round)


class _Loop:
    def __init__(self, cache: FeatureCache, cfg: FederateConfig, experiments: list[Experiment],
                 stream: Optional[bool]):
        self.t0 = time.perf_counter()
        self.cache, self.cfg, self.experiments = cache, cfg, experiments
        self.device = device = torch.device(cfg.device if cfg.device != "auto" else
                                            ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        self.algo = algo = make_algorithm(cfg)
        # The features are never copied on CPU (a memmap stays a memmap); on a GPU they are copied when they fit,
        # else streamed per batch / evaluation chunk from host memory.
        resident = None if stream is None else not stream
        ls = lane_setup(cache, cfg, algo, device, resident)
        self.train_views, self.X, self.Y, self.Xtrain, self.Ytrain = ls.train_views, ls.X, ls.Y, ls.Xtrain, ls.Ytrain
        self.dim = d = ls.dim
        self.kind_name = kind_name = ls.kind_name
        self.kind, self.hidden = ls.kind, ls.hidden
        self.opts = ls.opts
        self.logit_scale, self.logit_scale_source, self.hp = ls.logit_scale, ls.logit_scale_source, ls.hp

        self.exp_head, client_head = build_heads(cache, cfg, self.X, self.Y, experiments, device)
        self.lanes = lanes = build_lanes(algo, experiments)
        self.lane_head = torch.stack([client_head[ln.exp][ln.client] if algo.personal else self.exp_head[ln.exp]
                                      for ln in lanes]) if lanes else None
        self.members = [np.array([i for i, ln in enumerate(lanes) if ln.exp == ei], dtype=np.int64)
                        for ei in range(len(experiments))]
        self.lane_exp = torch.tensor([ln.exp for ln in lanes], dtype=torch.long, device=device)
        self.classes = class_split(len(cache.classes)) if cfg.base_to_novel else None
        self.evaluator = Evaluator(algo, experiments, lanes, self.X, self.exp_head, self.lane_head, device,
                                   self.classes, cache.labels)
        if self.classes is not None and self.lane_head is not None:  # clients train among the base classes only
            self.lane_head = self.lane_head[:, torch.from_numpy(self.classes.base).to(device)]
        self.has_val = np.array([bool(v) for v in self.evaluator.val_segments])

        # Prompt learning (promptfl, promptlocal, fedpgp): no adapter; the parameters are the algorithm's prompt
        # tensors over the frozen text tower (algo.learner: prompts.ContextParams, pgp.PGPLearner)
        self.prompts = self.text_tower = self.train_prompts = None
        if algo.prompts:
            from .promptsteps import prompt_learner, text_model  # from the cache's provenance (as a site's)

            lm = text_model(cache.meta, cfg, device)
            self.prompts = prompt_learner(lm, cache.classes, cfg, device)
            self.text_tower = self.prompts.base
            # the prompts clients train: every class's, or the base classes' alone (--base-to-novel)
            self.train_prompts = self.prompts if self.classes is None else prompt_learner(
                lm, [cache.classes[i] for i in self.classes.base], cfg, device)
            inits = {s: self.prompts.init_params(s) for s in {e.seed for e in experiments}}
            shapes = self.prompts.param_shapes if lanes else {}
        else:
            check_memory(self)
            inits = {s: init_params(kind_name, d, self.hidden, s) for s in {e.seed for e in experiments}}
            shapes = self.kind.shapes(d, self.hidden) if lanes else {}
        server = {n: torch.stack([inits[e.seed][n] for e in experiments]).to(device) for n in shapes}
        # Per-lane copies only for algorithms whose clients keep state (100 clients x a 512-d adapter = 210 MB)
        clients = {n: torch.stack([inits[ln.seed][n] for ln in lanes]).to(device) for n in shapes} \
            if algo.personal or algo.client_state else {}
        self.state: TrainState = algo.init_state(server, clients)

    # ---- evaluation of one round

    def _scored(self) -> Params:
        """The parameters of each evaluation group."""
        p = self.algo.scored_params(self.state)
        return {n: v[self.evaluator.source] for n, v in p.items()} if self.algo.personal else p

    def _score(self, full: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ev, params = self.evaluator, self._scored()
        if self.prompts is not None:  # each group's class embeddings come from its own context vectors
            ev.set_heads(self.prompts.heads(params))
            params = {}
        args = (self.kind, params, self.Y, self.logit_scale, self.opts)
        acc, loss = ev.val.score(*args)
        val_mean = np.array([acc[v].mean() if v else 0.0 for v in ev.val_segments])
        improved = improves(val_mean, self.best_val, self.has_val)
        if full or improved.any():
            a2, l2 = ev.score_tests(*args)
            acc, loss = np.where(np.isnan(acc), a2, acc), np.where(np.isnan(loss), l2, loss)
        if improved.any():
            self.best_val = np.where(improved, val_mean, self.best_val)
            self._keep_best(improved)
        return acc, loss, val_mean

    def _keep_best(self, improved: np.ndarray) -> None:
        """The global model of each experiment at its best validation round (what --finetune-steps starts from)."""
        if not self.cfg.finetune_steps or self.algo.personal or not self.state.server:
            return
        idx = torch.as_tensor(np.flatnonzero(improved), device=self.device)
        for n, v in self.state.server.items():
            self.best_server.setdefault(n, v.clone())[idx] = v[idx]

    # ---- the rounds

    def run(self, on_round) -> LoopResult:
        cfg, algo = self.cfg, self.algo
        self.best_val = np.full(len(self.experiments), -np.inf)
        self.notes: list[str] = []
        if self.prompts is not None and cfg.ctx_init and self.text_tower.n_ctx != cfg.n_ctx:
            self.notes.append(f"--ctx-init {cfg.ctx_init!r} sets n_ctx = {self.text_tower.n_ctx}, its token count (as "
                              f"CoOp); --n-ctx {cfg.n_ctx} is not used")
        self.best_server: Params = {}
        rounds, accs, losses, val_means, fit = [], [], [], [], []
        diverged = None  # first evaluated round at which some scored adapter held NaN/inf
        total = cfg.rounds if algo.trains else 0
        evaluated = evaluated_rounds(total, cfg.eval_every)
        if total == 0:  # nothing to train: score the starting point once, as round 0
            a, lo, v = self._score(full=True)
            rounds.append(0), accs.append(a), losses.append(lo), val_means.append(v)
        for r in range(1, total + 1):
            sampled = sample_lanes(self.members, self.experiments, cfg, r)
            self.state = algo.run_round(self.state, LaneRound(self, r, sampled))
            fit.append(len(sampled))
            if r in evaluated:
                a, lo, v = self._score(full=cfg.curves or r == total)
                rounds.append(r), accs.append(a), losses.append(lo), val_means.append(v)
                if diverged is None and not all(bool(torch.isfinite(p).all())
                                                for p in algo.scored_params(self.state).values()):
                    diverged = r
            if on_round:
                on_round(r, total)
        if self.lanes and cfg.batch_size > effective_batch(cfg, self.lanes):
            self.notes.append(f"--batch-size {cfg.batch_size} is larger than every client's training split (largest "
                              f"{effective_batch(cfg, self.lanes)}): each client trains on its whole split as one "
                              f"batch per epoch")
        short = next(((e, m) for e, m in zip(self.experiments, self.members) if 0 < len(m) < cfg.min_fit_clients),
                     None)
        if short and cfg.fraction_fit < 1:
            self.notes.append(f"--min-fit-clients {cfg.min_fit_clients}: {short[0].name} has only {len(short[1])} "
                              f"client(s); all of them trained every round")
        if diverged is not None:  # a NaN model still gets an accuracy (argmax of NaN logits): say so
            self.notes.append(f"the adapter diverged: non-finite (NaN/inf) weights by round {diverged}; accuracies "
                              f"from then on are meaningless (lower --server-lr or --lr)")
        final = self.state.clients if algo.personal else self.state.server
        res = LoopResult(self.experiments, self.evaluator.segments, rounds, np.array(accs), np.array(losses),
                         num_params(self.kind_name, self.dim, self.hidden), 0.0,
                         {n: v.cpu() for n, v in final.items()}, self.logit_scale, self.logit_scale_source,
                         np.array(val_means), fit_clients=fit, notes=self.notes, train_views=self.train_views,
                         classes=self.classes)
        if self.prompts is not None:
            res.trainable_params = self.prompts.num_params
            res.communicated_params = self.prompts.communicated_params
        res.notes += finetune_notes(cfg, algo, self.train_views)
        if cfg.finetune_steps and algo.trains and not algo.personal:
            self._keep_best(~self.has_val)  # no validation data: fine-tune the last round's model, the one reported
            res.finetuned = finetune(self)
        res.seconds = time.perf_counter() - self.t0
        return res


# ------------------------------------------------------------------------------------------------ personalisation

FINETUNE_ROUND = 2**40  # batch-schedule 'round' of fine-tuning pass k: FINETUNE_ROUND + k, after every real round


def finetune_schedule(train: np.ndarray, seed: int, key: int, steps: int, hp: LocalHyper) -> list[np.ndarray]:
    """``steps`` batches over a client's train split: shuffled epochs (same batching rules as a round) repeated
    until there are enough."""
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        more = batch_schedule(train, seed, FINETUNE_ROUND + epoch, key, LocalHyper(batch_size=hp.batch_size))
        if not more:
            break  # fewer than two training samples: nothing to fine-tune on
        out += more
        epoch += 1
    return out[:steps]


def finetune_notes(cfg: FederateConfig, algo: Algorithm, train_views: int) -> list[str]:
    """What the summary says about ``--finetune-steps`` (in-process and in a Flower deployment alike)."""
    if not cfg.finetune_steps:
        return []
    if not algo.trains or algo.personal:
        return [f"--finetune-steps ignored: {cfg.algo} "
                f"{'keeps a model per client already' if algo.personal else 'trains nothing'}"]
    if train_views > 1:
        return [f"--finetune-steps fine-tunes on view 0 only (--train-views {cfg.train_views} applies to the rounds)"]
    return []


def finetune_schedules(lanes: list[Lane], steps: int, hp: LocalHyper) -> list[list[np.ndarray]]:
    return [finetune_schedule(ln.train, ln.seed, ln.key, steps, hp) for ln in lanes]


def finetune_adapters(kind: AdapterKind, start: Params, X: Rows, Y: torch.Tensor, heads: torch.Tensor,
                      lanes: list[Lane], steps: int, hp: LocalHyper, opts: dict) -> Params:
    """``steps`` local steps of each lane from ``start`` (stacked per lane) on view 0 of its train split: a fresh
    local optimiser with the rounds' hyper-parameters, no proximal term. The one implementation of adapter
    fine-tuning: :func:`finetune` (all lanes at once) and a Flower site (its own lane) call it."""
    return local_update(kind, start, X, Y, heads, finetune_schedules(lanes, steps, hp),
                        LocalHyper(**{**hp.__dict__, "mu": 0.0}), opts)


def finetune(loop: _Loop) -> dict:
    """Personalised evaluation: each client fine-tunes its experiment's selected global model for
    ``--finetune-steps`` local steps (a fresh local optimiser, as a round) on its train split, and is scored on its
    own test split. Returns experiment -> client -> test accuracy."""
    cfg, exps = loop.cfg, loop.experiments
    start_from = loop.best_server or loop.state.server
    lanes = client_lanes(exps)
    lane_exp = torch.tensor([ln.exp for ln in lanes], dtype=torch.long, device=loop.device)
    start = {n: v[lane_exp] for n, v in start_from.items()}
    if loop.prompts is not None:  # prompt learning: fine-tune the context with the prompt optimiser at --prompt-lr
        from .promptsteps import prompt_finetune  # (a Flower site calls it too)

        schedules = finetune_schedules(lanes, cfg.finetune_steps, loop.hp)
        params = prompt_finetune(loop.prompts, cfg, start, schedules, loop.X, loop.Y, loop.logit_scale)
        tuned, heads = {}, loop.prompts.heads(params)  # each client scored against its own context's embeddings
    else:
        heads = torch.stack([loop.exp_head[ln.exp] for ln in lanes])
        tuned = finetune_adapters(loop.kind, start, loop.X, loop.Y, heads, lanes, cfg.finetune_steps, loop.hp,
                                  loop.opts)
    groups = [[(li, exps[ln.exp].clients[ln.client].test)] if len(exps[ln.exp].clients[ln.client].test) else []
              for li, ln in enumerate(lanes)]
    plan = EvalPlan(groups, len(lanes), loop.X, heads, loop.device)
    acc, _ = plan.score(loop.kind, tuned, loop.Y, loop.logit_scale, loop.opts)
    out: dict = {e.name: {} for e in exps}
    for li, ln in enumerate(lanes):
        if not np.isnan(acc[li]):
            out[exps[ln.exp].name][exps[ln.exp].clients[ln.client].name] = float(acc[li])
    return out
