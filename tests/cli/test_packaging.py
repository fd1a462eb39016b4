"""The bundled pipelines: `fedclip-cache run NAME` finds the ready pipeline shipped with the package, a path still
works and wins over a name, anything else is a one-line error listing the bundled names; `run --help` lists them.

That the wheel itself carries the pipelines (and installs and runs them by name in a clean venv) is checked by
`make wheel-check` (.ci/wheel-check), which CI runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedclip_cache.errors import ConfigError
from fedclip_cache.pipeline import BUNDLED_DIR, bundled_pipelines, load, resolve

REPO = Path(__file__).resolve().parents[2]
REPO_PIPELINES = sorted(p.stem for p in (REPO / "pipelines").glob("*.toml"))


def cli(*args, cwd):
    env = {**os.environ, "COLUMNS": "400"}  # the help's panels on one line each
    p = subprocess.run([sys.executable, "-m", "fedclip_cache", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_the_bundled_pipelines_are_the_repository_folder():
    """The package's pipelines folder is the repository's pipelines/ (not a copy that could drift)."""
    assert REPO_PIPELINES and list(bundled_pipelines()) == REPO_PIPELINES
    assert BUNDLED_DIR.resolve() == (REPO / "pipelines").resolve()
    for name, path in bundled_pipelines().items():
        assert path.read_bytes() == (REPO / "pipelines" / f"{name}.toml").read_bytes()


@pytest.mark.parametrize("name", REPO_PIPELINES)
def test_every_bundled_name_resolves_and_validates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the repository: the name alone finds the file
    assert resolve(name) == resolve(f"{name}.toml") == bundled_pipelines()[name]
    assert load(name)["pipeline"]["name"] == name


def test_a_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pacs.toml").write_text('[pipeline]\nname = "mine"\n')
    assert resolve("pacs.toml") == Path("pacs.toml") and load("pacs.toml")["pipeline"]["name"] == "mine"
    assert load("pacs")["pipeline"]["name"] == "pacs"  # the bare name is still the bundled one
    assert load(REPO / "pipelines" / "vlcs.toml")["pipeline"]["name"] == "vlcs"


@pytest.mark.parametrize("arg", ["nope", "pacs.yaml", "elsewhere/pacs.toml", "elsewhere/pacs", ""])
def test_neither_a_file_nor_a_bundled_name_is_refused(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve(arg)
    msg = str(e.value)
    assert "\n" not in msg and "pipeline file not found" in msg and ", ".join(REPO_PIPELINES) in msg


def test_run_by_name_on_the_command_line(tmp_path):
    """`run pacs` from any folder reads the bundled file (it is validated, then needs --data: no cache yet);
    an unknown name is a one-line error (exit 2) naming every bundled pipeline; --help lists them."""
    code, _, err = cli("run", "pacs", "--base-dir", tmp_path / "b", cwd=tmp_path)
    assert code == 2 and "caches/pacs-vitb32-openai does not exist yet: pass --data" in err, err
    assert not (tmp_path / "b").exists()
    code, _, err = cli("run", "pacs", "--set", "federate.rounds=x", cwd=tmp_path)
    assert code == 2 and "federate.rounds" in err and "Traceback" not in err, err
    code, out, err = cli("run", "nope", cwd=tmp_path)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "nope: pipeline file not found" in err and ", ".join(REPO_PIPELINES) in err
    code, out, _ = cli("run", "--help", cwd=tmp_path)
    assert code == 0 and "bundled pipeline: " + ", ".join(REPO_PIPELINES) in out, out
