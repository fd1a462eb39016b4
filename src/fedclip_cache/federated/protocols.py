"""Protocols: who are the clients, which data each trains/validates/tests on, and what is held out.

* ``lodo`` (official): each held-out domain in turn is an unseen client, 100 % test, never trained on and never used
  for model selection; every other domain is a training client.
* ``personal``: every domain is a training client; each is scored on its own test split.

Each training client is split 60/20/20 by a seeded shuffle (seeded by the client's name, so a domain gets the same
split in every held-out run), with the official boundaries ``int(.6n)``, ``int(.2n)``, ``int(.2n)``; the 0-2
samples left over are dropped as in the official code (counted in the summary) or, with ``--split-tail test``,
given to the test split.

Two protocols of the prompt-learning literature apply on top of either, to every algorithm:

* ``--shots K`` (CoOp, PromptFL): each client's *training* split keeps K images per class (:func:`few_shot`);
  validation and test splits are those of the full data.
* ``--base-to-novel`` (FedTPG, Qiu et al., ICLR 2024; CoCoOp, Zhou et al., CVPR 2022): the first ``ceil(C/2)``
  classes by index are *base*, the rest *novel* (:func:`class_split`, FedTPG's ``math.ceil(n / 2)``); training and
  validation splits keep base-class images only; test splits are scored on base and novel images separately, each
  among its own classes, and summarised by their harmonic mean (:func:`harmonic_mean`).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..cache.reader import FeatureCache
from .config import ConfigError, FederateConfig
from .flwr_partition import FLWR_PARTITIONS, FlwrOptions, flwr_partition
from .partition import partition


@dataclass
class Client:
    name: str
    train: np.ndarray  # row indices into the cache
    val: np.ndarray
    test: np.ndarray
    dropped: int = 0  # samples in no split (the official split's floor remainder, --split-tail drop)
    short: dict[int, int] = field(default_factory=dict)  # --shots K: class -> images kept, for classes with < K


@dataclass
class Experiment:
    """One federated training run: a set of training clients and, for LODO, the held-out domain."""

    name: str
    seed: int
    clients: list[Client]
    heldout_name: Optional[str] = None
    heldout: Optional[np.ndarray] = None


def experiment_name(heldout: Optional[str], seed: int) -> str:
    """The name of the experiment that holds ``heldout`` out (None: the personal protocol) with ``seed``:
    ``heldout=photo/seed0`` or ``personal/seed0``. It seeds the batches (``train.lane_key``) and the sampling
    (``loop.sample_lanes``), so ``federate``, a Flower site and the ServerApp must all name a run by it."""
    return f"heldout={heldout}/seed{seed}" if heldout is not None else f"personal/seed{seed}"


def federation_name(cfg: FederateConfig) -> str:
    """The name of the one experiment a Flower deployment runs (at most one held-out domain, one seed)."""
    return experiment_name(cfg.heldout[0] if cfg.heldout else None, cfg.seed)


def _key(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def split_indices(idx: np.ndarray, fractions, seed: int, name: str, tail: str = "drop"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded shuffle, then the official boundaries (PersonalizedFL ``getfeadataloader``): train = the first
    ``int(f0 n)``, val = the next ``int(f1 n)``, test = the next ``int(f2 n)``. The 0-2 samples those floors leave
    over are dropped (``tail="drop"``, the official behaviour; see :func:`dropped`) or appended to test
    (``tail="test"``)."""
    n = len(idx)
    perm = idx[np.random.default_rng([seed, _key(name)]).permutation(n)]
    n_tr, n_va, n_te = (int(n * f) for f in fractions)
    end = n if tail == "test" else n_tr + n_va + n_te
    return np.sort(perm[:n_tr]), np.sort(perm[n_tr:n_tr + n_va]), np.sort(perm[n_tr + n_va:end])


def _split_from_cache(cache: FeatureCache, idx: np.ndarray, name: str):
    s = cache.splits[idx]
    unknown = sorted(set(s.tolist()) - {"train", "val", "test"})
    if unknown:
        raise ConfigError(f"--split-source cache: client {name} has rows with split {unknown[0]!r}; the cache's "
                          f"split column must say train, val or test on every row")
    return idx[s == "train"], idx[s == "val"], idx[s == "test"]


def _make_clients(cache: FeatureCache, pool: np.ndarray, cfg: FederateConfig, seed: int) -> list[Client]:
    units = cache.domains if cfg.client_key == "domain" else cache.clients
    groups: list[tuple[str, np.ndarray]] = []
    if cfg.partition == "none":
        for u in sorted(set(units[pool].tolist())):
            groups.append((u, pool[units[pool] == u]))
    else:
        scopes = ([(u, pool[units[pool] == u]) for u in sorted(set(units[pool].tolist()))]
                  if cfg.partition_scope == "domain" else [("pooled", pool)])
        for scope, idx in scopes:
            if cfg.partition in FLWR_PARTITIONS:  # flwr-datasets' seed is --seed itself (its default: 42)
                parts = flwr_partition(cfg.partition, cache.labels[idx], cfg.num_clients, seed, FlwrOptions.of(cfg))
            else:
                parts = partition(cfg.partition, cache.labels[idx], cfg.num_clients, seed + _key(scope) % 10_000,
                                  cfg.alpha, cfg.classes_per_client)
            groups += [(f"{scope}#{i}", idx[p]) for i, p in enumerate(parts)]
    return [split_client(cache, name, idx, cfg, seed) for name, idx in groups]


def split_client(cache: FeatureCache, name: str, idx: np.ndarray, cfg: FederateConfig, seed: int) -> Client:
    """Client ``name`` holding rows ``idx``: its train/val/test splits (``--split-source``: seeded by the seed and
    the client's name, or the cache's split column) and the rows they leave over; then the protocols: with
    ``--base-to-novel`` its train and val splits keep base-class rows only, with ``--shots K`` its train split
    keeps K rows per class (:func:`few_shot`). ``federate`` and a Flower site with its own cache both form their
    clients here."""
    tr, va, te = (_split_from_cache(cache, idx, name) if cfg.split_source == "cache"
                  else split_indices(idx, cfg.split, seed, name, cfg.split_tail))
    dropped = int(len(idx) - len(tr) - len(va) - len(te))
    if cfg.base_to_novel:
        base = class_split(len(cache.classes)).is_base(cache.labels)
        tr, va = tr[base[tr]], va[base[va]]
    short: dict[int, int] = {}
    if cfg.shots is not None:
        tr, short = few_shot(cache.labels, tr, cfg.shots, seed, name)
    return Client(name, tr, va, te, dropped, short)


def few_shot(labels: np.ndarray, train: np.ndarray, shots: int, seed: int, name: str
             ) -> tuple[np.ndarray, dict[int, int]]:
    """``--shots K``: the first K rows of each class of ``train`` in a permutation seeded by (seed, client name,
    class) alone, so every algorithm trains on the same images and the rows of K are a subset of those of any
    K' > K. A class with fewer than K rows keeps all of them; returns the kept rows (sorted) and, for such classes,
    class -> rows kept (a class the client does not hold at all is not listed)."""
    y = labels[train]
    kept, short = [], {}
    for c in np.unique(y):
        rows = np.sort(train[y == c])
        perm = np.random.default_rng([seed, _key(name), int(c)]).permutation(len(rows))
        kept.append(rows[perm[:shots]])
        if len(rows) < shots:
            short[int(c)] = int(len(rows))
    return (np.sort(np.concatenate(kept)) if kept else train[:0]), short


@dataclass(frozen=True)
class ClassSplit:
    """``--base-to-novel``'s classes: ``base`` and ``novel`` class indices, in order."""

    base: np.ndarray
    novel: np.ndarray

    def is_base(self, labels: np.ndarray) -> np.ndarray:
        """Whether each label is a base class."""
        return np.asarray(labels) < len(self.base)

    def local_labels(self, labels: np.ndarray) -> np.ndarray:
        """Each label as an index among its own group's classes (base: 0..nb-1, novel: 0..nn-1), the labels every
        base-to-novel head (base classes only, novel classes only) is scored and trained against."""
        labels = np.asarray(labels)
        return np.where(labels < len(self.base), labels, labels - len(self.base))


def class_split(num_classes: int) -> ClassSplit:
    """Base = the first ``ceil(C/2)`` classes by index, novel = the rest: FedTPG's rule (``dataloader/
    dm_federated.py``: ``m = math.ceil(n / 2)``, base ``[:m]``, new ``[m:]``), as CoCoOp's ``subsample_classes``."""
    m = math.ceil(num_classes / 2)
    return ClassSplit(np.arange(m), np.arange(m, num_classes))


def harmonic_mean(base: Optional[float], novel: Optional[float]) -> Optional[float]:
    """The harmonic mean of base and novel accuracy (CoCoOp, FedTPG): ``2 b n / (b + n)``; 0 when both are 0;
    None when either is unmeasured."""
    if base is None or novel is None:
        return None
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def build_experiments(cache: FeatureCache, cfg: FederateConfig, seeds: Optional[list[int]] = None) -> list[Experiment]:
    seeds = [cfg.seed] if seeds is None else seeds
    if cfg.base_to_novel and len(cache.classes) < 4:
        from .config import option_flag

        # with fewer than 4 classes the novel (or base) group has one class, scored among itself: always 100 %
        raise ConfigError(f"{option_flag('base_to_novel')}: the cache {cache.path} has {len(cache.classes)} class(es); "
                          f"base and novel need at least two classes each (4 or more in all), else accuracy "
                          f"among one class is always 100 %")
    domains = cache.domain_names
    all_rows = np.arange(len(cache))
    exps = []
    for seed in seeds:
        if cfg.protocol == "personal":
            exps.append(Experiment(experiment_name(None, seed), seed, _make_clients(cache, all_rows, cfg, seed)))
            continue
        heldouts = cfg.heldout or domains
        missing = [h for h in heldouts if h not in domains]
        if missing:
            raise ConfigError(f"--heldout {missing[0]!r} is not a domain of this cache; domains: {', '.join(domains)}")
        if len(domains) < 2:
            raise ConfigError("--protocol lodo needs at least two domains; use --protocol personal")
        for h in heldouts:
            held = all_rows[cache.domains == h]
            pool = all_rows[cache.domains != h]
            exps.append(Experiment(experiment_name(h, seed), seed, _make_clients(cache, pool, cfg, seed), h, held))
    check_measurable(exps, cfg)
    for e in exps:
        empty = [c.name for c in e.clients if len(c.train) == 0]
        if empty and cfg.algo not in ("zeroshot",):
            why = " of the base classes (--base-to-novel)" if cfg.base_to_novel else ""
            raise ConfigError(f"client {empty[0]} has no training samples{why} in {e.name}; use fewer clients or "
                              f"another partition")
    return exps


def check_measurable(exps: list[Experiment], cfg: FederateConfig) -> None:
    """Refuse a run that would score nothing: no client has validation or test data and no domain is held out
    (``--protocol personal --split 1,0,0``). It used to train, exit 0 and report ``None`` everywhere with "best
    round 1". A run with test or held-out data but no validation data is still meaningful: the summary reports its
    last round, with a note (``results.measurement_notes``)."""
    if any(e.heldout is not None and len(e.heldout) for e in exps):
        return
    if any(len(c.val) or len(c.test) for e in exps for c in e.clients):
        return
    from .config import option_flag

    why = split_said(cfg)
    largest = max((len(c.train) + len(c.val) + len(c.test) + c.dropped for e in exps for c in e.clients), default=0)
    raise ConfigError(f"{why}: no training client has validation or test data (the largest client has {largest} "
                      f"samples) and no domain is held out, so the run would measure nothing; give validation and "
                      f"test fractions (e.g. {option_flag('split')} 0.6,0.2,0.2), fewer and larger clients "
                      f"({option_flag('num_clients')}), or hold a domain out (--protocol lodo)")


def split_said(cfg: FederateConfig) -> str:
    """Where the clients' train/val/test splits come from, as the user set it: ``--split 1,0,0`` or the cache's
    split column (the words of every message about missing splits)."""
    from .config import option_flag

    if cfg.split_source == "random":
        return f"{option_flag('split')} {','.join(f'{x:g}' for x in cfg.split)}"
    return f"{option_flag('split_source')} cache: the cache's split column"
