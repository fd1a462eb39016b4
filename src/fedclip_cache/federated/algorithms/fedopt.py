"""Server optimisers: the clients run FedAvg's local update, the server treats the change of the average as a
gradient step (FedAvgM: SGD with momentum; FedAdam, FedYogi, FedAdagrad: adaptive, Reddi et al. 2021).

Each update is written to reproduce Flower 1.42's strategy of the same name operation for operation
(``flwr/server/strategy/fedavgm.py``, ``fedadam.py``, ``fedyogi.py``, ``fedadagrad.py``; tested step for step
against them), including its quirks: FedAdam's bias correction uses ``t + 1`` for server round ``t``, FedYogi
has no bias correction, FedAdagrad has no first-moment decay. The state (momentum, moments) lives in
``TrainState.extra``, stacked over experiments like the global model; every update is elementwise, so one call
serves all experiments.

Flower's numbers differ from ours in one place only: its FedAdam multiplies by a NumPy float64 ``eta_norm``, so under
NumPy 2 it returns float64 arrays from round 1 on; we keep the model's float32 (agreement ~1e-8).

Default server learning rates (``--server-lr``): Flower's, except where they wreck the FedCLIP adapter. An adaptive
server step moves every weight by about eta per round (round 1 of FedAdam/FedAdagrad: exactly eta * sign(delta)),
while the adapter's weights are ~U(+-0.044) and a client's round of Adam at 5e-5 moves one by at most ~2e-3.
Measured with ``bench/bench_fedopt.py`` (PACS-shaped synthetic cache: 4 domains of 1,670-2,500 rows, 7 classes,
D = 512, class_sep 0.3, domain_shift 1.5; official local settings; mean test accuracy of the training clients,
selected round / last round; chance 0.14; results in ``bench/results/fedopt-*.json``):

    held out sketch, seeds 0+1, 50 rounds:  fedclip 0.948/0.917   fedavgm (lr 1, momentum 0.9) 0.956/0.917
      fedadam    eta 0.1 (Flower) 0.578/0.320 (validation at chance for rounds 2-5)   1e-2 0.942/0.919
                 3e-3 0.939/0.908 (smoothest: validation never below 0.88)            1e-3 0.938/0.911
      fedyogi    eta 1e-2 (Flower) 0.947/0.902   3e-3 0.949/0.920   1e-3 0.949/0.932
      fedadagrad eta 0.1 (Flower) 0.427/0.173 (collapsed)   1e-2 0.922/0.845   3e-3 0.927/0.910   1e-3 0.888/0.888
    held out photo, seed 0, 30 rounds: fedclip 0.957/0.923; fedadam 0.1 0.857/0.597, 3e-3 0.963/0.921;
      fedyogi 1e-2 0.958/0.915; fedadagrad 0.1 0.293/0.134, 3e-3 0.935/0.904
    class_sep 0.6 (every setting ~1.000): Flower's fedadam 0.1 drops validation to 0.22 before recovering, its
      fedadagrad 0.1 ends at 0.158

Hence fedadam 3e-3 and fedadagrad 3e-3 (Flower: 0.1, which collapses to chance), fedyogi Flower's 1e-2 (on par
with fedclip), fedavgm Flower's 1.0. tau is Flower's everywhere.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import Algorithm, Params, ServerUpdate, register_algorithm

if TYPE_CHECKING:  # the registry is imported without torch (see base.py): tensor methods only
    import torch

REDDI = "Reddi et al., Adaptive Federated Optimization, ICLR 2021; Flower's strategy of the same name"


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root, as NumPy's (Flower's). torch's float32 CPU sqrt is 1 ulp off for ~18 % of
    elements on AVX-512, and the adaptive step divides by it every round; the float64 root rounded back to float32
    is exact. Costs one float64 copy of the model per round."""
    return t.double().sqrt().to(t.dtype) if t.is_floating_point() and t.element_size() == 4 else t.sqrt()


class ServerOptimizer(Algorithm):
    """Common ground: the server learning rate (``--server-lr``, else the algorithm's default) and ``tau``."""

    default_server_lr: ClassVar[float] = 1.0
    default_tau: ClassVar[float] = 0.0

    @property
    def server_lr(self) -> float:
        return self.cfg.server_lr if self.cfg.server_lr is not None else self.default_server_lr

    @property
    def tau(self) -> float:
        return self.cfg.tau if self.cfg.tau is not None else self.default_tau


@register_algorithm
class FedAvgM(ServerOptimizer):
    """Flower's FedAvgM: pseudo-gradient g = w - avg; momentum m = beta m + g (m = g in round 1); w -= lr m.
    Flower's default momentum is 0 (then FedAvgM is FedAvg); ours is --server-momentum's 0.9, Hsu et al.'s."""

    name = "fedavgm"
    summary = "FedAvg + server momentum on the pseudo-gradient (--server-lr, --server-momentum)"
    reference = ("Hsu et al., Measuring the Effects of Non-Identical Data Distribution, arXiv 1909.06335; "
                 "Flower's FedAvgM")
    uses = ("server_lr", "server_momentum")
    default_server_lr = 1.0  # Flower's

    def server_update(self, current: Params, averaged: Params, extra: dict, rnd: int) -> ServerUpdate:
        lr, beta = self.server_lr, self.cfg.server_momentum
        if lr == 1.0 and beta == 0.0:  # Flower skips the server step then: the average itself, bit for bit
            return ServerUpdate(averaged, extra)
        step = {n: current[n] - averaged[n] for n in current}  # updates are the opposite of gradients
        if beta > 0.0:
            if "momentum" in extra:
                step = {n: beta * extra["momentum"][n] + step[n] for n in step}
            extra = {**extra, "momentum": step}
        return ServerUpdate({n: current[n] - lr * step[n] for n in current}, extra)


class AdaptiveServer(ServerOptimizer):
    """Flower's FedOpt family: delta = avg - w; m = b1 m + (1 - b1) delta; v from ``second_moment``;
    w += eta_t m / (sqrt(v) + tau). Moments start at zero."""

    uses = ("server_lr", "server_beta1", "server_beta2", "tau")

    def beta1(self) -> float:
        return self.cfg.server_beta1

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_size(self, rnd: int) -> float:
        return self.server_lr

    def server_update(self, current: Params, averaged: Params, extra: dict, rnd: int) -> ServerUpdate:
        b1, eta, tau = self.beta1(), self.step_size(rnd), self.tau
        delta = {n: averaged[n] - current[n] for n in current}
        m0 = extra.get("m") or {n: d.new_zeros(d.shape) for n, d in delta.items()}
        v0 = extra.get("v") or {n: d.new_zeros(d.shape) for n, d in delta.items()}
        m = {n: b1 * m0[n] + (1 - b1) * d for n, d in delta.items()}
        v = {n: self.second_moment(v0[n], d) for n, d in delta.items()}
        new = {n: current[n] + eta * m[n] / (_sqrt(v[n]) + tau) for n in current}  # Flower's order of operations
        return ServerUpdate(new, {**extra, "m": m, "v": v})


@register_algorithm
class FedAdam(AdaptiveServer):
    name = "fedadam"
    summary = "Adam on the server (--server-lr, --server-beta1/2, --tau)"
    reference = REDDI
    default_server_lr = 3e-3  # Flower: 0.1, which collapses the adapter to chance (module docstring)
    default_tau = 1e-9  # Flower's

    def second_moment(self, v, delta):
        b2 = self.cfg.server_beta2
        return b2 * v + (1 - b2) * (delta * delta)

    def step_size(self, rnd: int) -> float:
        # Kingma & Ba's bias-corrected step, with Flower's exponent t + 1 for server round t (not t)
        b1, b2 = self.cfg.server_beta1, self.cfg.server_beta2
        return self.server_lr * (1 - b2 ** (rnd + 1.0)) ** 0.5 / (1 - b1 ** (rnd + 1.0))


@register_algorithm
class FedYogi(AdaptiveServer):
    name = "fedyogi"
    summary = "Yogi on the server: additive second moment (--server-lr, --server-beta1/2, --tau)"
    reference = REDDI
    default_server_lr = 1e-2  # Flower's (on par with fedclip, module docstring)
    default_tau = 1e-3  # Flower's

    def second_moment(self, v, delta):
        d2 = delta * delta
        return v - (1.0 - self.cfg.server_beta2) * d2 * (v - d2).sign()


@register_algorithm
class FedAdagrad(AdaptiveServer):
    name = "fedadagrad"
    summary = "Adagrad on the server (--server-lr, --tau)"
    reference = REDDI
    uses = ("server_lr", "tau")  # Flower fixes beta_1 = 0 and has no beta_2
    default_server_lr = 3e-3  # Flower: 0.1, which collapses the adapter to chance (module docstring)
    default_tau = 1e-9  # Flower's

    def beta1(self) -> float:
        return 0.0

    def second_moment(self, v, delta):
        return v + delta * delta
