"""Federated algorithms as units: one class per method, registered by name (see ``base.py``).

Adding an algorithm: a new module here with a ``@register_algorithm`` class, imported below, plus its tests.
"""
from .base import (ALGORITHMS, Algorithm, RoundContext, ServerUpdate, TrainState, algorithms_help, get_algorithm,
                   list_algorithms, register_algorithm)
from . import fedavg, fedopt, scaffold, baselines, prompt, fedpgp  # noqa: E402,F401  (registration = --help order)

__all__ = ["ALGORITHMS", "Algorithm", "RoundContext", "ServerUpdate", "TrainState", "algorithms_help", "get_algorithm",
           "list_algorithms", "register_algorithm", "make_algorithm"]


def make_algorithm(cfg) -> Algorithm:
    return get_algorithm(cfg.algo)(cfg)
