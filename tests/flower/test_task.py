"""flower/task.py, the run config codec: what ``deploy``/``simulate`` encode, the apps decode to the same options."""
import subprocess
import sys

import pytest

from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.flower.task import DEPLOYMENT_KEYS, federate_config, run_config


@pytest.mark.parametrize("opts", [
    {"heldout": ["art"]},
    {"heldout": ["art"], "split": (0.5, 0.3, 0.2), "rounds": 7, "lr": 0.01, "head": "prototype", "algo": "fedadam"},
    {"protocol": "personal", "hidden": 16, "weighting": "samples", "fraction_fit": 0.5, "train_views": "2"},
])
def test_run_config_decodes_to_the_options_it_encodes(tmp_path, opts):
    cfg = FederateConfig(**opts).validate()
    rc = run_config(cfg, 3, tmp_path / "run")
    assert all(isinstance(v, (str, int, float, bool)) for v in rc.values()), rc  # Flower's run config: scalars
    assert rc["sites"] == 3 and rc["out"] == str(tmp_path / "run")
    cache, decoded = federate_config({**rc, "round_timeout": 5.0, "poll_interval": 0.1})
    assert cache == "" and decoded.to_dict() == cfg.to_dict()
    assert federate_config({**rc, "cache": "/c"}).cache == "/c"


def test_every_deployment_key_is_kept_out_of_the_federate_options(tmp_path):
    rc = run_config(FederateConfig(heldout=["art"]).validate(), 2, tmp_path)
    rc.update({k: 1 for k in DEPLOYMENT_KEYS if k not in rc})
    assert federate_config(rc).cfg.to_dict() == FederateConfig(heldout=["art"]).validate().to_dict()


def test_a_lodo_run_config_needs_one_heldout_domain(tmp_path):
    with pytest.raises(ConfigError, match="--protocol lodo needs --heldout"):
        run_config(FederateConfig().validate(), 2, tmp_path)


def test_the_codec_imports_neither_flower_nor_torch():
    """``deploy`` checks the options with it before anything heavy is imported."""
    code = ("import sys, fedclip_cache.flower.task; "
            "print(sorted(m for m in ('flwr', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
