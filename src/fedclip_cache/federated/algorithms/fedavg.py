"""FedAvg of the adapter (official FedCLIP) and FedProx."""
from __future__ import annotations

from .base import Algorithm, register_algorithm


@register_algorithm
class FedCLIP(Algorithm):
    name = "fedclip"
    summary = "FedAvg of the adapter, the official FedCLIP"
    reference = "Lu et al., FedCLIP, arXiv 2302.13485; McMahan et al., FedAvg, AISTATS 2017"


@register_algorithm
class FedProx(Algorithm):
    name = "fedprox"
    summary = "FedAvg + proximal term mu/2 ||w - w_global||^2 (--mu)"
    reference = "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020"
    uses = ("mu",)

    def proximal_mu(self) -> float:
        return self.cfg.mu
