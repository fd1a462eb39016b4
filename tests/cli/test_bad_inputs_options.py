"""Every bad federate / sweep / run input is one line naming the flag or key the user wrote: exit code 2, no
traceback, never a silent NaN run. Goes through ``cli.main`` (what the console script runs), so the one-line
``error: ...`` handler is exercised, not just the exception."""
import json
import math
import sys

import pytest
import torch

from fedclip_cache import cli
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.sweep import sweep
from fedclip_cache.synthetic import write_synthetic_cache

GOOD_TOML = """
[pipeline]
cache = "{cache}"
out = "{out}"
[federate]
{federate}
"""
GOOD_FEDERATE = {"rounds": "1", "batch_size": "8"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny cache (3 domains x 24 rows, D = 8; a complete extract run recorded so pipelines re-use it) and a
    folder of pipeline files."""
    root = tmp_path_factory.mktemp("bad")
    cache = write_synthetic_cache(root / "cache", {"a": 24, "b": 24, "c": 24}, 3, dim=8, seed=0)
    meta = json.loads((cache / "cache.json").read_text())
    meta["runs"] = [{"source": str(root / "data")}]
    (cache / "cache.json").write_text(json.dumps(meta))
    pipes = {  # name: (federate keys, extra sections)
        "good": ({}, ""),
        "rounds_str": ({"rounds": '"two"'}, ""),
        "split_float": ({"split": "0.5"}, ""),
        "lr_nan": ({"lr": "nan"}, ""),
        "heldout_int": ({"heldout": "3"}, ""),
        "grid_typo": ({}, "[sweep]\ngrid = { hiden = [32] }\nseeds = [0]\n"),
        "grid_empty": ({}, "[sweep]\ngrid = { hidden = [] }\n"),
        "seeds_str": ({}, '[sweep]\ngrid = { hidden = [4] }\nseeds = "0"\n'),
        "jobs_zero": ({}, "[sweep]\ngrid = { hidden = [4] }\njobs = 0\n"),
        "extract_type": ({}, '[extract]\nbatch_size = "big"\n'),
    }
    for name, (fed, extra) in pipes.items():
        fed = "\n".join(f"{k} = {v}" for k, v in {**GOOD_FEDERATE, **fed}.items())
        text = GOOD_TOML.format(cache=cache, out=root / f"out-{name}", federate=fed) + extra
        (root / f"{name}.toml").write_text(text)
    (root / "not_table.toml").write_text("federate = 3\n")
    return {"cache": str(cache), "root": root}


def invoke(argv, monkeypatch, capsys):
    """Run the console entry point; return (exit code, stdout + stderr). Any other exception fails the test."""
    monkeypatch.setattr(sys, "argv", ["fedclip-cache", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


FED = ["federate", "{cache}", "--rounds", "2", "-q", "--json"]
SWEEP = ["sweep", "{cache}", "-o", "{root}/sweep", "--rounds", "1", "-q", "--seeds", "0"]
RUN = ["run", "{root}/good.toml", "--no-sweep"]

# (argv, expected exit code, fragment of the one-line message, typer's own usage error?)
CASES = [
    # non-finite and out-of-range numbers: refused, never an all-NaN adapter and exit 0
    (FED + ["--lr", "nan"], 2, "--lr nan: must be a finite number", False),
    (FED + ["--lr", "inf"], 2, "--lr inf: must be a finite number", False),
    (FED + ["--lr", "-1e-3"], 2, "--lr -0.001: must be > 0", False),
    (FED + ["--algo", "fedprox", "--mu", "nan"], 2, "--mu nan", False),
    (FED + ["--weight-decay", "-inf"], 2, "--weight-decay -inf", False),
    (FED + ["--partition", "dirichlet", "--alpha", "nan"], 2, "--alpha nan", False),
    (FED + ["--adapter", "residual", "--residual-alpha", "1.5"], 2, "--residual-alpha 1.5: must be between 0 and 1",
     False),
    (FED + ["--split", "nan,0.5,0.5"], 2, "--split nan,0.5,0.5: fractions must be finite", False),
    (FED + ["--split", "0.5,0.5"], 2, "--split '0.5,0.5': expected three fractions", False),
    (FED + ["--split", "0.7,0.7,-0.4"], 2, "--split must be three fractions in [0, 1] summing to 1", False),
    (FED + ["--algo", "fedsgd"], 2, "--algo 'fedsgd' unknown; choose one of", False),
    (FED + ["--split", "a,b,c"], 2, "--split 'a,b,c'", False),
    # the real flag, not the config field
    (FED + ["--clients", "0"], 2, "--clients 0: must be at least 1", False),
    (FED + ["--device", "gpu"], 2, "--device 'gpu': unknown device; choose one of cpu|cuda|auto", False),
    (FED + ["--rounds", "-3"], 2, "--rounds -3: must be at least 0", False),
    (FED + ["--eval-every", "5"], 2, "--eval-every 5: must not exceed --rounds 2", False),
    (FED + ["--heldout", "zz"], 2, "--heldout 'zz' is not a domain of this cache", False),
    (FED + ["--heldout", "a,a"], 2, "domain 'a' is given twice", False),
    (FED + ["--protocol", "personal", "--heldout", "a"], 2, "only the lodo protocol holds domains out", False),
    (FED + ["--template", "7"], 2, "--template '7'", False),
    (FED + ["--template", "-1"], 2, "--template '-1': give a template index", False),
    (FED + ["--seeds", "a"], 2, "--seeds 'a'", False),
    (FED + ["--seeds", "1,1"], 2, "--seeds: seed 1 given twice", False),
    (FED + ["--seeds", ""], 2, "--seeds: give at least one seed", False),
    (FED + ["--seed", "-1"], 2, "--seed -1: must be at least 0", False),
    # seeds every consumer takes (metrics.parquet's int32 column): 2**31 trained, then an OverflowError traceback
    (FED + ["--seed", "2147483648"], 2, "--seed 2147483648: must be at most 2147483647", False),
    (FED + ["--seeds", "0,2147483648"], 2, "--seeds: seed 2147483648: must be at most 2147483647", False),
    (FED + ["--batch-size", "1"], 2, "--batch-size 1: must be >= 2", False),
    (FED + ["--rounds", "abc"], 2, "'--rounds'", True),
    # participation, personalisation and server-optimiser options
    (FED + ["--fraction-fit", "0"], 2, "--fraction-fit 0.0: must be in (0, 1]", False),
    (FED + ["--fraction-fit", "1.5"], 2, "--fraction-fit 1.5: must be in (0, 1]", False),
    (FED + ["--min-fit-clients", "0"], 2, "--min-fit-clients 0: must be at least 1", False),
    (FED + ["--finetune-steps", "-1"], 2, "--finetune-steps -1: must be at least 0", False),
    (FED + ["--server-lr", "0"], 2, "--server-lr 0.0: must be > 0", False),
    (FED + ["--server-momentum", "1"], 2, "--server-momentum 1.0: must be in [0, 1)", False),
    (FED + ["--tau", "nan"], 2, "--tau nan: must be a finite number", False),
    (FED + ["--local-optimizer", "rmsprop"], 2, "--local-optimizer 'rmsprop' unknown; choose one of adam, sgd", False),
    # sweep: grid keys and values, seeds, jobs -- all before any file is written
    (SWEEP + ["--grid", "split=a/b/c"], 2, "--grid split='a/b/c'", False),
    (SWEEP[:-2] + ["--seeds", ""], 2, "--seeds: give at least one seed", False),
    (SWEEP[:-2] + ["--seeds", "1,2147483648"], 2, "--seeds: seed 2147483648: must be at most 2147483647", False),
    (SWEEP + ["--grid", "hidden="], 2, "--grid hidden=: no values", False),
    (SWEEP + ["--grid", "hiden=3"], 2, "--grid key 'hiden' is not a federate option", False),
    (SWEEP + ["--grid", "lr=nan"], 2, "--grid lr=nan: must be a finite number", False),
    (SWEEP + ["--grid", "clients=0", "--partition", "iid"], 2, "--grid clients=0: must be at least 1", False),
    (SWEEP + ["--grid", "hidden=8,8"], 2, "--grid hidden=8: value given twice", False),
    # an empty item (an unset shell variable) was dropped quietly: `--seeds 1,,2` trained seeds 1 and 2
    (SWEEP + ["--grid", "hidden=4,,8"], 2, "--grid hidden=4,,8: an empty value", False),
    (SWEEP + ["--grid", "heldout=A,"], 2, "--grid heldout=A,: an empty value", False),
    (SWEEP[:-2] + ["--seeds", "0,,1"], 2, "--seeds '0,,1': an empty seed", False),
    (FED + ["--seeds", "0,1,"], 2, "--seeds '0,1,': an empty seed", False),
    (SWEEP + ["--grid", "heldout=zz"], 2, "--grid heldout='zz': not a domain of this cache", False),
    (SWEEP + ["--grid", "template=3"], 2, "--grid template='3'", False),
    (SWEEP + ["--grid", "rounds=1,3", "--eval-every", "2"], 2, "--eval-every 2: must not exceed --grid rounds=1",
     False),
    (SWEEP + ["--device", "gpu"], 2, "--device 'gpu'", False),
    (SWEEP + ["--jobs", "0"], 2, "'--jobs'", True),
    (SWEEP + ["--grid", "fraction_fit=0.5,2"], 2, "--grid fraction_fit=2.0: must be in (0, 1]", False),
    (SWEEP + ["--grid", "curves=maybe"], 2, "--grid curves='maybe': not a valid true/false", False),
    # run: TOML keys and --set overrides, named as written
    (["run", "{root}/rounds_str.toml"], 2, "rounds_str.toml: federate.rounds = 'two': expected a whole number", False),
    (RUN + ["--set", "federate.rounds=abc"], 2, "--set federate.rounds='abc': expected a whole number", False),
    (["run", "{root}/split_float.toml"], 2, "federate.split = 0.5", False),
    (["run", "{root}/lr_nan.toml"], 2, "federate.lr = nan: must be a finite number", False),
    (["run", "{root}/grid_typo.toml"], 2, "sweep.grid key 'hiden' is not a federate option", False),
    (["run", "{root}/grid_empty.toml"], 2, "sweep.grid.hidden = : no values", False),
    (["run", "{root}/seeds_str.toml"], 2, "sweep.seeds = '0'", False),
    (["run", "{root}/jobs_zero.toml"], 2, "sweep.jobs = 0", False),
    (["run", "{root}/heldout_int.toml"], 2, "federate.heldout = 3", False),
    (["run", "{root}/extract_type.toml"], 2, "extract.batch_size = 'big'", False),
    (["run", "{root}/not_table.toml"], 2, "federate must be a [federate] table", False),
    (RUN + ["--set", "federate.heldout=zz"], 2, "--set federate.heldout='zz': not a domain of this cache", False),
    (RUN + ["--set", "federate.eval_every=3"], 2, "--set federate.eval_every=3: must not exceed", False),
    (["run", "{root}/good.toml", "--set", "sweep.grid.hidden=[0]"], 2, "--set sweep.grid.hidden=0: must be at least 1",
     False),
    (RUN + ["--set", "federate=3"], 2, "--set 'federate=3': expected SECTION.KEY=VALUE", False),
    (RUN + ["--set", "federate.seed=2147483648"], 2, "federate.seed=2147483648: must be at most 2147483647", False),
    (["run", "{root}/good.toml", "--set", "sweep.seeds=[0, 4294967296]"], 2,
     "sweep.seeds: seed 4294967296: must be at most 2147483647", False),
]


@pytest.mark.parametrize("argv,code,fragment,usage", CASES, ids=[" ".join(c[0][1:] if c[0][0] != "run" else c[0])
                                                                 [-60:] for c in CASES])
def test_bad_input_is_one_line_naming_the_flag(env, monkeypatch, capsys, argv, code, fragment, usage):
    argv = [a.format(**env) for a in argv]
    rc, out = invoke(argv, monkeypatch, capsys)
    assert rc == code, out
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if fragment in ln]
    assert lines, out  # the fragment sits on one line
    if not usage:  # ours: exactly one line, `error: ...`
        assert out.strip().splitlines() == [lines[0]] and lines[0].startswith("error: "), out
    assert "--num-clients" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_is_a_clear_error(env, monkeypatch, capsys):
    rc, out = invoke([a.format(**env) for a in FED + ["--device", "cuda"]], monkeypatch, capsys)
    assert rc == 2 and out.startswith("error: --device cuda") and "Traceback" not in out


def test_pipeline_with_bad_grid_key_fails_before_anything_is_written(env, monkeypatch, capsys, tmp_path):
    root = env["root"]
    before = sorted(p.name for p in root.iterdir())
    rc, out = invoke(["run", str(root / "grid_typo.toml")], monkeypatch, capsys)
    assert rc == 2 and "hiden" in out and "federate" not in out.split("error:")[0]
    assert not (root / "out-grid_typo").exists()  # the federate stage never ran
    assert sorted(p.name for p in root.iterdir()) == before
    # a grid value that is only wrong for this cache (an unknown held-out domain) is also caught up front
    fresh = tmp_path / "out"
    rc, out = invoke(["run", str(root / "good.toml"), "--set", "sweep.grid.heldout=['zz']",
                      "--set", f"pipeline.out='{fresh}'"], monkeypatch, capsys)
    assert rc == 2 and "--set sweep.grid.heldout='zz': not a domain of this cache" in out and not fresh.exists()


def test_good_pipeline_and_sweep_still_run(env, monkeypatch, capsys):
    rc, out = invoke(["run", str(env["root"] / "good.toml"), "--no-sweep"], monkeypatch, capsys)
    assert rc in (0, None), out
    rc, out = invoke([a.format(**env) for a in SWEEP + ["--grid", "hidden=4"]], monkeypatch, capsys)
    assert rc in (0, None), out


def test_library_validate_and_sweep_reject_bad_values(env, tmp_path):
    for kw in ({"lr": math.nan}, {"beta1": 1.0}, {"eps": 0.0}, {"logit_scale": math.inf}, {"rounds": "two"},
               {"split": 0.5}, {"hidden": 3.5}, {"beta2": math.nan}):
        with pytest.raises(ConfigError):
            FederateConfig(**kw).validate()
    assert FederateConfig(logit_scale=None).validate().logit_scale is None  # None = from the cache
    with pytest.raises(ConfigError, match="--clients 0"):
        FederateConfig(num_clients=0).validate({"num_clients": "--clients"})
    with pytest.raises(ConfigError, match="give at least one seed"):
        sweep(env["cache"], FederateConfig(rounds=1), {}, [], tmp_path / "s")
    with pytest.raises(ConfigError, match="no values"):
        sweep(env["cache"], FederateConfig(rounds=1), {"hidden": []}, [0], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_no_command_has_a_no_no_flag():
    """No option of any command, as click builds it, has a doubled `--no-no-` form (typer's automatic --no- pair of a
    bool option named no_sweep would give `run --no-no-sweep`)."""
    import typer

    group = typer.main.get_command(cli.app)
    flags = {(name, o) for name, cmd in group.commands.items() for p in cmd.params
             for o in [*p.opts, *getattr(p, "secondary_opts", [])]}
    assert ("run", "--no-sweep") in flags
    assert sorted(f for f in flags if f[1].startswith("--no-no-")) == []
