"""``sweep --ray``: the options' checks, the driver's bookkeeping (one writer, resumable), and -- marked slow -- a
real two-node local Ray cluster (a head and a worker started with ``ray start`` on this machine, one CPU each):
points run on both nodes, the results equal the local sweep's byte for byte, a worker node killed mid-sweep and a
killed driver lose nothing, and a node that cannot run fedclip-cache is refused before the folder is touched."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedclip_cache.errors import ConfigError
from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.sweep import nodes_count, sweep, train_point
from fedclip_cache.sweep_ray import PointDone, RayPlan, check_address, nodes_text, ray_plan
from fedclip_cache.synthetic import write_synthetic_cache

BASE = dict(rounds=3, lr=1e-3)
GRID = {"hidden": [4, 8, 16]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "c", {"a": 80, "b": 70, "c": 60}, 4, dim=32,
                                 seed=3, class_sep=0.25, domain_shift=0.5)


@pytest.fixture(scope="module")
def local(cache, tmp_path_factory):
    """The same grids swept in this process, without Ray: what every Ray sweep must equal."""
    made = {}

    def make(grid: dict, rounds: int):
        key = json.dumps([grid, rounds])
        if key not in made:
            made[key] = tmp_path_factory.mktemp("local") / "sw"
            sweep(cache, FederateConfig(**{**BASE, "rounds": rounds}), grid, [0, 1], made[key])
        return made[key]
    return make


def same_sweep(a: Path, b: Path) -> None:
    """Two sweep folders hold the same results: tables, plots and every point's metrics, byte for byte (and its
    summary but for the wall time it took)."""
    for name in ("summary.csv", "summary.md", "plots/accuracy_vs_params.png", "plots/accuracy_vs_round.png",
                 "plots/communication_vs_accuracy.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert pq.read_table(a / "results.parquet").equals(pq.read_table(b / "results.parquet"))
    points = sorted(p.name for p in (a / "points").iterdir())
    assert points == sorted(p.name for p in (b / "points").iterdir())
    for p in points:
        assert pq.read_table(a / "points" / p / "metrics.parquet").equals(pq.read_table(b / "points" / p /
                                                                                       "metrics.parquet"))
        sa, sb = (json.loads((f / "points" / p / "summary.json").read_text()) for f in (a, b))
        assert sa.pop("seconds") > 0 and sb.pop("seconds") > 0  # the training's own wall time: never equal
        assert sa == sb


# ------------------------------------------------------------------------------------------- fast: pure parts

def test_ray_options_are_checked():
    assert ray_plan(None) is None
    assert ray_plan("auto") == RayPlan("auto", 1.0, 0.0)
    assert ray_plan("10.0.0.5:6379", 2, 0.25) == RayPlan("10.0.0.5:6379", 2.0, 0.25)
    assert ray_plan(" ray://head:10001 ", "0.5", None).address == "ray://head:10001"
    assert RayPlan("auto", 0.5).threads == 1 and RayPlan("auto", 3.0).threads == 3
    bad = [(("auto", None, None, 2), "--jobs 2 with --ray"), ((None, 2, None), "--cpus-per-task 2: only with --ray"),
           ((None, None, 0.5), "--gpus-per-task 0.5: only with --ray"), (("auto", 0), "must be more than 0"),
           (("auto", float("nan")), "finite"), (("auto", "many"), "not a number"),
           (("auto", 1, 1.5), "a fraction below 1"), (("auto", 1, -1), "a fraction below 1"),
           (("head",), "expected auto"), (("head:0",), "expected auto"), (("head:port",), "expected auto"),
           ((":6379",), "expected auto"), (("http://head:6379",), "expected auto")]
    for args, fragment in bad:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
            ray_plan(*args)
    with pytest.raises(ConfigError, match=r"p.toml: sweep\.cpus_per_task 2: only with p.toml: sweep\.ray"):
        ray_plan(None, 2, None, flag=lambda n: "p.toml: sweep." + n.replace("-", "_"))
    assert check_address("auto") == "auto"


def test_cli_refuses_bad_ray_options_before_any_file(run, one_line_error, cache, tmp_path):
    out = tmp_path / "sw"
    for extra, fragment in ((["--cpus-per-task", "2"], "--cpus-per-task 2.0: only with --ray"),
                            (["--ray", "nowhere"], "--ray 'nowhere': expected auto"),
                            (["--ray", "auto", "--jobs", "2"], "--jobs 2 with --ray"),
                            (["--ray", "auto", "--gpus-per-task", "2.5"], "a fraction below 1")):
        one_line_error(*run("sweep", cache, "-o", out, "--grid", "hidden=4", "--rounds", "1", *extra), fragment)
        assert not out.exists()


def test_pipeline_sweep_keys_make_the_ray_plan(tmp_path):
    from fedclip_cache.pipeline import prepare

    p = tmp_path / "p.toml"
    p.write_text('[federate]\nrounds = 3\n[sweep]\ngrid = { hidden = [4, 8] }\nray = "auto"\ncpus_per_task = 2\n')
    assert prepare(p).ray == RayPlan("auto", 2.0, 0.0)
    assert prepare(p, ["sweep.ray=10.0.0.5:6379", "sweep.gpus_per_task=0.5"]).ray == RayPlan("10.0.0.5:6379", 2.0,
                                                                                            0.5)
    with pytest.raises(ConfigError, match=r"^--set sweep.gpus_per_task 1.5: must be 0, a fraction below 1"):
        prepare(p, ["sweep.gpus_per_task=1.5"])
    p.write_text('[sweep]\ngrid = { hidden = [4] }\ncpus_per_task = 2\n')
    with pytest.raises(ConfigError, match=r"^p.toml: sweep.cpus_per_task 2: only with p.toml: sweep.ray auto"):
        prepare(p)
    assert prepare(p, ["sweep.ray=auto"]).ray == RayPlan("auto", 2.0)


def test_nodes_are_counted_per_point():
    record = {"ran_on": {"p1": {"node": "aaaaaaaaaaaa", "host": "10.0.0.1"},
                         "p2": {"node": "bbbbbbbbbbbb", "host": "10.0.0.2"},
                         "p3": {"node": "aaaaaaaaaaaa", "host": "10.0.0.1"}}}
    counts = nodes_count(record, ["p1", "p2", "p3", "p4"])
    assert counts == {"10.0.0.1/aaaaaaaa": 2, "10.0.0.2/bbbbbbbb": 1}
    assert nodes_text(counts) == "on 10.0.0.1/aaaaaaaa: 2, 10.0.0.2/bbbbbbbb: 1" and nodes_text({}) == ""


class FakeSession:
    """Stands in for :class:`fedclip_cache.sweep_ray.RaySession` (no Ray): trains each point in this process as a
    task would (nothing written) and hands it to the driver's commit; Ctrl-C after ``stop_after`` points."""
    stop_after = None
    made = []

    def __init__(self, plan, cache_path, identity, opener, points):
        from fedclip_cache.cache.reader import open_cache

        self.cache = open_cache(cache_path, **opener)
        self.closed = False
        FakeSession.made.append(self)

    def run(self, todo, seeds, commit):
        for i, (cfg, folder) in enumerate(todo):
            if i == self.stop_after:
                raise KeyboardInterrupt
            assert not (Path(folder) / "summary.json").exists()
            res, summary = train_point(self.cache, cfg.to_dict(), seeds)
            commit(PointDone(str(folder), cfg.to_dict(), res, summary, f"node{i % 2}" * 4, "10.0.0.1"))

    def close(self):
        self.closed = True


def test_driver_commits_each_point_and_a_killed_driver_resumes(monkeypatch, cache, local, tmp_path):
    """The driver writes every point as its task returns (node recorded); stopped after one point (Ctrl-C), the
    next run trains only the others; the finished sweep equals the local one, tables and plots."""
    import fedclip_cache.sweep_ray as sweep_ray

    monkeypatch.setattr(sweep_ray, "RaySession", FakeSession)
    out, base = tmp_path / "sw", FederateConfig(**BASE)
    FakeSession.stop_after, FakeSession.made = 1, []
    with pytest.raises(KeyboardInterrupt):
        sweep(cache, base, GRID, [0, 1], out, ray=RayPlan("auto"))
    assert FakeSession.made[-1].closed
    record = json.loads((out / "sweep.json").read_text())
    done = [p for p in record["points"] if (out / "points" / p / "summary.json").is_file()]
    assert len(done) == 1 and list(record["ran_on"]) == done
    first = (out / "points" / done[0] / "summary.json").stat().st_mtime_ns
    FakeSession.stop_after = None
    seen = []
    res = sweep(cache, base, GRID, [0, 1], out, ray=RayPlan("auto"), on_node=seen.append)
    assert res["ran"] == 2 and res["done"] == 3 and FakeSession.made[-1].closed
    assert (out / "points" / done[0] / "summary.json").stat().st_mtime_ns == first
    assert seen[-1] == {"10.0.0.1/node0nod": 2, "10.0.0.1/node1nod": 1}
    assert json.loads((out / "state.json").read_text())["state"] == "complete"
    same_sweep(local(GRID, BASE["rounds"]), out)


def test_points_trained_on_ray_reach_the_trackers(monkeypatch, cache, tmp_path):
    """--log on a Ray sweep: the driver sends each point it commits to the trackers, as a local sweep does."""
    import fedclip_cache.sweep_ray as sweep_ray

    monkeypatch.setattr(sweep_ray, "RaySession", FakeSession)
    FakeSession.stop_after = None
    out = tmp_path / "sw"
    res = sweep(cache, FederateConfig(**BASE, log="tensorboard"), {"hidden": [4, 8]}, [0], out, ray=RayPlan("auto"))
    assert res["ran"] == 2
    points = sorted(p.name for p in (out / "points").iterdir())
    tracked = sorted(p.name for p in (out / "tb").iterdir())
    assert tracked == points and all(list((out / "tb" / p).rglob("events.*")) for p in points)


def test_a_refused_point_on_ray_is_taken_out_as_locally(monkeypatch, cache, tmp_path):
    """A point the training loop refuses (returned by its task as an error) leaves the folder's points, one line."""
    import fedclip_cache.sweep_ray as sweep_ray

    class Refusing(FakeSession):
        def run(self, todo, seeds, commit):
            cfg, folder = todo[0]
            commit(PointDone(str(folder), cfg.to_dict(), None, None, "n" * 8, "h", ConfigError("--hidden: too big")))

    monkeypatch.setattr(sweep_ray, "RaySession", Refusing)
    out = tmp_path / "sw"
    with pytest.raises(ConfigError, match="too big"):
        sweep(cache, FederateConfig(**BASE), {"hidden": [4]}, [0], out, ray=RayPlan("auto"))
    assert not (out / "sweep.json").exists() and not (out / "points").exists()


# ------------------------------------------------------------------------------- slow: a real two-node cluster

RAY = str(Path(sys.executable).parent / "ray")
LONG = 200  # rounds of the cluster tests' points: long enough (seconds each) that a kill lands while points remain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class LocalCluster:
    """Ray nodes started with ``ray start`` on this machine, one CPU each, in a temporary folder of their own;
    every process of a node carries a mark in its environment, so a node (or the whole cluster) is killed by its
    own processes -- never ``ray stop``, which stops every Ray instance of this machine."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="fcr-")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.marks = []

    def start(self, name: str, head: bool = False, pythonpath: str = os.environ.get("PYTHONPATH", "")) -> None:
        from fedclip_cache.launch.sim_guard import MARK

        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", MARK: f"{self.tmp}-{name}", "PYTHONPATH": pythonpath,
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        ports = [a for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
                 for a in (flag, str(free_port()))]
        where = (["--head", "--port", str(self.port), "--include-dashboard", "false", "--disable-usage-stats",
                  "--ray-client-server-port", str(free_port())] if head else ["--address", self.address])
        cmd = [RAY, "start", *where, "--num-cpus", "1", "--temp-dir", self.tmp, "--object-store-memory",
               str(80 * 10**6), *ports]
        self.marks.append(f"{self.tmp}-{name}")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def kill(self, name: str = "") -> list[int]:
        """SIGKILL one node's processes (its raylet: its workers die with it), or every process of the cluster
        (``name`` empty: also those holding a file of its folder open); the PIDs killed. Only Ray's processes
        (``ray`` in their command line) that carry this cluster's mark or hold its folder are ever signalled."""
        from fedclip_cache.launch.sim_guard import marked

        assert self.tmp.startswith(tempfile.gettempdir() + "/fcr-")  # never an empty or shared folder
        killed = []
        for _ in range(1 if name else 4):  # a process may start while the others die
            found = set()
            for mark in [f"{self.tmp}-{name}"] if name else self.marks:
                found |= set(marked(mark, self.tmp + ("/no-such-folder" if name else ""), os.getpid()))
            found = [pid for pid in sorted(found) if b"ray" in _cmdline(pid)]
            if not found:
                break
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except OSError:
                    pass
            time.sleep(0.5)
        return killed

    def running(self, name: str, task: str) -> list[int]:
        """The PIDs of Ray workers of node ``name`` (children of its raylet) running a task of function ``task``."""
        from fedclip_cache.launch.sim_guard import marked

        raylets = {pid for pid in marked(f"{self.tmp}-{name}", self.tmp + "/no-such-folder", os.getpid())
                   if b"raylet/raylet" in _cmdline(pid)}
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _cmdline(int(entry.name)).startswith(f"ray::{task}".encode()):
                try:
                    ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid in raylets:
                    found.append(int(entry.name))
        return found

    def close(self) -> None:
        import shutil

        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start("head", head=True)
        c.start("worker")
        yield c
    finally:
        c.close()


def cli_sweep(cache, out, grid: str, address: str, *extra, wait: bool = True):
    cmd = [sys.executable, "-m", "fedclip_cache", "sweep", str(cache), "-o", str(out), "--grid", grid,
           "--seeds", "0,1", "--lr", str(BASE["lr"]), "--ray", address, "-q", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def ran_on(out: Path) -> dict:
    try:
        return json.loads((out / "sweep.json").read_text()).get("ran_on", {})
    except (OSError, ValueError):
        return {}


RAY_WAIT_S = 180.0  # a Ray node's start, a point's first rounds: generous under load


@pytest.mark.slow
def test_cluster_killed_driver_resumes_without_rerunning(cluster, cache, local, tmp_path, wait_until):
    """kill -9 of the sweep after its first point: the next run trains only the others, on the cluster."""
    out, grid = tmp_path / "sw", "hidden=4,8,16,32,64,128"
    proc = cli_sweep(cache, out, grid, cluster.address, "--rounds", str(LONG), wait=False)
    try:
        wait_until(lambda: ran_on(out), RAY_WAIT_S)
    finally:
        proc.kill()
        proc.communicate()
    kept = {p.parent.name: p.stat().st_mtime_ns for p in (out / "points").glob("*/summary.json")}
    assert 1 <= len(kept) < 6
    done = cli_sweep(cache, out, grid, cluster.address, "--rounds", str(LONG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{6 - len(kept)} grid point(s) trained now, {len(kept)} re-used" in done.stdout
    assert {p: (out / "points" / p / "summary.json").stat().st_mtime_ns for p in kept} == kept
    assert len({v["node"] for v in ran_on(out).values()}) == 2  # points ran on both nodes (recorded per point)
    same_sweep(local({"hidden": [4, 8, 16, 32, 64, 128]}, LONG), out)


@pytest.mark.slow
def test_a_node_that_cannot_run_fedclip_is_refused_before_anything(cluster, cache, tmp_path):
    """A third node whose fedclip-cache does not import: a one-line error naming it, and no sweep folder."""
    shadow = tmp_path / "shadow" / "fedclip_cache"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('a broken install')\n")
    cluster.start("broken", pythonpath=str(shadow.parent))
    try:
        out = tmp_path / "sw"
        done = cli_sweep(cache, out, "hidden=4", cluster.address, "--rounds", "1")
        assert done.returncode == 2, done.stdout + done.stderr
        msg = done.stderr.strip()
        assert msg.startswith("error: Ray node") and "\n" not in msg and "cannot run fedclip-cache's tasks" in msg
        assert not out.exists()
    finally:
        assert cluster.kill("broken")


@pytest.mark.slow
def test_two_nodes_equal_the_local_sweep_and_a_killed_worker_loses_nothing(cluster, cache, local, tmp_path,
                                                                            wait_until):
    """The worker node's raylet is SIGKILLed while it trains a point (a ``ray::train_task`` worker under it), with
    points still to run: Ray retries that task on the head, and the results equal the local sweep's."""
    out, grid = tmp_path / "sw", "hidden=4,8,16,32,64,128"
    proc = cli_sweep(cache, out, grid, cluster.address, "--rounds", str(LONG), wait=False)
    try:
        try:
            wait_until(lambda: cluster.running("worker", "train_task"), RAY_WAIT_S)
        except AssertionError:
            proc.kill()
            o, e = proc.communicate()
            raise AssertionError(f"no point reached the worker; the sweep exited {proc.returncode}:\n"
                                 f"{o[-3000:]}\n{e[-3000:]}")
        finished_before = set(ran_on(out))
        assert cluster.kill("worker")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert len(finished_before) < 6  # the point the worker trained was not finished: it ran again elsewhere
    assert len(ran_on(out)) == 6
    same_sweep(local({"hidden": [4, 8, 16, 32, 64, 128]}, LONG), out)


@pytest.mark.slow
def test_ctrl_c_cancels_the_tasks_and_stops_an_auto_instance(cache, tmp_path, wait_until):
    """SIGINT while a point trains on ``--ray auto``: exit 130, no process of that Ray instance left, its session
    folder removed, the sweep folder left in progress (the same command resumes it)."""
    import glob

    from fedclip_cache.launch.sim_guard import marked

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "fedclip-sweep-*")))
    out = tmp_path / "sw"
    proc = cli_sweep(cache, out, "hidden=4,8,16,32", "auto", "--rounds", "60", wait=False)
    try:
        def session():  # this sweep's Ray instance (its session folder), once one of its workers trains a point
            now = set(glob.glob(os.path.join(tempfile.gettempdir(), "fedclip-sweep-*"))) - before
            training = any(_cmdline(pid).startswith(b"ray::train_task") for f in now
                           for pid in marked("-", f, os.getpid()))
            return now if training else None
        folders = wait_until(session, RAY_WAIT_S)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert json.loads((out / "state.json").read_text())["state"] == "in-progress"
    assert not any(Path(f).exists() for f in folders)
    time.sleep(1)
    assert not [pid for f in folders for pid in marked("-", f, os.getpid())]  # no process holds a file there
