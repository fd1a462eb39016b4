"""Training several clients' prompt parameters side by side: one text-tower pass per step over every active
client's batch (the text tower's cost is per step, not per image: bench/README "bf16 training" measured one pass for
all sampled clients 1.72x faster in fp32 than one per client). Shared by CoOp/PromptFL's contexts
(:class:`prompts.PromptLearner`) and FedPGP's sigma, U, V (:class:`pgp.PGPLearner`): one SGD rule for both."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch


class StackedBatch(NamedTuple):
    """Step t's batches of the active clients, padded to the widest: features (A, B, D), labels (A, B), a validity
    mask (A, B) and each client's real batch size (A,)."""

    xs: torch.Tensor
    ys: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor


def stacked_batch(batches: Sequence[np.ndarray], X, Y: torch.Tensor, device: torch.device) -> StackedBatch:
    """Gather the active clients' batches (row indices) from the cache's features ``X`` and labels ``Y``."""
    index_device = getattr(X, "index_device", getattr(X, "device", "cpu"))
    rows = [torch.from_numpy(np.asarray(b)) for b in batches]
    width = max(len(b) for b in rows)
    xs = torch.zeros(len(rows), width, X.shape[1], device=device)
    ys = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), width, device=device)
    for k, b in enumerate(rows):
        xs[k, :len(b)] = X[b.to(index_device)].float().to(device)
        ys[k, :len(b)] = Y[b.to(Y.device)]
        valid[k, :len(b)] = 1
    return StackedBatch(xs, ys, valid, torch.tensor([len(b) for b in rows], device=device, dtype=torch.float32))


LossFn = Callable[[dict, StackedBatch], torch.Tensor]


def sgd_side_by_side(params: dict, schedules: list[list[np.ndarray]], X, Y: torch.Tensor, loss_fn: LossFn,
                     lr: float, momentum: float, weight_decay: float) -> dict:
    """SGD of several clients at once: ``params[name]`` stacks the clients' tensors (A, ...); step t updates every
    client that has a t-th batch by the gradient of ``loss_fn`` (the sum of the active clients' own losses, so each
    gets its own gradient), with torch.optim.SGD's semantics (``g += weight_decay * w; buf = momentum * buf + g;
    w -= lr * buf``; fresh buffers per call)."""
    p = {n: v.detach().clone() for n, v in params.items()}
    buf = {n: torch.zeros_like(v) for n, v in p.items()} if momentum else None
    device = next(iter(p.values())).device
    for t in range(max((len(s) for s in schedules), default=0)):
        active = [k for k, s in enumerate(schedules) if t < len(s)]
        a = torch.tensor(active, device=device)
        w = {n: v[a] for n, v in p.items()}
        leaves = {n: v.detach().requires_grad_(True) for n, v in w.items()}
        loss = loss_fn(leaves, stacked_batch([schedules[k][t] for k in active], X, Y, device))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for (n, v), g in zip(w.items(), grads):
            if weight_decay:
                g = g + weight_decay * v
            if buf is not None:
                g = buf[n][a] = momentum * buf[n][a] + g
            p[n][a] = v - lr * g
    return p
