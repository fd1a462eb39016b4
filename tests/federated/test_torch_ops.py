"""The private torch operations of local training (federated/torch_ops.py): present in the installed torch, equal to
torch.optim.Adam lane by lane, and refused with a clear message when missing."""
import re

import numpy as np
import pytest
import torch

from fedclip_cache.federated import torch_ops
from fedclip_cache.federated.adapters import ADAPTERS, init_params
from fedclip_cache.federated.train import LocalHyper, local_update


def test_the_installed_torch_has_every_private_op_local_training_calls():
    missing = torch_ops.missing_ops()
    assert not missing, (f"torch {torch.__version__} lacks torch.{', torch.'.join(missing)}, which "
                         f"fedclip_cache/federated/torch_ops.py calls (checked against torch "
                         f"{torch_ops.CHECKED_WITH}): adapt torch_ops.py to this torch")


def test_fused_adam_steps_each_lane_as_its_own_torch_optim_adam():
    g = torch.Generator().manual_seed(0)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.2)
    start = torch.randn(3, 5, 4, generator=g)
    grads_per_step = [torch.randn(3, 5, 4, generator=g) for _ in range(4)]
    busy = [3, 3, 2, 1]  # lanes still training at each step: a prefix, each lane with its own step count

    params, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    steps = [torch.zeros(()) for _ in range(3)]
    for k, grad in zip(busy, grads_per_step):
        torch_ops.increment_steps(steps[:k])
        torch_ops.fused_adam_(list(params[:k].unbind(0)), list(grad[:k].contiguous().unbind(0)),
                              list(m[:k].unbind(0)), list(v[:k].unbind(0)), steps[:k], **hp)
    assert [float(s) for s in steps] == [4.0, 3.0, 2.0]

    for lane in range(3):
        w = torch.nn.Parameter(start[lane].clone())
        opt = torch.optim.Adam([w], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                               weight_decay=hp["weight_decay"])
        for k, grad in zip(busy, grads_per_step):
            if lane < k:
                w.grad = grad[lane].clone()
                opt.step()
        torch.testing.assert_close(params[lane], w.detach(), rtol=1e-6, atol=1e-7)


def test_a_missing_op_is_refused_naming_it_and_the_checked_torch(monkeypatch):
    monkeypatch.delattr(torch, "_fused_adam_")
    assert torch_ops.missing_ops() == ["_fused_adam_"]
    p = {n: v.unsqueeze(0) for n, v in init_params("linear", 4, 4, 0).items()}
    X, Y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    heads = torch.nn.functional.normalize(torch.randn(1, 2, 4), dim=-1)
    expected = (f"torch {torch.__version__} has no torch._fused_adam_, which local training calls (checked against "
                f"torch {torch_ops.CHECKED_WITH})")
    with pytest.raises(torch_ops.MissingTorchOp, match=re.escape(expected)):
        local_update(ADAPTERS["linear"], p, X, Y, heads, [[np.arange(6)]], LocalHyper())
