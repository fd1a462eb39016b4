"""The adapter registry: a new adapter is one registered class that `federate` trains, `--adapter` accepts and its
help lists; the options an adapter declares reach its forward, and only those."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedclip_cache import FederateConfig, federate, list_adapters
from fedclip_cache.federated.adapters import ADAPTERS, AdapterKind, adapter_options, register_adapter
from fedclip_cache.federated.config import ConfigError, option_help
from fedclip_cache.synthetic import write_synthetic_cache

SEEN_OPTIONS: list[dict] = []


class LinearWrittenAgain(AdapterKind):
    """The built-in ``linear`` adapter (W f + b from the identity), written independently of adapters.py, and
    declaring an option it records."""

    name = "test-linear"
    summary = "a test adapter"
    options = ("residual_alpha",)

    def shapes(self, d, h):
        return {"w": (d, d), "b": (d,)}

    def init(self, d, h, g):
        return {"w": torch.eye(d), "b": torch.zeros(d)}

    def forward(self, p, x, opts):
        SEEN_OPTIONS.append(dict(opts))
        return x @ p["w"] + p["b"][:, None, :]


@pytest.fixture
def registered():
    register_adapter(LinearWrittenAgain)
    SEEN_OPTIONS.clear()
    try:
        yield LinearWrittenAgain.name
    finally:
        del ADAPTERS[LinearWrittenAgain.name]


def test_a_registered_adapter_trains_through_federate_as_the_built_in_it_copies(tmp_path, registered):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 60, "b": 50, "c": 40}, 3, dim=16, seed=1)
    common = dict(rounds=2, lr=1e-2, heldout=["a"], batch_size=8, residual_alpha=0.3)
    new = federate(cache, FederateConfig(adapter=registered, **common), out=tmp_path / "new")
    built_in = federate(cache, FederateConfig(adapter="linear", **common), out=tmp_path / "builtin")

    assert new["adapter"] == registered and built_in["adapter"] == "linear"
    assert SEEN_OPTIONS and all(o == {"residual_alpha": 0.3} for o in SEEN_OPTIONS)
    trained = torch.load(tmp_path / "new" / "adapter.pt")
    reference = torch.load(tmp_path / "builtin" / "adapter.pt")
    assert set(trained) == {"w", "b"} and trained["w"].shape == (1, 16, 16)
    assert not torch.equal(trained["w"][0], torch.eye(16))  # it trained
    for n in trained:
        torch.testing.assert_close(trained[n], reference[n], rtol=1e-4, atol=1e-6)
    assert new["communication"]["trainable_params"] == built_in["communication"]["trainable_params"] == 16 * 17
    assert new["experiments"][0]["best"] == built_in["experiments"][0]["best"]


def test_a_registered_adapter_is_accepted_listed_and_refused_once_removed(registered):
    assert list_adapters() == ["fedclip", "residual", "linear", registered]
    assert "test-linear (a test adapter)" in option_help("adapter")
    FederateConfig(adapter=registered).validate()
    del ADAPTERS[registered]
    try:
        with pytest.raises(ConfigError, match=r"--adapter 'test-linear' unknown; choose one of "
                                              r"fedclip, residual, linear$"):
            FederateConfig(adapter=registered).validate()
    finally:
        register_adapter(LinearWrittenAgain)


def test_a_name_is_registered_once(registered):
    with pytest.raises(ValueError, match="registered twice"):
        register_adapter(LinearWrittenAgain)


def test_each_adapter_gets_only_the_options_it_declares():
    cfg = FederateConfig(residual_alpha=0.7)
    assert adapter_options(cfg) == {}  # fedclip reads none
    cfg.adapter = "residual"
    assert adapter_options(cfg) == {"residual_alpha": 0.7}
    assert ADAPTERS["none"].options == () and "none" not in list_adapters()


def test_federate_help_lists_an_adapter_registered_before_the_cli_is_built_and_needs_no_torch():
    probe = textwrap.dedent("""
        import json, sys
        from fedclip_cache.federated.adapters import AdapterKind, register_adapter

        @register_adapter
        class Plugin(AdapterKind):
            name = "test-plugin"
            summary = "registered by a plugin"

        from fedclip_cache.cli import main
        torch_loaded = "torch" in sys.modules
        sys.argv = ["fedclip-cache", "federate", "--help"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        print(json.dumps({"torch": torch_loaded}))
        """)
    env = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "fedclip (official gate) | residual (CLIP-Adapter) | linear | test-plugin (registered by a plugin)." \
        in " ".join(res.stdout.split())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"torch": False}
