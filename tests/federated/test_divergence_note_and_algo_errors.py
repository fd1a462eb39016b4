"""A diverged adapter is said in the summary's notes (and a finite run has no such note); an unknown --algo is refused
with the same spacing as every other choice, however it was spelt."""
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
    """A huge --server-lr (accepted: > 0 and finite) turns the adapter into NaN in round 1: the summary's notes say the
    adapter is non-finite (its accuracies, argmax of NaN logits, look finite)."""
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
    """An unknown --algo reads like every other choice: `--algo 'x' unknown`, `federate.algo = 'x'`, `--grid algo='x'`
    (one space, never two)."""
    with pytest.raises(ConfigError) as e:
        FederateConfig(algo="nope").validate(spelling)
    assert str(e.value).startswith(said), str(e.value)
