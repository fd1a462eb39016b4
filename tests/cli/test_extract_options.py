"""Every extract option is declared once (cache/config.py) and reaches the ``extract`` command and a pipeline's
``[extract]`` table under the same name, with the declared default, allowed values and bounds; an option added to
the declaration appears in ``extract --help``, is passed on by the command and is accepted by pipelines. Expected
values come from the declarations, never restated here."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import typer

from fedclip_cache import cli
from fedclip_cache.cache.config import (KINDS, OPTIONS, PIPELINE_OPTIONS, ExtractConfig, option_default,
                                        option_flag)
from fedclip_cache.errors import ConfigError
from fedclip_cache.pipeline import EXTRACT_KEYS, prepare

SRC = Path(cli.__file__).resolve().parents[1]  # the folder holding the fedclip_cache package


class Built(Exception):
    """Raised by the stand-in runner with the ExtractConfig the command built."""

    def __init__(self, cfg):
        super().__init__("built")
        self.cfg = cfg


@pytest.fixture
def run(monkeypatch, capsys):
    """``fedclip-cache extract ...`` through the real entry point, with a stand-in runner that checks the options as
    the real one does first (:meth:`ExtractConfig.validate`) and returns the config: (exit code, output, cfg)."""
    def stand_in(cfg, **_):  # the runner's other arguments (a progress bar) do not matter here
        raise Built(cfg.validate())

    runner = types.ModuleType("fedclip_cache.cache.extract")
    runner.extract = stand_in
    monkeypatch.setitem(sys.modules, "fedclip_cache.cache.extract", runner)

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["fedclip-cache", "extract", "SRC", "OUT", *map(str, args)])
        try:
            cli.main()
        except Built as b:
            return 0, "", b.cfg
        except SystemExit as e:
            out = capsys.readouterr()
            return e.code, out.out + out.err, None
        raise AssertionError("extract returned without building its config")

    return invoke


@pytest.fixture
def pipeline(tmp_path):
    """A minimal pipeline file; ``pipeline(*sets)`` prepares it with ``--set`` overrides."""
    path = tmp_path / "p.toml"
    path.write_text('[pipeline]\ncache = "c"\n')
    return lambda *sets: prepare(path, list(sets))


def extract_command():
    return typer.main.get_command(cli.app).commands["extract"]


def test_every_declared_option_is_an_argument_or_flag_of_extract_and_a_pipeline_key():
    params = {p.name: p for p in extract_command().params}
    for name, f in OPTIONS.items():
        if f.metadata.get("cli") is False:
            assert name not in params, name
        elif f.metadata.get("argument"):
            assert params[name].param_type_name == "argument" and params[name].required, name
        else:
            assert option_flag(name) in params[name].opts, name
            if KINDS[name].item is None:  # a list or three numbers take text or a file on the command line
                assert params[name].default == option_default(name), name
    assert EXTRACT_KEYS == set(PIPELINE_OPTIONS) == {n for n, f in OPTIONS.items()
                                                     if f.metadata.get("pipeline", True)}
    # every [extract] key is a command-line option too
    assert all(OPTIONS[n].metadata.get("cli", True) for n in PIPELINE_OPTIONS)


def test_left_out_options_take_their_declared_defaults_from_the_command_and_a_pipeline(run, pipeline):
    code, out, cfg = run()
    assert code == 0, out
    assert cfg == ExtractConfig(source="SRC", out="OUT")
    defaults = {n: option_default(n) for n in PIPELINE_OPTIONS}
    assert cfg.option_values() == {**defaults, "source": "SRC", "out": "OUT", "progress": True, "dataset": None}
    # a pipeline that sets every key to its declared default (TOML has no None: those are left out) is valid
    plan = pipeline(*(f"extract.{n}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                      for n, v in defaults.items() if v is not None))
    as_lists = lambda values: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}  # noqa: E731
    from_pipeline = ExtractConfig.from_options({**plan.cfg["extract"], "source": "SRC", "out": "OUT"})
    assert as_lists(from_pipeline.option_values()) == as_lists(cfg.option_values())


CHOICES = [(n, c) for n, f in OPTIONS.items() for c in f.metadata.get("choices") or ()]


@pytest.mark.parametrize("name,choice", CHOICES, ids=[f"{n}={c}" for n, c in CHOICES])
def test_each_declared_choice_is_taken_by_the_command_and_a_pipeline(run, pipeline, name, choice):
    code, out, cfg = run(option_flag(name), choice)
    assert code == 0 and cfg.option_values()[name] == choice, out
    assert pipeline(f"extract.{name}='{choice}'").cfg["extract"][name] == choice


CHOICE_OPTIONS = [n for n, f in OPTIONS.items() if f.metadata.get("choices")]


@pytest.mark.parametrize("name", CHOICE_OPTIONS)
def test_a_value_outside_the_choices_is_one_line_naming_the_flag_or_key(run, pipeline, name):
    listed = ", ".join(OPTIONS[name].metadata["choices"])
    code, out, _ = run(option_flag(name), "nope")
    assert code == 2 and out.strip() == f"error: {option_flag(name)} 'nope' unknown; choose one of {listed}", out
    with pytest.raises(ConfigError, match=f"^--set extract.{name}='nope' unknown; choose one of {listed}$"):
        pipeline(f"extract.{name}='nope'")


BOUNDED = [n for n, f in OPTIONS.items() if f.metadata.get("bounds") and f.metadata.get("cli", True)]


@pytest.mark.parametrize("name", BOUNDED)
def test_declared_bounds_hold_on_the_command_line_and_in_a_pipeline(run, pipeline, name):
    low, high = OPTIONS[name].metadata["bounds"]
    flag, by_parser = option_flag(name), OPTIONS[name].metadata.get("parser_bounds", False)
    param = next(p for p in extract_command().params if p.name == name)
    # bounds the parser enforces are shown in --help (INTEGER RANGE); the others are checked with the rest
    assert (getattr(param.type, "min", None), getattr(param.type, "max", None)) == \
        ((low, high) if by_parser else (None, None))
    for edge in (low, high):
        if edge is not None:
            code, out, cfg = run(flag, edge)
            assert code == 0 and cfg.option_values()[name] == edge, out
            assert pipeline(f"extract.{name}={edge}").cfg["extract"][name] == edge
    outside = [(low - 1, f"expected a whole number >= {low}")] if low is not None else []
    outside += [(high + 1, f"must be at most {high}")] if high is not None else []
    for value, why in outside:
        code, out, _ = run(flag, value)
        assert code == 2 and "Traceback" not in out, out
        if by_parser:  # click's usage error names the flag
            assert f"Invalid value for '{flag}'" in out, out
        else:
            assert out.strip().startswith(f"error: {flag} {value}: {why}") and "\n" not in out.strip(), out
        with pytest.raises(ConfigError, match=f"^--set extract.{name}={value}: {why}"):
            pipeline(f"extract.{name}={value}")


def test_a_seed_torch_cannot_take_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, image_root,
                                                                    model_args):
    """torch.manual_seed takes 0 .. 2**64 - 1: a larger --seed was a ValueError traceback from load_model, and the
    command line took a negative seed that a pipeline refused."""
    for seed in (2**64, -1):
        monkeypatch.setattr(sys, "argv", ["fedclip-cache", "extract", str(image_root), str(tmp_path / "c"),
                                          *model_args, "-q", "--workers", "0", "--seed", str(seed)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        out = capsys.readouterr()
        assert e.value.code == 2 and out.err.strip().startswith(f"error: --seed {seed}: "), out
        assert "Traceback" not in out.out + out.err and not (tmp_path / "c").exists()


def test_library_config_is_checked_by_the_same_declarations():
    for kw, message in (({"batch_size": 0}, "--batch-size 0: expected a whole number >= 1"),
                        ({"format": "csv"}, "--format 'csv' unknown; choose one of parquet, hdf5"),
                        ({"templates": "a {}"}, "--template 'a {}': expected a list, got a string"),
                        ({"views": 2.5}, "--views 2.5: expected a whole number >= 1")):
        with pytest.raises(ConfigError, match="^" + message.replace("{", r"\{").replace("}", r"\}")):
            ExtractConfig("s", "o", **kw).validate()
    named = {"batch_size": "p.toml: extract.batch_size = "}
    with pytest.raises(ConfigError, match=r"^p.toml: extract.batch_size = 0: "):
        ExtractConfig("s", "o", batch_size=0).validate(named)
    assert ExtractConfig(Path("s"), Path("o")).validate()  # paths may be pathlib.Path in Python


def test_format_choices_are_the_formats_the_store_writes():
    from fedclip_cache.cache.store import FORMATS

    assert set(OPTIONS["format"].metadata["choices"]) == set(FORMATS)


NEW_OPTION = '''    sharpen: float = option(0.25, "Sharpen amount.", bounds=(0.0, 1.0))

'''

CHECK_NEW_OPTION = r'''
import sys, types
import typer
from typer.testing import CliRunner
from fedclip_cache.cli import app
from fedclip_cache.errors import ConfigError
from fedclip_cache.pipeline import prepare

class Built(Exception):
    pass


def stand_in(cfg, **_):  # the runner: check the options as the real one does first, hand back the config
    raise Built(cfg.validate())


runner = types.ModuleType("fedclip_cache.cache.extract")
runner.extract = stand_in
sys.modules["fedclip_cache.cache.extract"] = runner
r = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "200"})
assert r.exit_code == 0 and "--sharpen" in r.output and "Sharpen amount." in r.output, r.output
param = next(p for p in typer.main.get_command(app).commands["extract"].params if p.name == "sharpen")
assert param.default == 0.25 and param.opts == ["--sharpen"]
r = CliRunner().invoke(app, ["extract", "S", "O"])
assert isinstance(r.exception, Built) and r.exception.args[0].sharpen == 0.25, r.exception
r = CliRunner().invoke(app, ["extract", "S", "O", "--sharpen", "0.5"])
assert isinstance(r.exception, Built) and r.exception.args[0].sharpen == 0.5, r.exception
r = CliRunner().invoke(app, ["extract", "S", "O", "--sharpen", "2"])
assert isinstance(r.exception, ConfigError) and str(r.exception) == "--sharpen 2.0: must be at most 1.0", r.exception
open("p.toml", "w").write("[pipeline]\ncache = 'c'\n")
assert prepare("p.toml", ["extract.sharpen=0.75"]).cfg["extract"]["sharpen"] == 0.75
try:
    prepare("p.toml", ["extract.sharpen='much'"])
    raise AssertionError("not refused")
except ConfigError as e:
    assert str(e) == "--set extract.sharpen='much': expected a finite number", e
print("new option reached help, command and pipeline")
'''


def test_a_new_declared_option_reaches_help_the_command_and_pipelines(tmp_path):
    """One declaration added to ExtractConfig in a copy of the package, nothing else edited."""
    pkg = tmp_path / "src" / "fedclip_cache"
    shutil.copytree(SRC / "fedclip_cache", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    config = pkg / "cache" / "config.py"
    text = config.read_text()
    anchor = "    def option_values(self)"
    assert text.count(anchor) == 1
    config.write_text(text.replace(anchor, NEW_OPTION + anchor))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    r = subprocess.run([sys.executable, "-c", CHECK_NEW_OPTION], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "new option reached help, command and pipeline" in r.stdout, r.stdout + r.stderr


def test_the_declarations_import_without_typer_rich_or_torch():
    """cache/config.py describes options for the command line as plain data: ``--help`` and pipelines stay cheap."""
    r = subprocess.run([sys.executable, "-c", "import sys, fedclip_cache.cache.config; "
                        "print(sorted(m for m in ('typer', 'rich', 'torch') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
