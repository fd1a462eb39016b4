"""federated/protocols.py: the experiment names that seed every run's batches and sampling."""
import pytest

from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.protocols import build_experiments, experiment_name, federation_name
from fedclip_cache.synthetic import write_synthetic_cache


def test_experiment_names():
    assert experiment_name("photo", 2) == "heldout=photo/seed2"
    assert experiment_name(None, 0) == "personal/seed0"
    assert federation_name(FederateConfig(heldout=["art"], seed=4)) == "heldout=art/seed4"
    assert federation_name(FederateConfig(protocol="personal", seed=1)) == "personal/seed1"


@pytest.mark.parametrize("opts", [{"heldout": ["b"]}, {"protocol": "personal"}])
def test_federate_names_its_experiments_as_a_deployment_does(tmp_path, opts):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 20, "b": 20, "c": 20}, 2, dim=8)
    from fedclip_cache.cache.reader import open_cache

    cfg = FederateConfig(**opts).validate()
    assert [e.name for e in build_experiments(open_cache(cache), cfg)] == [federation_name(cfg)]
    assert [e.name for e in build_experiments(open_cache(cache), cfg, seeds=[0, 5])] == \
        [experiment_name(opts.get("heldout", [None])[0], s) for s in (0, 5)]
