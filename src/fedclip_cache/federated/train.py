"""Local update and aggregation as pure functions, shared by the in-process loop, the reference loop and Flower.

``local_update`` trains many lanes (client copies of the adapter) at once: their parameters are stacked on a
leading axis, each lane draws its own shuffled batches, and Adam runs per lane with its own step count, exactly as
if each client trained alone (``reference_local_update`` is that plain per-client loop, used by tests and
benchmarks to prove it). Lanes are ordered by training-set size, so the lanes still busy at step t are always a
prefix ``[:k]`` and every tensor op works on views, never copies.
"""
from __future__ import annotations

import ctypes
import functools
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import ADAPTERS, AdapterKind, Params, cosine_logits
from .config import FederateConfig
from .precision import autocast
from .torch_ops import fused_adam_, increment_steps

_D = FederateConfig()  # defaults are written once, in FederateConfig


@dataclass(frozen=True)
class LocalHyper:
    """Local-training hyper-parameters of one client (defaults: FederateConfig's, the official FedCLIP ones)."""

    lr: float = _D.lr
    beta1: float = _D.beta1
    beta2: float = _D.beta2
    eps: float = _D.eps
    weight_decay: float = _D.weight_decay  # coupled L2, as torch.optim.Adam (not AdamW)
    batch_size: int = _D.batch_size
    epochs: int = _D.local_epochs
    mu: float = 0.0  # proximal weight (FedProx), set by the algorithm
    loss: str = _D.loss
    logit_scale: float = 100.0  # the official constant; runs use the cache's (see loop.resolve_logit_scale)
    optimizer: str = _D.local_optimizer
    precision: str = _D.precision  # the adapter forward's dtype (precision.py); the rest stays fp32

    @classmethod
    def from_config(cls, cfg: FederateConfig, mu: float, logit_scale: float) -> "LocalHyper":
        return cls(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.batch_size, cfg.local_epochs, mu,
                   cfg.loss, logit_scale, cfg.local_optimizer, cfg.precision)


@functools.cache
def keep_freed_memory() -> bool:
    """Every step allocates gradient tensors of ~12 MB; glibc serves those with fresh mmaps and returns them on free,
    so each step page-faults them back in (measured: 40 % of step time). Raising the mmap and trim thresholds keeps
    them in the heap. No-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory (no copy), also for a read-only array such as a ``np.memmap`` opened
    with mode "r": torch warns that it cannot protect such memory from writes; we only ever read it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(a)


class Rows:
    """The feature matrix as seen by training and evaluation: ``rows[idx]`` gathers rows onto ``device``.

    Resident: the whole matrix lives on ``device`` (on CPU: the caller's array itself, never copied -- a memmap
    stays a memmap). Streamed (``--device cuda`` when the features do not fit in GPU memory): the matrix stays in
    host memory and each batch or evaluation chunk is gathered there and copied to the device. ``index_device`` is
    where indices should live to avoid a device round trip per gather. Gathers are float32 whatever the storage
    (a float16 cache stays float16 in memory, on disk or on the GPU, and is converted per batch)."""

    def __init__(self, host: torch.Tensor, device: torch.device | str = "cpu", resident: bool | None = None):
        device = torch.device(device)
        if resident is None:
            resident = device.type == "cpu" or fits_on_device(host, device)
        self.host = host
        self.device = device
        self.resident = resident
        self.data = (host if device.type == "cpu" else host.to(device)) if resident else None
        self.index_device = device if resident else torch.device("cpu")
        self.shape = host.shape
        self.dtype = torch.float32  # what a gather returns

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.data is not None:
            return self.data[idx.to(self.device, non_blocking=True)].float()
        return self.host[idx.to("cpu")].to(self.device, non_blocking=True).float()

    def __len__(self) -> int:
        return self.shape[0]


def fits_on_device(t: torch.Tensor, device: torch.device, headroom: float = 0.5) -> bool:
    """Whether ``t`` fits in the device's free memory with room to spare (``headroom`` of the free memory is left
    for parameters, activations and the allocator). CPU: always."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return t.numel() * t.element_size() <= free * (1 - headroom)


def lane_key(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


VIEW_STREAM = 0x7669657773  # "views": the RNG stream of the view choice, apart from the shuffle's


def batch_schedule(train: np.ndarray, seed: int, rnd: int, key: int, hp: LocalHyper, views: int = 1,
                   n_rows: int = 0) -> list[np.ndarray]:
    """The batches one client trains on in one round: a fresh shuffle per epoch, batches of ``batch_size``;
    a final batch of one sample is skipped, as the official code does (``if len(text) > 1``).

    ``views`` > 1 (``--train-views``): each epoch every sample uses one of its first ``views`` views, drawn from
    its own seeded stream (seed, round, epoch, client); view v of row r is row ``v * n_rows + r`` of the view-major
    (views * n_rows, D) matrix. The shuffle is the same as with one view."""
    out = []
    for epoch in range(hp.epochs):
        perm = train[np.random.default_rng([seed, rnd, epoch, key]).permutation(len(train))]
        if views > 1:
            pick = np.random.default_rng([seed, rnd, epoch, key, VIEW_STREAM]).integers(0, views, len(perm))
            perm = perm + n_rows * pick
        for s in range(0, len(perm), hp.batch_size):
            b = perm[s:s + hp.batch_size]
            if len(b) > 1:
                out.append(b)
    return out


def training_logits(kind: AdapterKind, params: Params, x: torch.Tensor, targets: torch.Tensor, hp: LocalHyper,
                    opts: dict) -> torch.Tensor:
    """:func:`cosine_logits` of local training. ``--precision bf16``: the adapter's forward runs under bf16 autocast
    (its matmuls in bfloat16, weights kept fp32 and cast per step); its output is cast back to fp32 before the
    normalisation and the logits, so the loss and everything after it are the fp32 code's."""
    if hp.precision == "fp32":
        return cosine_logits(kind, params, x, targets, hp.logit_scale, opts)
    with autocast(hp.precision, x.device):
        adapted = kind.forward(params, x, opts)
    return cosine_logits(ADAPTERS["none"], {}, adapted.float(), targets, hp.logit_scale, opts)


def batch_loss(kind: AdapterKind, params: Params, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
               heads: torch.Tensor, hp: LocalHyper, opts: dict) -> torch.Tensor:
    """Sum over lanes of each lane's mean loss. x (k,B,D) raw features, y (k,B), valid (k,B), heads (k,C,D)
    L2-normalised class embeddings (text prompts or prototypes)."""
    n = valid.sum(1).clamp(min=1).to(x.dtype)
    w = valid.to(x.dtype)
    if hp.loss == "ce":
        logits = training_logits(kind, params, x, heads, hp, opts)
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return ((ce * w).sum(1) / n).sum()
    # Official FedCLIP: CLIP loss within the batch, each image paired with its own class prompt; duplicates of a
    # class are negatives of each other (targets arange(B)).
    t = heads.gather(1, y.unsqueeze(-1).expand(-1, -1, heads.shape[-1]))
    logits = training_logits(kind, params, x, t, hp, opts)  # (k, B_img, B_txt)
    diag = logits.diagonal(dim1=1, dim2=2)
    pad = ~valid
    ce_img = torch.logsumexp(logits.masked_fill(pad.unsqueeze(1), float("-inf")), 2) - diag
    ce_txt = torch.logsumexp(logits.masked_fill(pad.unsqueeze(2), float("-inf")), 1) - diag
    return ((((ce_img + ce_txt) / 2) * w).sum(1) / n).sum()


def local_update(kind: AdapterKind, params: Params, X: torch.Tensor, Y: torch.Tensor, heads: torch.Tensor,
                 schedules: list[list[np.ndarray]], hp: LocalHyper, opts: dict | None = None,
                 correction: Params | None = None) -> Params:
    """One round of local training for every lane; returns new stacked parameters (inputs are not modified).

    ``schedules[l]`` is lane l's list of batches (row indices into X); lanes must be ordered by non-increasing
    number of batches. A fresh Adam per lane per round (the official code re-creates its optimiser every round).
    ``correction`` (stacked like ``params``) is added to every gradient of its lane (SCAFFOLD's c - c_i).
    """
    opts = opts or {}
    keep_freed_memory()
    nb = np.array([len(s) for s in schedules])
    if len(schedules) == 0 or not params:
        return {k: v.clone() for k, v in params.items()}
    if np.any(np.diff(nb) > 0):
        raise ValueError("lanes must be sorted by non-increasing number of batches")
    names = list(params)
    p = {k: v.detach().clone().contiguous() for k, v in params.items()}
    anchor = {k: v.detach().clone() for k, v in params.items()} if hp.mu > 0 else None
    adam = _LaneAdam(p, params[names[0]].device)
    idx = padded_batches(schedules)
    # X: a tensor or a Rows (resident or streamed); gather indices live where X gathers, labels where Y lives
    idx_x = torch.from_numpy(idx).clamp(min=0).to(getattr(X, "index_device", X.device))
    idx_y = torch.from_numpy(idx).to(Y.device)
    for t in range(int(nb[0])):
        k = int((nb > t).sum())  # lanes still busy at step t: a prefix, so every op below works on views
        it = idx_y[t, :k]
        valid = it >= 0
        leaves = {n: p[n][:k].detach().requires_grad_(True) for n in names}
        loss = batch_loss(kind, leaves, X[idx_x[t, :k]], Y[it.clamp(min=0)], valid, heads[:k], hp, opts)
        grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
        with torch.no_grad():
            if anchor is not None:  # FedProx: the gradient of mu/2 ||w - w_global||^2
                for n, g in grads.items():
                    g.add_(p[n][:k] - anchor[n][:k], alpha=hp.mu)
            if correction is not None:
                for n, g in grads.items():
                    g.add_(correction[n][:k])
            if hp.optimizer == "sgd":
                _sgd_step(p, grads, k, hp)
            else:
                adam.step(p, grads, k, hp)
    return p


def padded_batches(schedules: list[list[np.ndarray]]) -> np.ndarray:
    """The lanes' batches as one (steps, lanes, B) array of row indices, -1 = padding (lanes sorted by
    non-increasing number of batches, so lane l is busy for its first ``len(schedules[l])`` steps)."""
    # Batches are padded to the longest one scheduled, never to --batch-size itself: a batch size far above every
    # client's data would otherwise allocate with the batch size (measured, 2 clients of 14 training images,
    # --batch-size 10^7: peak RSS 4.8 GB and 22 s before, 1.1 GB and 6 s now -- the import baseline). Same
    # batches and results; a --batch-size >= the data trains exactly as --batch-size = the data (tested).
    bsz = max((len(b) for s in schedules for b in s), default=1)
    idx = np.full((max((len(s) for s in schedules), default=0), len(schedules), bsz), -1, np.int64)
    for lane, sched in enumerate(schedules):
        for t, b in enumerate(sched):
            idx[t, lane, :len(b)] = b
    return idx


def _sgd_step(p: Params, grads: Params, k: int, hp: LocalHyper) -> None:
    """torch.optim.SGD on the first ``k`` lanes, in place: d = g + wd * w; w -= lr * d."""
    for n, g in grads.items():
        pl = p[n][:k]
        if hp.weight_decay:
            g.add_(pl, alpha=hp.weight_decay)
        pl.add_(g, alpha=-hp.lr)


class _LaneAdam:
    """A fresh torch.optim.Adam per lane, stepped for the busy lanes ``[:k]`` at once (``torch_ops``): moments
    stacked like the parameters, one step counter per lane."""

    def __init__(self, p: Params, device: torch.device) -> None:
        self.m = {k: torch.zeros_like(v) for k, v in p.items()}
        self.v = {k: torch.zeros_like(v) for k, v in p.items()}
        lanes = next(iter(p.values())).shape[0]
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(lanes)]

    def step(self, p: Params, grads: Params, k: int, hp: LocalHyper) -> None:
        increment_steps(self.steps[:k])
        for n, g in grads.items():
            pl, gl, ml, vl = p[n][:k], g.contiguous(), self.m[n][:k], self.v[n][:k]  # fused Adam needs dense
            fused_adam_(list(pl.unbind(0)), list(gl.unbind(0)), list(ml.unbind(0)), list(vl.unbind(0)),
                        self.steps[:k], lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay,
                        eps=hp.eps)


def training_bytes(kind: AdapterKind, d: int, h: int, lanes: int, groups: int, batch: int, classes: int,
                   loss: str) -> dict[str, int]:
    """A lower bound of what one round of local training holds at once (float32), in bytes: ``params`` = every
    lane's adapter, gradient and Adam moments plus the global adapters of ``groups``; ``activations`` = one step's
    hidden layer, adapted features and logits over all lanes (B x B for the contrastive loss, B x C for ce).
    Checked before anything is allocated (:func:`loop.check_memory`)."""
    import math

    p = sum(math.prod(s) for s in kind.shapes(d, h).values())
    width = batch if loss == "contrastive" else classes
    return {"params": 4 * p * (4 * lanes + groups), "activations": 4 * lanes * batch * (h + d + width),
            "per_adapter": p}


def reference_local_update(kind: AdapterKind, params: Params, X: torch.Tensor, Y: torch.Tensor,
                           heads: torch.Tensor, schedule: list[np.ndarray], hp: LocalHyper,
                           opts: dict | None = None) -> Params:
    """The plain per-client loop (one client, one batch at a time, torch.optim.Adam), as the official code trains.
    ``params`` are one client's unstacked parameters; heads (C, D)."""
    opts = opts or {}
    p = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    anchor = {k: v.detach().clone() for k, v in params.items()}
    opt = (torch.optim.SGD(p.values(), lr=hp.lr, weight_decay=hp.weight_decay) if hp.optimizer == "sgd" else
           torch.optim.Adam(p.values(), lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                            weight_decay=hp.weight_decay))
    for b in schedule:
        bt = torch.from_numpy(b)
        x, y = X[bt.to(getattr(X, "index_device", X.device))].unsqueeze(0), Y[bt.to(Y.device)].unsqueeze(0)
        stacked = {k: v.unsqueeze(0) for k, v in p.items()}
        loss = batch_loss(kind, stacked, x, y, torch.ones_like(y, dtype=torch.bool), heads.unsqueeze(0), hp, opts)
        if hp.mu > 0:
            loss = loss + hp.mu / 2 * sum(((p[k] - anchor[k]) ** 2).sum() for k in p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


# ------------------------------------------------------------------------------------------- aggregation

def aggregate(params: Params, members: list[np.ndarray], weights: list[np.ndarray]) -> Params:
    """FedAvg: for each group g, sum_l weights[g][l] * params[members[g][l]] (weights normalised to 1).
    Returns stacked (G, ...) global parameters."""
    out = {}
    for n, v in params.items():
        rows = []
        for mem, w in zip(members, weights):
            w = torch.as_tensor(np.asarray(w, np.float64) / np.sum(w), dtype=v.dtype, device=v.device)
            rows.append(torch.tensordot(w, v[torch.as_tensor(mem, device=v.device)], dims=1))
        out[n] = torch.stack(rows)
    return out


def client_weights(train_sizes: np.ndarray, weighting: str) -> np.ndarray:
    """Official FedCLIP averages uniformly; ``samples`` is FedAvg by sample count."""
    return np.ones(len(train_sizes)) if weighting == "uniform" else np.asarray(train_sizes, np.float64)


# ------------------------------------------------------------------------------------------- evaluation

class Scores(NamedTuple):
    """Per-row results of :func:`evaluate`, shaped like its ``rows`` (G, M); padding rows hold garbage."""

    correct: torch.Tensor  # bool: the argmax class is the label
    loss: torch.Tensor  # float32 cross-entropy


@torch.no_grad()
def evaluate(kind: AdapterKind, params: Params, X: torch.Tensor, Y: torch.Tensor, heads: torch.Tensor,
             rows: torch.Tensor, logit_scale: float, opts: dict | None = None, chunk: int = 1024,
             gathered: torch.Tensor | None = None) -> Scores:
    """Per-row correctness and cross-entropy for G groups at once. rows (G, M) indices (-1 = padding),
    params stacked (G, ...), heads (G, C, D); ``gathered`` = X[rows] cut into contiguous ``chunk``-row pieces,
    when the caller keeps it across rounds (slicing one big tensor would copy each piece every round).
    ``X`` a tensor or a :class:`Rows` (each chunk is gathered from it, e.g. from host memory or a memmap).
    Returns the :class:`Scores` of every row."""
    opts = opts or {}
    # Outputs are allocated once and filled chunk by chunk: long-lived pieces interleaved with each chunk's
    # transient logits would fragment the heap (which keeps freed memory, see keep_freed_memory) by ~0.4 GB at
    # DomainNet scale.
    correct = torch.empty(rows.shape, dtype=torch.bool, device=Y.device)
    losses = torch.empty(rows.shape, dtype=torch.float32, device=Y.device)
    rows_x = rows.to(getattr(X, "index_device", X.device))
    for s in range(0, rows.shape[1], chunk):
        r = rows[:, s:s + chunk].clamp(min=0)
        x = X[rows_x[:, s:s + chunk].clamp(min=0)] if gathered is None else gathered[s // chunk]
        logits = cosine_logits(kind, params, x, heads, logit_scale, opts)
        y = Y[r]
        torch.eq(logits.argmax(-1), y, out=correct[:, s:s + chunk])
        losses[:, s:s + chunk] = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        del logits, x
    return Scores(correct, losses)
