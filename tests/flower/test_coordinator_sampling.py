"""The Coordinator (the ServerApp's logic) samples the training sites of each round with `federate`'s rule:
`fraction-fit` and `min-fit-clients` in the run config are honoured (capped at the sites there are)."""
import pytest

from fedclip_cache.synthetic import write_synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(write_synthetic_cache(tmp_path_factory.mktemp("c") / "c", {"a": 80, "b": 60, "c": 50}, 4, dim=16,
                                     seed=1, class_sep=0.6, domain_shift=1.5))


def test_flower_server_honours_fraction_fit(cache):
    """`fraction-fit` 0.5 of two training sites samples one per round (min-fit-clients 1), and both when
    min-fit-clients is above the sites there are."""
    pytest.importorskip("flwr")
    from fedclip_cache.flower.task import federate_config
    from fedclip_cache.flower.server_app import Coordinator

    def sampled(**rc):
        _, cfg = federate_config({"cache": cache, "heldout": "a", "rounds": 2, **rc})
        co = Coordinator(cfg)
        for name, n in (("b", 36), ("c", 30)):
            co.learn({"client": name, "dim": 16, "heldout": False, "train_n": n})
        return [co.sampled(r) for r in (1, 2)]

    assert all(len(s) == 1 for s in sampled(fraction_fit=0.5, min_fit_clients=1))
    assert all(sorted(s) == ["b", "c"] for s in sampled(fraction_fit=0.5, min_fit_clients=50))  # capped
