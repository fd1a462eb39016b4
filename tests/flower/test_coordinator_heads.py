"""The Coordinator's prototype head is `federate`'s, bit for bit: the training sites' class sums added in the
loop's client order (a shared cache's partition index, not the client's name as text)."""
import pytest
import torch

pytest.importorskip("flwr")

from fedclip_cache.cache.reader import open_cache  # noqa: E402
from fedclip_cache.federated.loop import build_heads, lane_setup  # noqa: E402
from fedclip_cache.federated.algorithms import make_algorithm  # noqa: E402
from fedclip_cache.federated.protocols import build_experiments  # noqa: E402
from fedclip_cache.flower.client_app import SiteClient  # noqa: E402
from fedclip_cache.flower.task import federate_config  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402


def test_prototype_head_of_eleven_partition_clients_per_domain_equals_the_loops(tmp_path, run_sites):
    """Clients b#0..b#10 and c#0..c#10: summed by name as text (b#10 before b#2) the float32 sums round
    differently from the loop's sum in client order."""
    cache = str(write_synthetic_cache(tmp_path / "c", {"a": 40, "b": 440, "c": 440}, 3, dim=64, seed=4))
    _, cfg = federate_config({"cache": cache, "heldout": "a", "hidden": 8, "rounds": 0, "head": "prototype",
                              "partition": "iid", "num_clients": 11})
    sites = [SiteClient(cache, cfg, pid) for pid in range(22)]
    co = run_sites(sites, cfg)
    c = open_cache(cache)
    exps = build_experiments(c, cfg)
    lanes = lane_setup(c, cfg, make_algorithm(cfg), torch.device("cpu"))
    heads, _ = build_heads(c, cfg, lanes.X, lanes.Y, exps, torch.device("cpu"))
    assert [cl.name for cl in exps[0].clients][:3] == ["b#0", "b#1", "b#2"]
    assert torch.equal(co.head, heads[0])
