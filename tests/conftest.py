import os
import sys
from pathlib import Path

# TEMPORARY (layout move): test modules still import helpers from test modules in other package folders
for _d in ("cache", "federated", "flower", "launch", "cli"):
    sys.path.insert(0, str(Path(__file__).parent / _d))

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: tests never touch the network

import pytest

from fedclip_cache.synthetic import write_image_folder, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(config json, checkpoint) of a tiny random open_clip model, registered with open_clip."""
    return write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def image_root(tmp_path):
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def model_args(tiny_model):
    cfg, ckpt = tiny_model
    return ["--model-config", str(cfg), "--pretrained", str(ckpt)]
