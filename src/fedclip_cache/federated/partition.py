"""Label-shift partitioners, named and behaving like flwr-datasets' (``IidPartitioner``, ``DirichletPartitioner``,
``PathologicalPartitioner``), as pure functions of (labels, seed) -> list of index arrays.

Every sample lands in exactly one partition; where a flwr-datasets setting would leave samples unassigned
(a class no partition holds) we raise instead of dropping data.
"""
from __future__ import annotations

import numpy as np

from .config import ConfigError


def iid(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then cut into equal contiguous shards (flwr's IidPartitioner shards contiguously; cache rows are
    sorted by path, i.e. by class, so we shuffle first)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_partition_size: int = 10,
              max_tries: int = 10) -> list[np.ndarray]:
    """Per class, draw proportions ~ Dir(alpha) over partitions and cut that class's samples accordingly;
    re-draw (up to ``max_tries`` more times) until every partition has ``min(min_partition_size, n // partitions)``
    samples (flwr's defaults, 10 samples and 10 re-draws; lowered to ``n // partitions`` where the n samples cannot
    give every partition 10). The README states this rule; :func:`dirichlet_minimum` is its one formula."""
    rng = np.random.default_rng(seed)
    min_size = dirichlet_minimum(len(labels), num_partitions, min_partition_size)
    for _ in range(max_tries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for k in np.unique(labels):
            idx = np.flatnonzero(labels == k)
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(f"Dirichlet partition with --alpha {alpha} left a client with fewer than {min_size} samples "
                      f"(the minimum: min({min_partition_size}, {len(labels)} samples // {num_partitions} clients)) "
                      f"after {max_tries} re-draws; raise --alpha or lower --clients")


def dirichlet_minimum(n: int, num_partitions: int, min_partition_size: int = 10) -> int:
    """The fewest samples a Dirichlet partition must give every client: flwr's 10, or an equal share of the n
    samples where there are fewer than 10 per client."""
    return min(min_partition_size, n // num_partitions)


def pathological(labels: np.ndarray, num_partitions: int, classes_per_partition: int, seed: int,
                 mode: str = "first-deterministic") -> list[np.ndarray]:
    """Each partition holds ``classes_per_partition`` classes; a class's samples are split evenly between the
    partitions holding it. ``first-deterministic``: partition i gets class i mod C first, the rest at random."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    c = len(classes)
    k = min(classes_per_partition, c)
    assign = []
    for i in range(num_partitions):
        if mode == "deterministic":
            chosen = [classes[(i + j) % c] for j in range(k)]
        else:
            first = [classes[i % c]] if mode == "first-deterministic" else []
            rest = [x for x in classes if x not in first]
            chosen = first + list(rng.choice(rest, size=k - len(first), replace=False))
        assign.append(set(int(x) for x in chosen))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cl in classes:
        holders = [i for i, s in enumerate(assign) if int(cl) in s]
        if not holders:
            raise ConfigError(f"pathological partition: class {cl} is held by no client, so its samples would be "
                              f"lost; raise --clients or --classes-per-client")
        idx = rng.permutation(np.flatnonzero(labels == cl))
        for h, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[h].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def partition(kind: str, labels: np.ndarray, num_partitions: int, seed: int, alpha: float = 0.5,
              classes_per_partition: int = 2) -> list[np.ndarray]:
    if kind == "iid":
        return iid(len(labels), num_partitions, seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_partitions, alpha, seed)
    if kind == "pathological":
        return pathological(labels, num_partitions, classes_per_partition, seed)
    raise ConfigError(f"--partition {kind!r} unknown; choose none, iid, dirichlet or pathological")
