"""The in-process federated loop: every experiment (held-out domain x seed) and every client trains together.

Per round: each lane (a client's adapter copy) runs its local update (vectorised), then FedAvg aggregates lanes
per experiment and broadcasts the global adapter back; every ``eval_every`` rounds all validation/test/held-out
sets are scored in one batched pass. Selection (official): the round with the best mean validation accuracy over
training clients; the held-out domain never takes part in training or selection.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..cache import FeatureCache
from .adapters import ADAPTERS, Params, get_adapter, init_params, num_params
from .config import ConfigError, FederateConfig
from .fpenv import flush_denormals
from .protocols import Experiment
from .train import (LocalHyper, Rows, aggregate, batch_schedule, client_weights, evaluate, host_tensor, lane_key,
                    local_update)

FEDAVG_ALGOS = ("fedclip", "fedprox")
EVAL_CHUNK = 1024  # rows per evaluation matmul: small enough to stay in cache (measured: -15 % vs one piece)
# Evaluation rows are gathered once and kept across rounds only up to this size: gathering them again each round
# costs one pass over them, which matters when rounds are short (PACS: ~40 MB, -15 % of the run) and is noise when
# they are long (DomainNet, one held-out domain: 565 MB re-gathered in ~0.3 s against ~20 s of training).
EVAL_GATHER_MAX_BYTES = 256 << 20


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
    acc: np.ndarray  # (R, S)
    loss: np.ndarray  # (R, S)
    trainable_params: int
    seconds: float
    final_params: dict = field(default_factory=dict)
    logit_scale: float = 100.0  # the value used for training and evaluation
    logit_scale_source: str = ""


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


FALLBACK_LOGIT_SCALE = 100.0  # the official FedCLIP constant (= OpenAI CLIP's learned scale)


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


PROTOTYPE_CHUNK = 65_536  # rows normalised at a time for class sums (no normalised copy of the whole matrix)


def _class_sums(X: Rows, Y: torch.Tensor, rows: np.ndarray, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the L2-normalised features of ``rows`` per class, and class counts."""
    sums = torch.zeros(c, X.shape[1], device=Y.device)
    for s in range(0, len(rows), PROTOTYPE_CHUNK):
        r = torch.from_numpy(rows[s:s + PROTOTYPE_CHUNK])
        sums.index_add_(0, Y[r.to(Y.device)], _normalise(X[r]))
    r = torch.from_numpy(rows).to(Y.device)
    return sums, torch.bincount(Y[r], minlength=c).float()


def run_loop(cache: FeatureCache, cfg: FederateConfig, experiments: list[Experiment],
             on_round: Optional[Callable[[int, int], None]] = None,
             stream: Optional[bool] = None) -> LoopResult:
    """Train and evaluate every experiment together. Denormal floats are flushed to zero on every computing thread
    for the duration (``cfg.keep_denormals`` opts out; see ``fpenv.py``). ``stream`` forces features to stay in
    host memory and be gathered per batch (True) or to be copied to the device (False); default: copied when they
    fit in the device's free memory (always on CPU, where nothing is copied)."""
    with flush_denormals(not cfg.keep_denormals):
        return _run_loop(cache, cfg, experiments, on_round, stream)


def _run_loop(cache: FeatureCache, cfg: FederateConfig, experiments: list[Experiment],
              on_round: Optional[Callable[[int, int], None]], stream: Optional[bool]) -> LoopResult:
    t0 = time.perf_counter()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    # The features are never copied on CPU (a memmap stays a memmap); on a GPU they are copied when they fit, else
    # streamed per batch / evaluation chunk from host memory.
    X = Rows(host_tensor(cache.features), device, resident=None if stream is None else not stream)
    Y = torch.from_numpy(cache.labels).to(device)
    d, c = X.shape[1], len(cache.classes)
    kind_name = "none" if cfg.algo == "zeroshot" else cfg.adapter
    kind = get_adapter(kind_name) if kind_name != "none" else ADAPTERS["none"]
    hidden = cfg.hidden or kind.default_hidden(d)
    opts = {"residual_alpha": cfg.residual_alpha}
    logit_scale, logit_scale_source = resolve_logit_scale(cfg, cache)
    hp = LocalHyper(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.batch_size, cfg.local_epochs,
                    cfg.mu if cfg.algo == "fedprox" else 0.0, cfg.loss, logit_scale)

    # ---- heads: text prompts, or class prototypes aggregated by sums and counts (no features leave a client)
    if cfg.head == "text":
        T = text_head(cache, cfg.template).to(device)
        if T.shape[-1] != d:
            raise ConfigError(f"{cache.path}: text embeddings have D={T.shape[-1]} but image features D={d}")
        exp_head = [T for _ in experiments]
        client_head = [[T for _ in e.clients] for e in experiments]
    else:
        exp_head, client_head = [], []
        for e in experiments:
            parts = [_class_sums(X, Y, cl.train, c) for cl in e.clients]
            s = sum(p[0] for p in parts)
            n = sum(p[1] for p in parts)
            exp_head.append(_normalise(s / n.clamp(min=1).unsqueeze(1)))
            client_head.append([_normalise(p[0] / p[1].clamp(min=1).unsqueeze(1)) for p in parts])

    # ---- lanes: one per client (or one pooled lane per experiment for central), largest first
    lanes: list[Lane] = []
    if cfg.algo in FEDAVG_ALGOS + ("local",):
        for ei, e in enumerate(experiments):
            for ci, cl in enumerate(e.clients):
                lanes.append(Lane(ei, ci, cl.train, e.seed, lane_key(e.name, cl.name)))
    elif cfg.algo == "central":
        for ei, e in enumerate(experiments):
            lanes.append(Lane(ei, -1, np.sort(np.concatenate([cl.train for cl in e.clients])), e.seed,
                              lane_key(e.name, "central")))
    lanes.sort(key=lambda ln: -len(ln.train))
    lane_head = torch.stack([client_head[ln.exp][ln.client] if cfg.algo == "local" else exp_head[ln.exp]
                             for ln in lanes]) if lanes else None
    inits = {s: init_params(kind_name, d, hidden, s) for s in {e.seed for e in experiments}}
    P: Params = {n: torch.stack([inits[ln.seed][n] for ln in lanes]).to(device) for n in kind.shapes(d, hidden)} \
        if lanes else {}
    members = [np.array([i for i, ln in enumerate(lanes) if ln.exp == ei]) for ei in range(len(experiments))]
    weights = [client_weights(np.array([len(lanes[i].train) for i in m]), cfg.weighting) for m in members]
    lane_exp = torch.tensor([ln.exp for ln in lanes], dtype=torch.long, device=device)

    # ---- evaluation groups: one per experiment (global model), or one per lane for local training
    segments: list[dict] = []
    group_rows, group_segs, group_heads, group_source = [], [], [], []

    def add_segment(rows, segs, e: Experiment, client: str, split: str, idx: np.ndarray):
        if len(idx) == 0:
            return
        segments.append({"experiment": e.name, "heldout": e.heldout_name, "seed": e.seed, "client": client,
                         "split": split, "n": int(len(idx))})
        rows.append(idx)
        segs.append(np.full(len(idx), len(segments) - 1))

    def add_group(e: Experiment, clients, heldout_label: str, head: torch.Tensor, source: int):
        rows, segs = [], []
        for cl in clients:
            add_segment(rows, segs, e, cl.name, "val", cl.val)
            add_segment(rows, segs, e, cl.name, "test", cl.test)
        if e.heldout is not None:
            add_segment(rows, segs, e, heldout_label, "heldout", e.heldout)
        group_rows.append(rows), group_segs.append(segs), group_heads.append(head), group_source.append(source)

    if cfg.algo == "local":  # each lane is scored with its own adapter, on its own client and the held-out domain
        for li, ln in enumerate(lanes):
            e = experiments[ln.exp]
            add_group(e, [e.clients[ln.client]], e.clients[ln.client].name, lane_head[li], li)
    else:
        for ei, e in enumerate(experiments):
            add_group(e, e.clients, e.heldout_name, exp_head[ei], ei)
    m = max(sum(len(r) for r in rows) for rows in group_rows)
    E_rows = torch.full((len(group_rows), m), -1, dtype=torch.long)
    E_seg = torch.full((len(group_rows), m), len(segments), dtype=torch.long)  # padding -> a dummy segment
    for g, (rows, segs) in enumerate(zip(group_rows, group_segs)):
        r, s = np.concatenate(rows), np.concatenate(segs)
        E_rows[g, :len(r)] = torch.from_numpy(r)
        E_seg[g, :len(s)] = torch.from_numpy(s)
    E_rows, E_seg = E_rows.to(device), E_seg.to(device)
    E_heads = torch.stack(group_heads)
    src = torch.tensor(group_source, dtype=torch.long, device=device)
    # Evaluation inputs never change: gather them once when that is small (see EVAL_GATHER_MAX_BYTES); otherwise
    # each round gathers chunk by chunk, holding one chunk at a time.
    E_X = [X[E_rows[:, s:s + EVAL_CHUNK].clamp(min=0)] for s in range(0, E_rows.shape[1], EVAL_CHUNK)] \
        if E_rows.numel() * d * X.dtype.itemsize <= EVAL_GATHER_MAX_BYTES else None
    seg_n = torch.bincount(E_seg.flatten(), minlength=len(segments) + 1).clamp(min=1).double()

    def score(params_for_groups: Params):
        corr, loss = evaluate(kind, params_for_groups, X, Y, E_heads, E_rows, logit_scale, opts,
                              chunk=EVAL_CHUNK, gathered=E_X)
        segf = E_seg.flatten()
        acc = torch.bincount(segf, weights=corr.flatten().double(), minlength=len(segments) + 1) / seg_n
        lo = torch.bincount(segf, weights=loss.flatten().double(), minlength=len(segments) + 1) / seg_n
        return acc[:-1].cpu().numpy(), lo[:-1].cpu().numpy()

    central_order = torch.tensor([next((i for i, ln in enumerate(lanes) if ln.exp == ei), 0)
                                  for ei in range(len(experiments))], dtype=torch.long, device=device)

    def group_params(P: Params, G: Params) -> Params:
        """The adapter each evaluation group is scored with."""
        if cfg.algo in FEDAVG_ALGOS:
            return G
        if cfg.algo == "central":
            return {n: v[central_order] for n, v in P.items()}
        return {n: v[src] for n, v in P.items()}  # local: each lane its own; zeroshot: no parameters

    G: Params = {n: torch.stack([inits[e.seed][n] for e in experiments]).to(device) for n in P}
    rounds, accs, losses = [], [], []
    total_rounds = 0 if cfg.algo == "zeroshot" else cfg.rounds
    if total_rounds == 0:  # nothing to train: score the starting point once, as round 0
        a, lo = score(group_params(P, G))
        rounds.append(0), accs.append(a), losses.append(lo)
    for r in range(1, total_rounds + 1):
        schedules = [batch_schedule(ln.train, ln.seed, r, ln.key, hp) for ln in lanes]
        P = local_update(kind, P, X, Y, lane_head, schedules, hp, opts)
        if cfg.algo in FEDAVG_ALGOS:
            G = aggregate(P, members, weights)
            P = {n: v[lane_exp] for n, v in G.items()}  # the server sends the global adapter back to every client
        if r % cfg.eval_every == 0 or r == total_rounds:
            a, lo = score(group_params(P, G))
            rounds.append(r), accs.append(a), losses.append(lo)
        if on_round:
            on_round(r, total_rounds)
    final = G if cfg.algo in FEDAVG_ALGOS else P
    return LoopResult(experiments, segments, rounds, np.array(accs), np.array(losses),
                      num_params(kind_name, d, hidden), time.perf_counter() - t0,
                      {n: v.cpu() for n, v in final.items()}, logit_scale, logit_scale_source)
