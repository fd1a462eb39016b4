"""``--partition flwr-iid|flwr-dirichlet|flwr-pathological`` (federated/flwr_partition.py): the clients are the ones
a researcher gets from flwr-datasets itself. The reference is flwr-datasets' own path, built here independently of
our module: ``FederatedDataset`` loading a Parquet file of the same labels (its own ``load_dataset`` and shuffle)
with the partitioner constructed as its documentation shows."""
from __future__ import annotations

import sys
from importlib.util import find_spec

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedclip_cache import open_cache
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.flwr_partition import FlwrOptions, flwr_partition
from fedclip_cache.federated.protocols import build_experiments
from fedclip_cache.sweep import point_id
from fedclip_cache.synthetic import write_synthetic_cache

needs_flwr = pytest.mark.skipif(find_spec("flwr_datasets") is None or find_spec("datasets") is None,
                                reason="flwr-datasets not installed (extra [flwr-datasets])")


def reference(tmp_path, labels, kind, seed, shuffle=True, **kw) -> list[set[int]]:
    """Partition ``labels`` with flwr-datasets as its users do: a Parquet file of the labels (and each row's
    position) loaded by FederatedDataset(shuffle, seed) with the partitioner; the rows each partition holds."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = kw.pop("num_partitions")
    part = {"iid": lambda: IidPartitioner(num_partitions=n),
            "dirichlet": lambda: DirichletPartitioner(num_partitions=n, partition_by="label", seed=seed, **kw),
            "pathological": lambda: PathologicalPartitioner(num_partitions=n, partition_by="label", seed=seed,
                                                            **kw)}[kind]()
    f = tmp_path / f"labels-{kind}-{seed}.parquet"
    pq.write_table(pa.table({"label": pa.array(labels, pa.int64()), "pos": pa.array(range(len(labels)))}), f)
    fds = FederatedDataset(dataset="parquet", data_files={"train": str(f)}, partitioners={"train": part},
                           shuffle=shuffle, seed=seed, cache_dir=str(tmp_path / "hf"))
    return [set(fds.load_partition(i, "train")["pos"]) for i in range(n)]


def labels_of(n=240, classes=6, seed=3) -> np.ndarray:
    """Unequal class sizes, in no particular order (as a cache's rows in a scope)."""
    rng = np.random.default_rng(seed)
    return rng.choice(classes, size=n, p=np.arange(1, classes + 1) / np.arange(1, classes + 1).sum())


CASES = [  # (our kind, reference kind, FlwrOptions fields, the partitioner's own arguments)
    ("flwr-iid", "iid", {}, {}),
    ("flwr-dirichlet", "dirichlet", {"alpha": 0.5}, {"alpha": 0.5}),
    ("flwr-dirichlet", "dirichlet", {"alpha": 0.3, "min_partition_size": 5, "self_balancing": True},
     {"alpha": 0.3, "min_partition_size": 5, "self_balancing": True}),
    ("flwr-pathological", "pathological", {"classes_per_partition": 2},
     {"num_classes_per_partition": 2}),  # class_assignment_mode random (flwr's default): classes can go unused
    ("flwr-pathological", "pathological", {"classes_per_partition": 3, "class_assignment": "first-deterministic"},
     {"num_classes_per_partition": 3, "class_assignment_mode": "first-deterministic"}),
    ("flwr-pathological", "pathological", {"classes_per_partition": 2, "class_assignment": "deterministic"},
     {"num_classes_per_partition": 2, "class_assignment_mode": "deterministic"}),
]


@needs_flwr
@pytest.mark.parametrize("kind,ref,opts,args", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("seed,shuffle", [(42, True), (7, False)])
def test_flwr_partition_equals_flwr_datasets(tmp_path, kind, ref, opts, args, seed, shuffle):
    labels = labels_of()
    ours = flwr_partition(kind, labels, 5, seed, FlwrOptions(shuffle=shuffle, **opts))
    theirs = reference(tmp_path, labels, ref, seed, shuffle, num_partitions=5, **args)
    assert [set(p.tolist()) for p in ours] == theirs
    assert all(np.all(np.diff(p) > 0) for p in ours)  # sorted, no repeats
    if kind != "flwr-pathological":  # iid and Dirichlet place every sample exactly once
        assert sorted(np.concatenate(ours).tolist()) == list(range(len(labels)))


@needs_flwr
def test_iid_is_shuffled_then_sharded_and_dirichlet_is_skewed():
    """Sanity beyond equality: flwr-iid on class-sorted rows (a cache's order) still mixes classes, because
    FederatedDataset shuffles first; without the shuffle IidPartitioner's contiguous shards are class blocks."""
    labels = np.repeat(np.arange(4), 50)
    mixed = flwr_partition("flwr-iid", labels, 4, 42)
    blocks = flwr_partition("flwr-iid", labels, 4, 42, FlwrOptions(shuffle=False))
    assert all(len(set(labels[p])) == 4 for p in mixed)
    assert [sorted(set(labels[p])) for p in blocks] == [[0], [1], [2], [3]]
    skew = flwr_partition("flwr-dirichlet", labels, 4, 42, FlwrOptions(alpha=0.05, min_partition_size=1))
    assert max(np.bincount(labels[p], minlength=4).max() / len(p) for p in skew) > 0.9


@needs_flwr
@pytest.mark.parametrize("scope", ["pooled", "domain"])
def test_federate_clients_are_flwr_datasets_partitions(tmp_path, scope):
    """End to end: the training clients federate builds from a cache (split tail to test, so a client's rows are
    train + val + test) are flwr-datasets' partitions of the scope's labels in cache order, seed = --seed."""
    cache = open_cache(write_synthetic_cache(tmp_path / "c", {"a": 70, "b": 90}, 5, dim=8))
    cfg = FederateConfig(protocol="personal", partition="flwr-dirichlet", alpha=0.4, num_clients=3, seed=42,
                         partition_scope=scope, split_tail="test", min_partition_size=4)
    (exp,) = build_experiments(cache, cfg)
    scopes = {"pooled": np.arange(len(cache))} if scope == "pooled" else \
        {d: np.flatnonzero(cache.domains == d) for d in ("a", "b")}
    want = {}
    for name, rows in scopes.items():
        parts = reference(tmp_path, cache.labels[rows], "dirichlet", 42, num_partitions=3, alpha=0.4,
                          min_partition_size=4)
        want.update({f"{name}#{i}": {int(rows[j]) for j in p} for i, p in enumerate(parts)})
    got = {c.name: set(np.concatenate([c.train, c.val, c.test]).tolist()) for c in exp.clients}
    assert got == want


@needs_flwr
def test_flwr_refusals_are_one_line_and_name_the_options(tmp_path, monkeypatch, capsys, one_line_error, run):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 40, "b": 40}, 4, dim=8)
    base = ("federate", cache, "--protocol", "personal", "--rounds", "1", "-o", tmp_path / "r")
    one_line_error(*run(*base, "--partition", "flwr-dirichlet", "--alpha", "0.01", "--clients", "6"),
                   "--partition flwr-dirichlet (flwr-datasets DirichletPartitioner): The max number of attempts "
                   "(10) was reached", "--min-partition-size")
    one_line_error(*run(*base, "--partition", "flwr-pathological", "--classes-per-client", "5"),
                   "flwr-datasets PathologicalPartitioner", "num_classes_per_partition")
    one_line_error(*run(*base, "--partition", "flwr-iid", "--clients", "50"),
                   "--partition flwr-iid --clients 50: a scope holds only 40 samples")
    one_line_error(*run(*base, "--partition", "flwr-pathological", "--class-assignment", "first"),
                   "--class-assignment")
    one_line_error(*run(*base, "--partition", "flwr-dirichlet", "--min-partition-size", "-1"),
                   "--min-partition-size -1: must be at least 0")
    assert not (tmp_path / "r").exists()


def test_missing_extra_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys, one_line_error, run):
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedclip-cache\[flwr-datasets\]'"):
        flwr_partition("flwr-iid", np.zeros(10, int), 2, 0)
    cache = write_synthetic_cache(tmp_path / "c", {"a": 40, "b": 40}, 4, dim=8)
    one_line_error(*run("federate", cache, "--protocol", "personal", "--partition", "flwr-dirichlet", "--rounds",
                        "1"), "--partition flwr-dirichlet delegates to flwr-datasets, which is not installed: "
                              "pip install 'fedclip-cache[flwr-datasets]' (or use --partition dirichlet")


def test_sweep_point_ids_are_unchanged_at_the_new_options_defaults():
    """The four new options left at flwr's defaults do not enter a sweep point's id (ids computed before they
    existed), and changing one does."""
    assert point_id(FederateConfig()) == "a9b1c6f344c8"
    assert point_id(FederateConfig(partition="dirichlet", alpha=0.3, num_clients=30)) == "17affebee498"
    changed = [FederateConfig(min_partition_size=5), FederateConfig(self_balancing=True),
               FederateConfig(class_assignment="deterministic"), FederateConfig(flwr_shuffle=False)]
    assert len({point_id(c) for c in changed} | {"a9b1c6f344c8"}) == 5


def test_sweep_preflight_refuses_more_classes_per_client_than_the_cache_has(tmp_path):
    """Before any work, as for --partition pathological (flwr-datasets would refuse only when the point runs)."""
    from fedclip_cache.sweep import preflight

    cache = write_synthetic_cache(tmp_path / "c", {"a": 20, "b": 20}, 3, dim=8)
    with pytest.raises(ConfigError, match=r"--classes-per-client 4: the cache has only 3 classes"):
        preflight(cache, [FederateConfig(partition="flwr-pathological", classes_per_client=4)])
    preflight(cache, [FederateConfig(partition="flwr-pathological", classes_per_client=3)])


def test_partitioner_options_the_partition_does_not_read_are_noted():
    """--min-partition-size etc. set with a --partition that does not read them: reported as ignored."""
    from fedclip_cache.federated.config import FederateConfig

    cfg = FederateConfig(partition="flwr-iid", min_partition_size=7, self_balancing=True,
                         class_assignment="deterministic")
    assert cfg.ignored_partition_options() == ["class_assignment", "min_partition_size", "self_balancing"]
    assert FederateConfig(partition="flwr-dirichlet", min_partition_size=7).ignored_partition_options() == []
    assert FederateConfig(partition="none", flwr_shuffle=False).ignored_partition_options() == ["flwr_shuffle"]
    assert FederateConfig().ignored_partition_options() == []
