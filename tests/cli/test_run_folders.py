"""Run folders as trustworthy as caches: one writer at a time, a state marker written last, an earlier run's outputs
never mixed with a new one's, one kind of run per folder, sweeps that say "k of n points", a full disk in one line, a
too-long name in one line, files that respect the umask, tables that survive a pipe."""
import json
import os
import stat
import subprocess
import sys

import pytest

from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.federated.results import federate
from fedclip_cache.synthetic import write_synthetic_cache


def read_state(folder) -> dict | None:
    """RUN/state.json, read as a user would (None when there is none)."""
    f = folder / "state.json"
    return json.loads(f.read_text()) if f.is_file() else None


@pytest.fixture
def one_line_error(one_line_error):
    """The shared check, taking ``run(...)``'s (code, out, err) as one value."""
    return lambda res, *fragments: one_line_error(*res, *fragments)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "c", {"a": 40, "b": 30, "c": 30}, 3, dim=16, seed=1)


FED = ["--rounds", "1", "--hidden", "4", "--heldout", "a", "-q"]


def test_failed_rerun_leaves_no_mixed_folder_and_report_refuses_it(cache, tmp_path, run, monkeypatch, one_line_error):
    """A second `federate -o RUN` that fails late leaves nothing of the first run beside its own config.json (no
    summary.json, metrics.parquet or adapter.pt): the folder is in-progress and `report RUN` refuses it."""
    out = tmp_path / "run"
    assert run("federate", cache, "-o", out, *FED)[0] == 0
    state = read_state(out)
    assert state["kind"] == "federate" and state["state"] == "complete"
    assert set(state["files"]) == {"config.json", "metrics.parquet", "adapter.pt", "summary.json"}
    assert run("report", out, "--format", "csv")[0] == 0

    import fedclip_cache.federated.results as results

    def late_failure(*a, **k):
        raise RuntimeError("a failure after training (as --seed 2147483648 was)")

    monkeypatch.setattr(results, "metrics_table", late_failure)
    with pytest.raises(RuntimeError, match="after training"):
        federate(cache, FederateConfig(rounds=1, hidden=4, heldout=["a"], seed=1), out=out)
    assert read_state(out)["state"] == "in-progress"
    # nothing of the first run is left to be mistaken for this one's
    assert not any((out / f).exists() for f in ("summary.json", "metrics.parquet", "adapter.pt"))
    one_line_error(run("report", out), "incomplete run folder", "re-run")


def test_a_file_rewritten_after_the_run_completed_is_a_mixed_folder(cache, tmp_path, run, one_line_error):
    out = tmp_path / "run"
    assert run("federate", cache, "-o", out, *FED)[0] == 0
    other = tmp_path / "other"
    # (another seed list: with only --lr changed, both summaries may be byte-identical but for the run's seconds,
    # and equal seconds made this test fail now and then)
    assert run("federate", cache, "-o", other, *FED, "--lr", "0.01", "--seeds", "0,1")[0] == 0
    assert (other / "summary.json").read_bytes() != (out / "summary.json").read_bytes()
    (out / "summary.json").write_bytes((other / "summary.json").read_bytes())  # e.g. an older fedclip-cache
    one_line_error(run("report", out), "mixed run folder", "summary.json")


def test_second_writer_is_refused_at_once_naming_the_holder(cache, tmp_path, run, one_line_error):
    """While a `federate -o RUN` holds the folder, a second federate or sweep into it is refused at once, naming the
    holder, and `report` says a federate is writing it."""
    from fedclip_cache.federated.runfolder import claim

    out = tmp_path / "run"
    held = claim(out, "federate", "federate -o")  # as a running federate holds it
    try:
        msg = one_line_error(run("federate", cache, "-o", out, *FED), "in use by another federate",
                             f"pid {os.getpid()}")
        assert str(out) in msg
        one_line_error(run("sweep", cache, "-o", out, "--grid", "hidden=4", "--seeds", "0", *FED),
                       "is a federate run folder, not a sweep folder")
        one_line_error(run("report", out), "a federate is writing this folder now")
    finally:
        held.close()
    assert run("federate", cache, "-o", out, *FED)[0] == 0  # released (a killed holder releases it, too)


def test_a_real_holder_process_refuses_others_until_killed(cache, tmp_path, run, one_line_error):
    """The lock is the kernel's: another process holding it refuses a federate; kill -9 of the holder frees it,
    and the folder it left is marked incomplete, never complete."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from fedclip_cache.federated.runfolder import claim; "
                               f"claim({str(out)!r}, 'federate', 'federate -o'); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [sys.executable, "-m", "fedclip_cache", "federate", str(cache), "-o", str(out), *FED]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        assert r.returncode == 2 and "in use by another federate" in r.stderr and f"pid {holder.pid}" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert read_state(out)["state"] == "in-progress"
    one_line_error(run("report", out), "incomplete run folder")
    assert run("federate", cache, "-o", out, *FED)[0] == 0  # the kernel released the killed holder's lock
    assert read_state(out)["state"] == "complete"


def test_one_kind_of_run_per_folder(cache, tmp_path, run, one_line_error):
    fed, sw = tmp_path / "fed", tmp_path / "sw"
    assert run("federate", cache, "-o", fed, *FED)[0] == 0
    assert run("sweep", cache, "-o", sw, "--grid", "hidden=4", "--seeds", "0", *FED)[0] == 0
    before = read_state(fed)
    one_line_error(run("sweep", cache, "-o", fed, "--grid", "hidden=4", "--seeds", "0", *FED),
                   "is a federate run folder, not a sweep folder", "give another folder")
    assert read_state(fed) == before and (fed / "summary.json").is_file()  # the refusal changed nothing
    one_line_error(run("federate", cache, "-o", sw, *FED), "is a sweep folder, not a federate run folder")
    lock_note = (cache / ".lock").read_bytes() if (cache / ".lock").exists() else None
    one_line_error(run("federate", cache, "-o", cache, *FED), "is a feature cache")
    assert ((cache / ".lock").read_bytes() if (cache / ".lock").exists() else None) == lock_note  # untouched
    # a folder written before state.json existed is recognised by its files
    (fed / "state.json").unlink()
    one_line_error(run("sweep", cache, "-o", fed, "--grid", "hidden=4", "--seeds", "0", *FED),
                   "is a federate run folder")
    code, out, err = run("report", fed)
    assert code == 0 and "no state.json" in out
    # a folder of one's own that happens to hold a config.json: never taken for a run folder, never overwritten
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    one_line_error(run("federate", cache, "-o", mine, *FED), "holds a config.json that fedclip-cache did not write")
    assert (mine / "config.json").read_text() == '{"my": "settings"}'


@pytest.mark.parametrize("name", ["summary.md", "summary.csv", "results.parquet", "state.json",
                                  "plots/accuracy_vs_round.png"])
def test_a_file_of_ones_own_with_a_name_a_run_writes_is_never_overwritten(cache, tmp_path, run, name, one_line_error):
    """Every output name a run writes is checked before it starts: a user's own summary.md, summary.csv,
    results.parquet, state.json or plots/accuracy_vs_round.png in the folder is refused in one line and left as it
    was."""
    mine = tmp_path / "mine"
    (mine / name).parent.mkdir(parents=True)
    (mine / name).write_text("my own")
    sweep = run("sweep", cache, "-o", mine, "--grid", "hidden=4", "--seeds", "0", *FED)
    one_line_error(sweep, f"holds a {name} that fedclip-cache did not write")
    if name in ("state.json", "plots/accuracy_vs_round.png"):
        one_line_error(run("federate", cache, "-o", mine, *FED), f"holds a {name}")
    assert (mine / name).read_text() == "my own"
    assert sorted(p.name for p in mine.rglob("*")) == sorted({*name.split("/"), ".lock"} - {".lock"})


def _killed_sweep(cache, out, monkeypatch, finished: int):
    """A sweep of 4 points killed after ``finished`` of them."""
    import importlib

    sw = importlib.import_module("fedclip_cache.sweep")  # the package exports a function of the same name
    real, calls = sw._run_point, []

    def run_point(*a, **k):
        if len(calls) == finished:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sw, "_run_point", run_point)
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(cache, FederateConfig(rounds=1, heldout=["a"]), {"hidden": [2, 4, 8, 16]}, [0], out)
    monkeypatch.setattr(sw, "_run_point", real)


def test_partial_sweep_says_k_of_n_and_is_refused_unless_asked(cache, tmp_path, run, monkeypatch, one_line_error):
    """A sweep killed after 2 of 4 points: `report` refuses it naming "2 of 4 points" and --partial; with --partial it
    shows the 2 finished rows and says PARTIAL; the same sweep run again trains the other 2 and completes the folder."""
    out = tmp_path / "sw"
    _killed_sweep(cache, out, monkeypatch, 2)
    assert read_state(out)["state"] == "in-progress"
    one_line_error(run("report", out), "2 of 4 points", "--partial")
    code, o, e = run("report", out, "--partial", "--format", "csv")
    assert code == 0 and "2 of 4 points" in e and len(o.strip().splitlines()) == 1 + 2, (o, e)
    code, o, e = run("report", out, "--partial")
    assert code == 0 and "PARTIAL sweep: 2 of 4 points" in o
    code, o, e = run("sweep", cache, "-o", out, "--grid", "hidden=2,4,8,16", "--seeds", "0", "--rounds", "1",
                     "--heldout", "a", "-q")
    assert code == 0 and "2 grid point(s) trained now, 2 re-used" in o
    assert read_state(out)["state"] == "complete"
    code, o, e = run("report", out, "--format", "csv")
    assert code == 0 and len(o.strip().splitlines()) == 1 + 4 and not e


def test_sweep_with_nothing_finished_is_a_one_line_error(cache, tmp_path, run, monkeypatch, one_line_error):
    out = tmp_path / "sw"
    _killed_sweep(cache, out, monkeypatch, 0)
    one_line_error(run("report", out), "no point of this sweep has finished (0 of 4 points)")
    one_line_error(run("report", out, "--partial"), "0 of 4 points")


def test_sweep_folder_belongs_to_one_cache_grid_and_seeds(cache, tmp_path, run, one_line_error):
    """A sweep folder belongs to one cache, grid, seed list and set of fixed options: another is refused in one line and
    changes nothing (rows of two caches never share a table); widening the grid is the same sweep."""
    out = tmp_path / "sw"
    base = ["--seeds", "0", "--rounds", "1", "--heldout", "a", "-q"]
    assert run("sweep", cache, "-o", out, "--grid", "hidden=2,4", *base)[0] == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["cache_identity"]["path"] == str(cache.resolve()) and record["cache_identity"]["shards_sha256"]
    assert len(record["points"]) == 2 and record["grid_keys"] == ["hidden"] and record["seeds"] == [0]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    other = write_synthetic_cache(tmp_path / "c2", {"a": 40, "b": 30, "c": 30}, 3, dim=16, seed=2)
    for args, words in [((other, "--grid", "hidden=2,4", *base), "cache"),
                        ((cache, "--grid", "hidden=2,4", *base[:1], "0,1", *base[2:]), "--seeds 0, not 0,1"),
                        ((cache, "--grid", "lr=0.1", *base), "--grid over hidden, not over lr"),
                        ((cache, "--grid", "hidden=2,4", *base, "--lr", "0.5"), "--lr")]:
        one_line_error(run("sweep", args[0], "-o", out, *args[1:]), "holds another sweep", words,
                       "give a new folder")
    # refusals change nothing (.lock, the holder's note, is rewritten by whoever takes the lock)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    code, o, e = run("sweep", cache, "-o", out, "--grid", "hidden=2,4,8", *base)  # widening is the same sweep
    assert code == 0 and "1 grid point(s) trained now, 2 re-used" in o
    code, o, e = run("report", out, "--format", "csv")
    assert code == 0 and len(o.strip().splitlines()) == 1 + 3


@pytest.mark.parametrize("writer", ["torch", "pyarrow", "json"])
def test_disk_full_is_one_line_naming_the_file_and_leaves_the_folder_incomplete(cache, tmp_path, run,
                                                                                 monkeypatch, writer, one_line_error):
    """A full disk while `federate` writes any of its files is one line naming that file (no torch traceback), and the
    folder is left incomplete."""
    out = tmp_path / "run"
    if writer == "torch":
        def full(*a, **k):  # what torch.save raises when its zip writer's write comes up short
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed / unexpected pos 960 vs 854")
        monkeypatch.setattr("torch.save", full)
        import shutil

        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
        name = "adapter.pt"
    elif writer == "pyarrow":
        def full(*a, **k):
            raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
        monkeypatch.setattr("pyarrow.parquet.write_table", full)
        name = "metrics.parquet"
    else:
        import fedclip_cache.cache.store as store

        real = store.write_json

        def full(path, obj):
            if path.name == "summary.json":
                raise OSError(28, "No space left on device")
            return real(path, obj)
        monkeypatch.setattr(store, "write_json", full)
        monkeypatch.setattr("fedclip_cache.federated.results.write_json", full)
        name = "summary.json"
    one_line_error(run("federate", cache, "-o", out, *FED), f"disk full writing {out / name}",
                   "free space and re-run")
    assert read_state(out)["state"] == "in-progress"
    monkeypatch.undo()
    one_line_error(run("report", out), "incomplete run folder")


def test_a_short_torch_write_with_room_left_is_not_called_disk_full(cache, tmp_path, run, monkeypatch, one_line_error):
    def short(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 960 vs 854")
    monkeypatch.setattr("torch.save", short)
    out = tmp_path / "run"
    msg = one_line_error(run("federate", cache, "-o", out, *FED), f"write failed writing {out / 'adapter.pt'}",
                         "unexpected pos 960 vs 854", "check the disk")
    assert "disk full" not in msg and read_state(out)["state"] == "in-progress"


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    kids = []
    for d in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            kids.append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_sweep_takes_its_workers_with_it(cache, tmp_path):
    """`kill -9` of a `sweep --jobs 2` ends its two workers too: none trains on, re-parented to init, writing points
    into the folder after its lock is gone."""
    import time

    out = tmp_path / "sw"
    p = subprocess.Popen([sys.executable, "-m", "fedclip_cache", "sweep", str(cache), "-o", str(out), "--jobs", "2",
                          "--grid", "hidden=4,8", "--seeds", "0", "--rounds", "1000000", "--heldout", "a", "-q"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(_children(p.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        workers = _children(p.pid)
        assert len(workers) == 2
    finally:
        p.kill()
        p.wait()
    deadline = time.time() + 10
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # (the test's own clean-up)
        os.kill(w, 9)
    assert not left


def test_disk_full_in_a_sweep_point(cache, tmp_path, run, monkeypatch, one_line_error):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("torch.save", full)
    out = tmp_path / "sw"
    one_line_error(run("sweep", cache, "-o", out, "--grid", "hidden=4", "--seeds", "0", *FED),
                   "disk full writing", "adapter.pt", "free space and re-run")
    assert read_state(out)["state"] == "in-progress"


def test_too_long_output_name_is_one_line(cache, tmp_path, run, one_line_error):
    """A 300-character -o name is a one-line error, not a traceback."""
    long = tmp_path / ("x" * 300)
    one_line_error(run("federate", cache, "-o", long, *FED), "too long", "shorter name")
    one_line_error(run("sweep", cache, "-o", long, "--grid", "hidden=4", "--seeds", "0", *FED), "too long")
    toml = tmp_path / "p.toml"
    toml.write_text(f'[pipeline]\ncache = "{cache}"\nout = "{long}"\n[federate]\nrounds = 1\nheldout = ["a"]\n')
    one_line_error(run("run", toml, "--no-sweep"), "too long", "pipeline.out")
    (tmp_path / "f").write_text("")
    one_line_error(run("federate", cache, "-o", tmp_path / "f" / "sub", *FED), "is a file, not a folder")


def test_a_run_refused_after_taking_the_lock_leaves_the_earlier_run_as_it_was(cache, tmp_path, run, one_line_error):
    """Refusals by the training loop's own checks (memory for --hidden, the text model and prompt fit of promptfl),
    which come after the folder is claimed, are one line and leave the earlier complete run's outputs and state as they
    were."""
    out = tmp_path / "run"
    assert run("federate", cache, "-o", out, *FED)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    one_line_error(run("federate", cache, "-o", out, *FED, "--hidden", "9999999999"), "--hidden", "lower --hidden")
    one_line_error(run("federate", cache, "-o", out, *FED, "--algo", "promptfl"), "prompt learning")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert read_state(out)["state"] == "complete"
    assert run("report", out, "--format", "csv")[0] == 0


def test_a_sweep_point_refused_by_the_loop_leaves_the_sweep_folder_as_it_was(cache, tmp_path, run, one_line_error):
    """A grid value refused by the training loop's own checks (--grid hidden=..,9999999999: memory) is not recorded as a
    point of the sweep folder: the folder stays complete, a corrected sweep completes it, and a new folder refused the
    same way is no sweep folder afterwards."""
    out = tmp_path / "sw"
    sw = ["sweep", cache, "-o", out, "--seeds", "0", *FED]
    assert run(*sw, "--grid", "hidden=4,8")[0] == 0
    points = json.loads((out / "sweep.json").read_text())["points"]
    one_line_error(run(*sw, "--grid", "hidden=4,8,9999999999"), "--hidden 9999999999", "lower --hidden")
    assert json.loads((out / "sweep.json").read_text())["points"] == points
    assert read_state(out)["state"] == "complete"
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(points)
    assert run("report", out, "--format", "csv")[0] == 0
    assert run(*sw, "--grid", "hidden=4,8,16")[0] == 0  # the corrected sweep completes the folder
    code, csv, err = run("report", out, "--format", "csv", "--no-plots")
    assert code == 0 and not err and [r.split(",")[1] for r in csv.splitlines()[1:]] == ["4", "8", "16"]
    assert read_state(out)["state"] == "complete"
    # a new folder refused the same way is no sweep folder afterwards: any sweep may use it
    new = tmp_path / "new"
    one_line_error(run("sweep", cache, "-o", new, "--seeds", "0", *FED, "--grid", "hidden=9999999999"), "--hidden")
    assert not (new / "sweep.json").exists() and not (new / "state.json").exists()
    assert run("sweep", cache, "-o", new, "--seeds", "0", *FED, "--grid", "lr=0.01")[0] == 0


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_stdout_closed_early_is_said_on_stderr(cache, tmp_path, run, fmt):
    """`report ... | head` (any reader that stops early, here before anything is written) exits 1 saying on stderr that
    standard output was closed (broken pipe), without a traceback: never a failure without a cause."""
    out = tmp_path / "run"
    assert run("federate", cache, "-o", out, *FED)[0] == 0
    p = subprocess.Popen([sys.executable, "-m", "fedclip_cache", "report", str(out), "--no-plots", "--format", fmt],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader goes away before the command writes anything
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1
    assert "standard output was closed" in err and "broken pipe" in err and "Traceback" not in err, err


def test_a_file_or_folder_where_a_run_writes_the_other_is_one_line(cache, tmp_path, run, one_line_error):
    """A file where a run writes a folder (`plots`, a sweep's `points`) or a folder where it writes a file
    (`summary.json`) is a one-line error from `report`, `federate -o` and `sweep -o` that leaves the folder as it was
    (never a FileExistsError or NotADirectoryError traceback)."""
    out = tmp_path / "run"
    assert run("federate", cache, "-o", out, *FED)[0] == 0
    import shutil

    shutil.rmtree(out / "plots")
    (out / "plots").write_text("mine")
    one_line_error(run("report", out), "plots", "not a folder", "--no-plots")
    assert run("report", out, "--no-plots", "--format", "csv")[0] == 0
    one_line_error(run("federate", cache, "-o", out, *FED), "is a file where the run writes its plots/ folder")
    assert read_state(out)["state"] == "complete" and (out / "plots").read_text() == "mine"
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "plots").write_text("mine")
    one_line_error(run("sweep", cache, "-o", sw, "--grid", "hidden=4", "--seeds", "0", *FED),
                   "is a file where the run writes its plots/ folder")
    assert sorted(p.name for p in sw.iterdir()) == ["plots"]
    # the same for a folder where a run writes a file, and a file where a sweep keeps its points (tracebacks)
    (out / "plots").unlink()
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()
    one_line_error(run("federate", cache, "-o", out, *FED), "summary.json is a folder where the run writes")
    (sw / "plots").unlink()
    (sw / "points").write_text("mine")
    one_line_error(run("sweep", cache, "-o", sw, "--grid", "hidden=4", "--seeds", "0", *FED),
                   "points is a file where the run writes its points/ folder")


def test_output_name_not_utf8_is_one_line_and_creates_nothing(cache, tmp_path, run, one_line_error):
    """An -o name that is not UTF-8 is refused in one line by federate and sweep before anything is created (pyarrow
    cannot write under such a name)."""
    bad = tmp_path / os.fsdecode(b"b\xffad")
    one_line_error(run("federate", cache, "-o", bad, *FED), "not valid UTF-8", "UTF-8 name")
    one_line_error(run("sweep", cache, "-o", bad / "s", "--grid", "hidden=4", "--seeds", "0", *FED), "UTF-8")
    assert not os.path.lexists(bad)  # refused before anything was created


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_files_respect_the_umask(cache, tmp_path, run, umask):
    """Run files are written with the umask's mode (0666 & ~umask), not mkstemp's 0600 (atomic writes go through it): a
    shared lab run folder stays readable."""
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert run("federate", cache, "-o", out, *FED)[0] == 0
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.parquet", "adapter.pt", "summary.json", "state.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_tables_keep_rows_apart_when_not_a_terminal(tmp_path):
    """Piped into a log (no terminal width), `report` shows every row's whole experiment name
    (`heldout=domain_photograph/seed0`, never cut with `…`): rows can be told apart."""
    names = {"domain_photograph": 30, "domain_watercolour": 30, "domain_pencil_sketch": 30}
    c = write_synthetic_cache(tmp_path / "c", names, 3, dim=16, seed=1)
    federate(c, FederateConfig(rounds=1, hidden=4), out=tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "fedclip_cache", "report", str(tmp_path / "run"), "--no-plots"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    for d in names:
        assert f"heldout={d}/seed0" in r.stdout, r.stdout
    assert "…" not in r.stdout


def test_sweep_written_before_it_recorded_its_cache_is_refused_when_its_points_disagree(cache, tmp_path, run,
                                                                                        one_line_error):
    """A sweep folder of an older fedclip-cache (no cache identity in sweep.json, no state.json) whose points were
    trained on two caches is refused in one line, never its rows averaged together."""
    out = tmp_path / "sw"
    assert run("sweep", cache, "-o", out, "--grid", "hidden=2,4", "--seeds", "0", *FED)[0] == 0
    record = json.loads((out / "sweep.json").read_text())
    for k in ("cache_identity", "points"):
        del record[k]
    (out / "sweep.json").write_text(json.dumps(record))
    (out / "state.json").unlink(missing_ok=True)
    assert run("report", out, "--format", "csv")[0] == 0  # one cache: still reported
    summary = sorted((out / "points").glob("*/summary.json"))[0]
    s = json.loads(summary.read_text())
    s["cache"]["identity"]["shards_sha256"] = "0" * 64  # trained on another commit
    summary.write_text(json.dumps(s))
    one_line_error(run("report", out), "mixed sweep", "2 different caches or commits", "new folder")
    (out / "sweep.json").write_text("{")
    one_line_error(run("report", out), "sweep.json: damaged")
