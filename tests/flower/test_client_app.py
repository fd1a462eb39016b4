"""flower/client_app.py: a site sets up its lane with the loop's own function (``loop.lane_setup``)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from fedclip_cache.federated.results import federate  # noqa: E402
from fedclip_cache.flower.client_app import SiteClient  # noqa: E402
from fedclip_cache.flower.server_app import Coordinator  # noqa: E402
from fedclip_cache.flower.task import federate_config  # noqa: E402


def test_a_site_on_a_memory_mapped_float16_cache_trains_as_federate(tmp_path, model_args, monkeypatch, run, wire):
    """A float16 cache bigger than half the memory is served memory-mapped as float16 (converted per batch, as the
    loop's rows are); a site's lane gathers through the same rows and trains as ``federate`` on the same cache."""
    from fedclip_cache.cache import reader
    from fedclip_cache.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "all", per_class=6)
    code, o, e = run("extract", root, tmp_path / "c", *model_args, "--workers", "0", "-q",
                     "--dtype", "float16")
    assert code == 0, o + e
    free = reader.available_memory
    monkeypatch.setattr(reader, "available_memory", lambda: 1)  # every cache "bigger than memory": memory-mapped
    cache = str(tmp_path / "c")
    mapped = reader.open_cache(cache)
    assert mapped.features.dtype == np.float16
    opts = {"rounds": 2, "lr": 1e-3, "hidden": 8, "batch_size": 4}
    _, cfg = federate_config({"cache": cache, "heldout": "art", **opts})
    sites = [SiteClient(cache, cfg, pid) for pid in range(2)]
    co = Coordinator(cfg)
    co.setup([wire(*s.handle(*wire({"phase": "setup"}, {}))) for s in sites])
    for rnd in range(1, cfg.rounds + 2):
        rec, params = co.message(rnd)
        co.receive(rnd, [wire(*s.handle(*wire(rec, params))) for s in sites])
    monkeypatch.setattr(reader, "available_memory", free)  # federate's memory check reads it too
    federate(mapped, cfg, out=tmp_path / "run")
    final = torch.load(tmp_path / "run" / "adapter.pt")
    for name, p in co.current.items():
        np.testing.assert_allclose(p.numpy(), final[name].numpy(), rtol=1e-5, atol=1e-7)


def test_the_server_app_imports_on_its_own_without_the_client_app():
    code = ("import sys, fedclip_cache.flower.server_app as s; "
            "print(hasattr(s, 'server_app'), 'fedclip_cache.flower.client_app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
