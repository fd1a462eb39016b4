"""`kill -9` of a running `fedclip-cache simulate` (a job scheduler's SIGKILL, the OOM killer) leaves no process of
its Ray instance and no temporary folder behind. Ray's own fate-sharing kills what the driver started (gcs_server,
raylet, ...), but the raylet's DashboardAgent and RuntimeEnvAgent then wait ~60 s on the dead GCS; the run's watcher
(`fedclip_cache.launch.sim_guard`) kills them and removes the folder. Marked `slow` like the end-to-end simulations: one
simulation up to its first rounds (~15 s on 2 busy cores, Ray's start-up); the watcher's own tests take a second.
Linux only (/proc)."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedclip_cache
from fedclip_cache.synthetic import write_synthetic_cache

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _stat(pid) -> list:
    """/proc/PID/stat's fields after the command name: [state, ppid, ..., start time at index 19]."""
    return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()


def _descendants(root: int) -> dict:
    """{pid: start time} of every live descendant of ``root``."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = _stat(d.name)
            except OSError:
                continue
            children.setdefault(int(st[1]), []).append((int(d.name), st[19]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def _alive(pid: int, start: bytes) -> bool:
    """The same process (not a reused PID) still runs (a zombie waiting to be reaped does not)."""
    try:
        st = _stat(pid)
    except OSError:
        return False
    return st[19] == start and st[0] != b"Z"


@pytest.mark.slow
def test_kill_9_of_simulate_leaves_no_ray_process_and_no_temp_folder(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    cache = write_synthetic_cache(tmp_path / "c", {"art": 20, "photo": 20, "sketch": 20}, 3, dim=8)
    log = tmp_path / "simulate.log"
    src = str(Path(fedclip_cache.__file__).parents[1])
    env = {**os.environ, "COLUMNS": "500",  # one line per message: the session folder's path is not wrapped
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:  # a file, not a pipe nobody reads (the rounds' log would fill it and block)
        proc = subprocess.Popen([sys.executable, "-m", "fedclip_cache", "simulate", str(cache), "-o",
                                 str(tmp_path / "run"), "--heldout", "sketch", "--rounds", "100000", "--hidden", "4",
                                 "--num-cpus", "2"], stdout=f, stderr=subprocess.STDOUT, env=env)
    ray_procs, folder = {}, None
    try:
        deadline = time.monotonic() + 180
        while "[ROUND 2]" not in log.read_text():  # in the rounds: every Ray process is up
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ray_procs = _descendants(proc.pid)
        folder = Path(re.search(r"Ray's session folder: (\S+)/ray\)", log.read_text()).group(1))
        assert len(ray_procs) >= 5 and folder.is_dir()  # gcs_server, raylet, its agents, the actors, ...
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while True:
            left = {p for p, start in ray_procs.items() if _alive(p, start)}
            if (not left and not folder.exists()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in left if Path(f"/proc/{p}").exists()}
        assert not left, f"left running 10 s after kill -9: {names}"
        assert not folder.exists()
    finally:  # nothing of this test's is left, even when it failed
        proc.kill()
        proc.wait()
        for pid, start in ray_procs.items():
            if _alive(pid, start):
                os.kill(pid, 9)
        if folder is not None and folder.name.startswith("fedclip-sim-"):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def test_guard_kills_the_runs_processes_and_removes_its_folder_unless_kept(tmp_path):
    """The watcher without Ray: once its pipe closes (simulate returned, or died) it kills the processes that hold
    a file in the run's folder open (or carry the run's mark) -- never its own parent -- and removes the folder unless
    told `keep` (a failed run's Ray logs)."""
    from fedclip_cache.launch.simulate import _start_guard, _stop_guard

    holder = "import sys, time; f = open(sys.argv[1], 'w'); print('ok', flush=True); time.sleep(60)"
    for keep in (False, True):
        run = tmp_path / f"fedclip-sim-{keep}"
        run.mkdir()
        other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "elsewhere")], stdout=subprocess.PIPE)
        child = subprocess.Popen([sys.executable, "-c", holder, str(run / "log")], stdout=subprocess.PIPE)
        assert child.stdout.readline() == other.stdout.readline() == b"ok\n"
        guard = _start_guard(run)
        _stop_guard(guard, keep)  # this process holds nothing in the folder; it would be spared anyway
        assert guard.returncode == 0 and child.wait(5) == -9
        assert run.exists() == keep
        assert other.poll() is None  # not the run's
        other.kill()
        other.wait()


def test_next_run_removes_folders_of_dead_simulations(tmp_path):
    """What the watcher could not remove (it was killed too): the next simulate removes temporary folders whose
    owner process is dead; those of a live simulate and a failed run's kept logs (no owner file) stay."""
    from fedclip_cache.launch.procs import process_start
    from fedclip_cache.launch.simulate import OWNER_FILE, sweep_stale_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {name: tmp_path / f"fedclip-sim-{name}" for name in ("dead", "live", "kept", "reused")}
    for d in folders.values():
        (d / "ray").mkdir(parents=True)
    (folders["dead"] / OWNER_FILE).write_text(f"{dead.pid} 1")
    (folders["live"] / OWNER_FILE).write_text(f"{os.getpid()} {process_start(os.getpid())}")
    (folders["reused"] / OWNER_FILE).write_text(f"{os.getpid()} 1")  # this PID, but another process's start time
    assert sorted(sweep_stale_folders(str(tmp_path))) == [folders["dead"], folders["reused"]]
    assert folders["live"].exists() and folders["kept"].exists()
