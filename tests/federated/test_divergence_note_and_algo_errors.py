"""Adversarial probes of the algorithm registry, partial participation and option plumbing."""
import pytest
import torch

from fedclip_cache import FederateConfig, federate
from fedclip_cache.errors import ConfigError
from fedclip_cache.synthetic import write_synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(write_synthetic_cache(tmp_path_factory.mktemp("c") / "c", {"a": 80, "b": 60, "c": 50}, 4, dim=16,
                                     seed=1, class_sep=0.6, domain_shift=1.5))


def test_diverged_adapter_is_not_reported_silently(cache, tmp_path):
    """A huge --server-lr (accepted: > 0 and finite) turns the adapter into NaN in round 1; the summary then showed
    finite accuracies (argmax of NaN logits) and no note at all."""
    s = federate(cache, FederateConfig(algo="fedavgm", server_lr=1e300, rounds=2, batch_size=16, lr=1e-3,
                                       heldout=["a"]), out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    assert not all(torch.isfinite(v).all() for v in final.values())
    assert any("non-finite" in n for n in s["notes"]), s["notes"]


def test_finite_run_has_no_divergence_note(cache):
    s = federate(cache, FederateConfig(algo="fedadam", rounds=2, batch_size=16, heldout=["a"]))
    assert not any("non-finite" in n for n in s["notes"])


@pytest.mark.parametrize("spelling,said", [(None, "--algo 'nope' unknown"),
                                           ({"algo": "p.toml: federate.algo = "},
                                           "p.toml: federate.algo = 'nope' unknown"),
                                           ({"algo": "--grid algo="}, "--grid algo='nope' unknown")])
def test_unknown_algo_message_spacing(spelling, said):
    """Other choices read `--flag 'x' unknown`, `federate.key = 'x'`, `--grid key='x'`; --algo added a second space
    (`federate.algo =  'nope'`, `--grid algo= 'nope'`)."""
    with pytest.raises(ConfigError) as e:
        FederateConfig(algo="nope").validate(spelling)
    assert str(e.value).startswith(said), str(e.value)


def test_flower_server_honours_fraction_fit(cache):
    """The ServerApp hard-coded fraction_fit=1 and min_fit_clients=all: `fraction-fit` in the run config was
    accepted and silently ignored. Now the server samples with the in-process rule."""
    pytest.importorskip("flwr")
    from fedclip_cache.flower.client_app import _federate_config
    from fedclip_cache.flower.server_app import Coordinator

    def sampled(**rc):
        _, cfg = _federate_config({"cache": cache, "heldout": "a", "rounds": 2, **rc})
        co = Coordinator(cfg)
        for name, n in (("b", 36), ("c", 30)):
            co.learn({"client": name, "dim": 16, "heldout": False, "train_n": n})
        return [co.sampled(r) for r in (1, 2)]

    assert all(len(s) == 1 for s in sampled(fraction_fit=0.5, min_fit_clients=1))
    assert all(sorted(s) == ["b", "c"] for s in sampled(fraction_fit=0.5, min_fit_clients=50))  # capped