"""Scale behaviour of the federate path: denormals flushed on every computing thread (and results unchanged),
features never copied whole (memmap input), streaming of features per batch / evaluation chunk."""
import warnings

import numpy as np
import pytest
import torch

from fedclip_cache import open_cache
from fedclip_cache.federated import loop
from fedclip_cache.federated.adapters import ADAPTERS, init_params
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.fpenv import flush_denormals, workers_flush_denormals
from fedclip_cache.federated.protocols import build_experiments
from fedclip_cache.federated.results import federate
from fedclip_cache.federated.train import LocalHyper, Rows, batch_schedule, local_update, reference_local_update
from fedclip_cache.synthetic import write_synthetic_cache

SIZES = {"art": 160, "cartoon": 130, "photo": 90, "sketch": 200}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return open_cache(write_synthetic_cache(tmp_path_factory.mktemp("syn") / "c", SIZES, 5, dim=48, seed=1))


def test_denormals_are_flushed_on_every_compute_thread_and_restored():
    torch.full((1 << 20,), 1.0).sin()  # make sure torch's worker threads exist before we switch
    before = workers_flush_denormals()
    with flush_denormals() as where:
        assert where in ("all threads", "caller", "unsupported")
        if where == "all threads":  # a denormal product is 0 in every part of a multi-threaded op
            assert all(workers_flush_denormals()), torch.get_num_threads()
        if where != "unsupported":  # at least the calling thread flushes
            assert torch.tensor([1e-39]).mul(0.5).view(torch.int32).item() == 0
    assert workers_flush_denormals() == before
    with flush_denormals(False) as where:
        assert where == "off" and workers_flush_denormals() == before


def test_federate_flushes_denormals_while_it_runs(syn, monkeypatch):
    seen = []
    orig = loop.local_update

    def spy(*a, **k):
        seen.append(all(workers_flush_denormals(1 << 18)))
        return orig(*a, **k)

    monkeypatch.setattr(loop, "local_update", spy)
    federate(syn, FederateConfig(rounds=1, heldout=["photo"]))
    federate(syn, FederateConfig(rounds=1, heldout=["photo"], keep_denormals=True))
    with flush_denormals() as where:
        pass
    if where == "all threads":
        assert seen == [True, False]


@pytest.mark.parametrize("loss", ["contrastive", "ce"])
def test_vectorised_equals_plain_loop_with_denormals_flushed(syn, loss):
    X, Y = torch.from_numpy(syn.features), torch.from_numpy(syn.labels)
    heads = torch.nn.functional.normalize(torch.from_numpy(syn.text_embeddings[0]), dim=-1)
    hp = LocalHyper(lr=1e-3, batch_size=8, epochs=2, loss=loss)
    rng = np.random.default_rng(0)
    trains = [np.sort(rng.choice(len(Y), n, replace=False)) for n in (65, 40, 17)]
    starts = [init_params("fedclip", 48, 24, seed=s) for s in range(3)]
    schedules = [batch_schedule(t, 0, 1, key, hp) for key, t in enumerate(trains)]
    stacked = {n: torch.stack([s[n] for s in starts]) for n in starts[0]}
    with flush_denormals():
        vec = local_update(ADAPTERS["fedclip"], stacked, X, Y, heads.expand(3, -1, -1), schedules, hp)
        for lane in range(3):
            ref = reference_local_update(ADAPTERS["fedclip"], starts[lane], X, Y, heads, schedules[lane], hp)
            for n in ref:
                torch.testing.assert_close(vec[n][lane], ref[n], rtol=1e-5, atol=1e-6)
    plain = local_update(ADAPTERS["fedclip"], stacked, X, Y, heads.expand(3, -1, -1), schedules, hp)
    for n in plain:  # flushing changes nothing beyond float noise
        torch.testing.assert_close(vec[n], plain[n], rtol=1e-5, atol=1e-6)


def test_flushing_leaves_federate_results_unchanged(syn, tmp_path):
    def run(keep):
        out = tmp_path / f"keep{keep}"
        s = federate(syn, FederateConfig(rounds=4, lr=1e-3, heldout=["photo", "art"], keep_denormals=keep), out=out)
        return s, torch.load(out / "adapter.pt")

    a, pa = run(False)
    b, pb = run(True)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-4, atol=1e-6)
    for ea, eb in zip(a["experiments"], b["experiments"]):
        assert ea["best"]["round"] == eb["best"]["round"]
        assert ea["best"]["heldout"] == pytest.approx(eb["best"]["heldout"], abs=1e-9)


def _memmap_features(cache, tmp_path):
    path = tmp_path / "features.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=cache.features.shape)
    mm[:] = cache.features
    mm.flush()
    del mm
    return np.lib.format.open_memmap(path, mode="r")


@pytest.mark.parametrize("head", ["text", "prototype"])
def test_read_only_memmap_features_train_without_a_copy(syn, tmp_path, head, monkeypatch):
    ref = federate(syn, FederateConfig(rounds=2, lr=1e-3, heldout=["photo"], head=head))
    mm_cache = open_cache(syn.path, load_features=False)
    mm_cache.features = _memmap_features(syn, tmp_path)
    wrapped = []
    orig = loop.Rows.__init__

    def spy(self, host, *a, **k):
        orig(self, host, *a, **k)
        wrapped.append(self)

    monkeypatch.setattr(loop.Rows, "__init__", spy)
    monkeypatch.setattr(loop, "EVAL_GATHER_MAX_BYTES", 0)  # evaluation gathers chunk by chunk from the memmap too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning escapes
        got = federate(mm_cache, FederateConfig(rounds=2, lr=1e-3, heldout=["photo"], head=head))
    # the training loop reads the memmap's own memory: no whole copy was made
    (rows,) = wrapped
    assert rows.data.data_ptr() == mm_cache.features.ctypes.data
    assert isinstance(mm_cache.features, np.memmap)
    assert got["experiments"] == ref["experiments"]


def test_streamed_rows_equal_resident_rows(syn):
    """The GPU streaming path (features stay in host memory, gathered per batch / chunk) on CPU: forced with
    ``stream=True``; the same numbers as the resident path. Untested on CUDA itself (no GPU here)."""
    X = torch.from_numpy(syn.features)
    streamed = Rows(X, "cpu", resident=False)
    assert streamed.data is None and streamed.index_device.type == "cpu"
    idx = torch.tensor([[3, 0, 5], [7, 7, 1]])
    torch.testing.assert_close(streamed[idx], X[idx], rtol=0, atol=0)
    cfg = FederateConfig(rounds=2, lr=1e-3, heldout=["cartoon"])
    exps = build_experiments(syn, cfg)
    a = loop.run_loop(syn, cfg, exps, stream=False)
    b = loop.run_loop(syn, cfg, exps, stream=True)
    np.testing.assert_array_equal(a.acc, b.acc)
    for n in a.final_params:
        torch.testing.assert_close(a.final_params[n], b.final_params[n], rtol=0, atol=0)
