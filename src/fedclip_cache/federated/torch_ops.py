"""The private torch operations local training relies on, behind one small adapter (checked against torch 2.14.1).

``local_update`` steps Adam for every lane of a round at once. torch.optim.Adam would need one optimiser per lane
and a Python loop over them; instead two of torch's own private kernels are called directly:

* ``torch._foreach_add_`` adds one to every lane's step counter in one call;
* ``torch._fused_adam_`` is torch.optim.Adam's fused kernel (``Adam(fused=True)`` calls it): one call updates the
  busy lanes' parameters and moments, each lane with its own step count -- exactly torch.optim.Adam per client
  (``reference_local_update`` is that plain loop; the tests hold the two equal).

Neither is public API. ``tests/federated/test_torch_ops.py`` fails with a clear message when either disappears or
changes its arguments; here a missing one raises :class:`MissingTorchOp` naming the torch version it was checked
against, instead of an AttributeError deep in a round.
"""
from __future__ import annotations

import torch

CHECKED_WITH = "2.14.1"  # the torch version these calls were written and tested against
PRIVATE_OPS = ("_foreach_add_", "_fused_adam_")


class MissingTorchOp(RuntimeError):
    """The installed torch lacks a private operation local training calls."""


def missing_ops() -> list[str]:
    """The private operations the installed torch lacks (empty when local training can run)."""
    return [name for name in PRIVATE_OPS if not hasattr(torch, name)]


def _op(name: str):
    op = getattr(torch, name, None)
    if op is None:
        raise MissingTorchOp(f"torch {torch.__version__} has no torch.{name}, which local training calls (checked "
                             f"against torch {CHECKED_WITH}): install that torch or update "
                             f"fedclip_cache/federated/torch_ops.py")
    return op


def increment_steps(steps: list[torch.Tensor]) -> None:
    """Add one to every step counter of ``steps`` (0-d float32 tensors), in place, in one call."""
    _op("_foreach_add_")(steps, 1.0)


def fused_adam_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
                beta2: float, weight_decay: float, eps: float) -> None:
    """One step of torch.optim.Adam (coupled weight decay, no amsgrad, minimising) for each of the parallel lists,
    in place; ``steps`` already counts this step. Tensors must be dense (contiguous)."""
    _op("_fused_adam_")(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
