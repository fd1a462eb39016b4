"""``--partition flwr-iid | flwr-dirichlet | flwr-pathological``: clients made by flwr-datasets' own partitioners
(``IidPartitioner``, ``DirichletPartitioner``, ``PathologicalPartitioner``), so a researcher who partitions with
flwr-datasets gets the same clients here.

What is delegated is exactly what ``FederatedDataset(dataset=..., partitioners={"train": P}, shuffle=S, seed=SEED)``
does before and during partitioning: the rows (a ``datasets.Dataset`` of the scope's labels, in cache order) are
shuffled with ``Dataset.shuffle(seed=SEED)`` when ``--flwr-shuffle`` (FederatedDataset's default), then ``P`` (built
with ``seed=SEED``, ``--min-partition-size``, ``--self-balancing``, ``--class-assignment``) cuts them; partition
``i``'s index set, mapped back to cache rows, is client ``i``. ``--seed 42`` is flwr-datasets' default seed.

Unlike the native ``iid`` / ``dirichlet`` / ``pathological`` (federated/partition.py), nothing is adjusted: flwr's
``min_partition_size`` is not lowered for small scopes, and a class no partition draws under
``--class-assignment random`` is left out of every client, as flwr-datasets leaves it (its warning is shown).
Requires ``pip install 'fedclip-cache[flwr-datasets]'``.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import FederateConfig

FLWR_PARTITIONS = ("flwr-iid", "flwr-dirichlet", "flwr-pathological")
CLASS_ASSIGNMENTS = ("random", "deterministic", "first-deterministic")  # PathologicalPartitioner's modes
EXTRA_HINT = "pip install 'fedclip-cache[flwr-datasets]'"
_BY = "label"  # the column the partitioners partition by
_ROW = "row"  # the cache row each sample came from


class FlwrOptions(NamedTuple):
    """The partitioner settings a run passes through (FederateConfig field in brackets)."""

    alpha: float = 0.5  # DirichletPartitioner alpha (--alpha)
    classes_per_partition: int = 2  # PathologicalPartitioner num_classes_per_partition (--classes-per-client)
    min_partition_size: int = 10  # DirichletPartitioner min_partition_size (--min-partition-size)
    self_balancing: bool = False  # DirichletPartitioner self_balancing (--self-balancing)
    class_assignment: str = "random"  # PathologicalPartitioner class_assignment_mode (--class-assignment)
    shuffle: bool = True  # FederatedDataset shuffle: rows shuffled with the seed first (--flwr-shuffle)

    @classmethod
    def of(cls, cfg: "FederateConfig") -> "FlwrOptions":
        return cls(cfg.alpha, cfg.classes_per_client, cfg.min_partition_size, cfg.self_balancing,
                   cfg.class_assignment, cfg.flwr_shuffle)


def _libraries(kind: str):
    try:
        import datasets
        from flwr_datasets import partitioner
    except ImportError as e:
        raise ConfigError(f"--partition {kind} delegates to flwr-datasets, which is not installed: "
                          f"{EXTRA_HINT} (or use --partition {kind[len('flwr-'):]}, no extra needed)") from e
    return datasets, partitioner


def make_partitioner(kind: str, num_partitions: int, seed: int, opts: FlwrOptions):
    """The flwr-datasets partitioner ``--partition kind`` delegates to, as a researcher would build it."""
    _, fp = _libraries(kind)
    if kind == "flwr-iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if kind == "flwr-dirichlet":
        return fp.DirichletPartitioner(num_partitions=num_partitions, partition_by=_BY, alpha=float(opts.alpha),
                                       min_partition_size=opts.min_partition_size,
                                       self_balancing=opts.self_balancing, seed=seed)
    if kind == "flwr-pathological":
        return fp.PathologicalPartitioner(num_partitions=num_partitions, partition_by=_BY,
                                          num_classes_per_partition=opts.classes_per_partition,
                                          class_assignment_mode=opts.class_assignment, seed=seed)
    raise ConfigError(f"--partition {kind!r} is not a flwr-datasets partitioner; choose {', '.join(FLWR_PARTITIONS)}")


def labels_dataset(kind: str, labels: np.ndarray, seed: int, shuffle: bool):
    """The ``datasets.Dataset`` the partitioner sees: columns ``label`` and ``row`` (0..n-1, cache order), shuffled
    as FederatedDataset shuffles (``Dataset.shuffle(seed=seed)``) when ``shuffle``."""
    datasets, _ = _libraries(kind)
    ds = datasets.Dataset.from_dict({_BY: np.asarray(labels).tolist(), _ROW: list(range(len(labels)))})
    return ds.shuffle(seed=seed) if shuffle else ds


def flwr_partition(kind: str, labels: np.ndarray, num_partitions: int, seed: int,
                   opts: FlwrOptions = FlwrOptions()) -> list[np.ndarray]:
    """Partition ``labels`` (one scope, cache order) with flwr-datasets: one sorted array of positions into
    ``labels`` per partition. flwr's refusals (too many partitions, Dirichlet re-draws exhausted, more classes per
    partition than classes) become one-line :class:`ConfigError`\\ s naming the option."""
    if num_partitions > len(labels):
        raise ConfigError(f"--partition {kind} --clients {num_partitions}: a scope holds only {len(labels)} samples; "
                          f"use at most {len(labels)} clients or --partition-scope pooled")
    part = make_partitioner(kind, num_partitions, seed, opts)
    part.dataset = labels_dataset(kind, labels, seed, opts.shuffle)
    try:
        with warnings.catch_warnings():  # one per Dirichlet re-draw; the last failure is the error below
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [np.sort(np.asarray(part.load_partition(i)[_ROW], dtype=np.int64)) for i in range(num_partitions)]
    except ValueError as e:  # flwr-datasets states the problem; one line, with our option names
        msg = " ".join(str(e).split())
        raise ConfigError(f"--partition {kind} (flwr-datasets {type(part).__name__}): {msg} "
                          f"[options: --clients, --alpha, --min-partition-size, --classes-per-client, "
                          f"--class-assignment]") from None
