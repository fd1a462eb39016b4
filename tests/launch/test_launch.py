"""deploy's Launch: the environment every process of a deployment gets."""
import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedclip_cache.launch import deploy as dep  # noqa: E402


def test_processes_import_this_fedclip_cache(tmp_path, monkeypatch):
    """The first PYTHONPATH entry a deployment's processes get is the folder holding THIS fedclip_cache package (not
    the package folder itself, whose modules would shadow top-level names and leave `fedclip_cache` unimportable
    outside an install), so flwr-serverapp/-clientapp run the code deploy runs."""
    if dep.flower_bin_dir() is None:
        pytest.skip("Flower's CLIs are not installed")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    launch = dep.Launch("subprocess")  # no zygote: nothing is started
    try:
        first = Path(launch.env["PYTHONPATH"].split(os.pathsep)[0])
        assert first / "fedclip_cache" / "__init__.py" == Path(dep.__file__).resolve().parents[1] / "__init__.py"
    finally:
        launch.abort()
    assert not launch.tmp.exists()
