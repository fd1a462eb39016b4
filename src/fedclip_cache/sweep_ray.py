"""``sweep … --ray auto|ADDRESS``: the grid points of a sweep as Ray tasks, on this machine or on a Ray cluster.

The unit of work is the sweep's own: one grid point, all its seeds training together as lanes of one vectorised
loop (:func:`fedclip_cache.sweep.train_point`). Each point is one Ray task with declared resources
(``--cpus-per-task``, ``--gpus-per-task``; fractional GPUs let several small points share one GPU), retried by Ray
when its worker or node dies (``max_retries`` = :data:`RAY_TASK_RETRIES`; a point's own error is not retried).

* The cache is read from its path by every task (a shared filesystem, as clusters have). Before the sweep folder is
  touched, one probe task per node that can run a point (pinned to it) opens the cache's metadata there and compares
  its identity (path and commit) with the driver's; a node that cannot see the path, sees another commit, or cannot
  import fedclip-cache is a one-line error naming the node. A worker opens the cache once and keeps it for the next
  points it trains (checked again against the driver's identity, so a node added later cannot train on another
  commit). Features are never shipped through Ray's object store.
* Tasks return the loop's result; the DRIVER writes each point's folder as its task finishes
  (:func:`fedclip_cache.sweep.commit_point`, ``summary.json`` last), so there is one writer and the sweep stays
  resumable: a killed driver's next run re-runs only the points without ``summary.json``. ``sweep.json`` records the
  node that trained each point (``ran_on``).
* ``--ray auto`` starts a new local Ray instance for this sweep (Ray's ``address="local"``; never a cluster named by
  ``RAY_ADDRESS``), without dashboard, usage statistics off, its session folder under ``$TMPDIR/fedclip-sweep-*``
  (removed afterwards), and shuts it down at the end, on error and on Ctrl-C. ``--ray HOST:PORT`` (or
  ``ray://HOST:PORT``, Ray Client) joins a running cluster; Ctrl-C cancels this sweep's tasks and disconnects,
  leaving the cluster up.

Requires Ray (``pip install 'fedclip-cache[ray]'``; ``[simulation]`` brings it too).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from .errors import ConfigError, FedclipCacheError

EXTRA_HINT = "pip install 'fedclip-cache[ray]'"
RAY_TASK_RETRIES = 3  # Ray's own default for tasks; a point whose worker or node dies is tried again elsewhere
AUTO_OBJECT_STORE_BYTES = 200 * 2**20  # `--ray auto`: results are small (curves, one adapter); features never travel
PROBE_TIMEOUT_S = 120.0


class RayError(FedclipCacheError):
    """The Ray cluster cannot run this sweep (not reachable, a node without the cache, a task that kept dying)."""


@dataclasses.dataclass(frozen=True)
class RayPlan:
    """Where and how a sweep's points run on Ray: ``address`` (``auto``: a new local instance; or a cluster's
    ``HOST:PORT`` / ``ray://HOST:PORT``) and the resources each point's task declares."""
    address: str
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0

    @property
    def threads(self) -> int:
        """torch threads of one task: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_task))


def ray_plan(address: Optional[str], cpus_per_task: Optional[float] = None, gpus_per_task: Optional[float] = None,
             jobs: int = 1, flag: Callable[[str], str] = lambda name: "--" + name) -> Optional[RayPlan]:
    """The checked plan from the options (None: no Ray); each wrong value is a one-line ConfigError naming it.
    ``flag`` words an option's name (``cpus-per-task`` -> ``--cpus-per-task``; a pipeline names its key)."""
    if address is None or str(address).strip() == "":
        for name, value in (("cpus-per-task", cpus_per_task), ("gpus-per-task", gpus_per_task)):
            if value is not None:
                raise ConfigError(f"{flag(name)} {value}: only with {flag('ray')} auto|HOST:PORT (the points run as "
                                  f"Ray tasks); without Ray use --jobs")
        return None
    if jobs != 1:
        raise ConfigError(f"{flag('jobs')} {jobs} with {flag('ray')}: Ray runs as many points at once as the "
                          f"cluster's CPUs allow ({flag('cpus-per-task')} each); leave {flag('jobs')} out")
    cpus = 1.0 if cpus_per_task is None else _number(cpus_per_task, flag("cpus-per-task"))
    gpus = 0.0 if gpus_per_task is None else _number(gpus_per_task, flag("gpus-per-task"))
    if not cpus > 0:
        raise ConfigError(f"{flag('cpus-per-task')} {cpus_per_task}: must be more than 0, e.g. 1 or 0.5")
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise ConfigError(f"{flag('gpus-per-task')} {gpus_per_task}: must be 0, a fraction below 1 (several points "
                          f"share a GPU, e.g. 0.25) or a whole number of GPUs")
    return RayPlan(check_address(str(address), flag("ray")), cpus, gpus)


def _number(value: Any, label: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} {value!r}: not a number") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise ConfigError(f"{label} {value!r}: must be a finite number")
    return x


def check_address(text: str, label: str = "--ray") -> str:
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (port 1-65535); anything else is a one-line error."""
    address = text.strip()
    if address == "auto":
        return address
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{label} {text!r}: expected auto (a new Ray instance on this machine) or a running "
                          f"cluster's HOST:PORT, e.g. 10.0.0.5:6379 (`ray start --head` prints it) or ray://HOST:10001")
    return address


def nodes_text(counts: dict[str, int]) -> str:
    """The progress bar's "where": ``on 10.0.0.5/0a8971ab: 3, 10.0.0.6/5dc1e505: 2`` (points finished per node)."""
    return ("on " + ", ".join(f"{label}: {n}" for label, n in counts.items())) if counts else ""


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise RayError(f"sweep --ray needs Ray (not installed): {EXTRA_HINT}")


class PointDone(NamedTuple):
    """What a point's Ray task sends back to the driver: the loop's result and summary (or the point's own
    one-line error, e.g. a refused --hidden), and the node that trained it."""
    folder: str
    cfg: dict
    res: Any
    summary: Optional[dict]
    node: str
    host: str
    error: Optional[FedclipCacheError] = None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------------------------------- on the workers

_OPEN: dict = {}  # one worker process's open cache, kept for its next points: {(path, identity): FeatureCache}


def _worker_cache(cache_path: str, identity: dict, opener: dict):
    from .cache.reader import open_cache

    key = (cache_path, json.dumps(identity, sort_keys=True))
    if key not in _OPEN:
        _OPEN.clear()
        cache = open_cache(cache_path, **opener)
        if cache.identity() != identity:
            raise RayError(f"{_where()}: the cache {cache_path} there is not the one the sweep checked (another "
                           f"commit: extract ran meanwhile, or another copy); re-run the sweep")
        _OPEN[key] = cache
    return _OPEN[key]


def _where() -> tuple[str, str]:
    import ray

    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def train_task(cache_path: str, identity: dict, opener: dict, cfg: dict, seeds: list[int], folder: str,
               threads: int) -> PointDone:
    """A Ray task: one point trained, nothing written (the driver commits it)."""
    from .sweep import train_point

    node, host = _where()
    try:
        res, summary = train_point(_worker_cache(cache_path, identity, opener), cfg, seeds, threads)
    except FedclipCacheError as e:  # the point's own refusal: the driver handles it as a local sweep does
        return PointDone(folder, cfg, None, None, node, host, e)
    return PointDone(folder, cfg, res, summary, node, host)


def probe_task(cache_path: str, allow_incomplete: bool) -> dict:
    """A Ray task pinned to one node: the cache's identity as that node sees it (or why it cannot)."""
    import fedclip_cache
    from .cache.reader import open_cache

    node, host = _where()
    try:
        seen = open_cache(cache_path, allow_incomplete=allow_incomplete, load_features=False).identity()
    except (OSError, FedclipCacheError) as e:
        return {"node": node, "host": host, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    return {"node": node, "host": host, "identity": seen, "version": fedclip_cache.__version__}


# ----------------------------------------------------------------------------------------- on the driver

def _still_alive(node_id: str) -> bool:
    """Whether the node ``node_id`` is alive in the cluster now (a node killed a moment ago may still have been
    listed: Ray marks it dead only after missed heartbeats)."""
    import ray

    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


class RaySession:
    """This sweep's connection to Ray: made and checked on creation (every node that can run a point sees the
    driver's cache), :meth:`run` runs points, :meth:`close` disconnects (and stops an ``auto`` instance)."""

    def __init__(self, plan: RayPlan, cache_path, identity: dict, opener: dict, points: list):
        require_ray()
        if plan.gpus_per_task == 0 and any(str(c.device).startswith("cuda") for c in points):
            raise ConfigError("--device cuda with --ray: give --gpus-per-task (e.g. 1, or 0.25 to share a GPU); a "
                              "task without GPUs sees none")
        self.plan, self.cache_path, self.identity, self.opener = plan, str(cache_path), identity, opener
        self.tmp: Optional[Path] = None
        self.connected = False
        try:
            self._connect()
            self.nodes = self._check_nodes()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        if ray.is_initialized():
            raise RayError("sweep --ray: this process is already connected to Ray; run the sweep in a new process")
        common = {"logging_level": "WARNING", "log_to_driver": False}
        with warnings.catch_warnings():  # Ray's tip about a future default; today's (a task without GPUs sees
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)  # none) is ours
            self._init(ray, common)
        self.connected = True

    def _init(self, ray, common: dict) -> None:
        if self.plan.address == "auto":
            self.tmp = Path(tempfile.mkdtemp(prefix="fedclip-sweep-"))
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=AUTO_OBJECT_STORE_BYTES, _temp_dir=str(self.tmp / "ray"), **common)
        else:
            try:
                ray.init(address=self.plan.address, **common)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RayError(f"--ray {self.plan.address}: no Ray cluster could be joined there ({first}); start "
                               f"one with `ray start --head --port PORT`, or use --ray auto") from None

    def _check_nodes(self) -> list[dict]:
        """The nodes that can run a point, each checked to see the driver's cache (one-line error otherwise)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        import fedclip_cache

        alive = [n for n in ray.nodes() if n.get("Alive")]
        fit = [n for n in alive if n["Resources"].get("CPU", 0) >= self.plan.cpus_per_task
               and n["Resources"].get("GPU", 0) >= self.plan.gpus_per_task]
        if not fit:
            most = max((n["Resources"].get("CPU", 0) for n in alive), default=0)
            gpus = max((n["Resources"].get("GPU", 0) for n in alive), default=0)
            raise RayError(f"--cpus-per-task {self.plan.cpus_per_task:g} --gpus-per-task "
                           f"{self.plan.gpus_per_task:g}: no node of the Ray cluster has that much (largest: "
                           f"{most:g} CPU(s), {gpus:g} GPU(s)); lower them or add nodes")
        probe = ray.remote(probe_task)
        refs = [probe.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(self.cache_path, bool(self.opener.get("allow_incomplete")))
            for n in fit]
        usable = []
        for n, ref in zip(fit, refs):
            where = f"Ray node {n.get('NodeManagerAddress')} ({n['NodeID'][:8]})"
            try:
                seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RayError(f"{where}: did not answer the cache check within {PROBE_TIMEOUT_S:g} s") from None
            except ray.exceptions.RayError as e:
                if not _still_alive(n["NodeID"]):  # it left the cluster since it was listed: not a broken install
                    continue
                raise RayError(f"{where}: cannot run fedclip-cache's tasks ({_first_line(e)}); install the same "
                               f"fedclip-cache ({fedclip_cache.__version__}) on every node") from None
            if "error" in seen:
                raise RayError(f"{where}: cannot read the cache {self.cache_path} ({seen['error']}); put it on a "
                               f"filesystem every node mounts at the same path")
            if seen["identity"] != self.identity:
                raise RayError(f"{where}: {self.cache_path} there is another cache or commit than on this machine; "
                               f"every node must see the same cache (a shared filesystem)")
            usable.append(n)
        if not usable:
            raise RayError("every Ray node that could run a point left the cluster during the cache check; "
                           "start the nodes again")
        return usable

    def run(self, todo: list, seeds: list[int], commit: Callable[[PointDone], None]) -> None:
        """Every ``(cfg, folder)`` of ``todo`` as a task; ``commit`` is called on the driver as each one finishes.
        Any error, Ctrl-C included, cancels this sweep's tasks still queued or running."""
        import ray

        task = ray.remote(train_task).options(num_cpus=self.plan.cpus_per_task, num_gpus=self.plan.gpus_per_task,
                                              max_retries=RAY_TASK_RETRIES)
        pending = {task.remote(self.cache_path, self.identity, self.opener, cfg.to_dict(), seeds, str(folder),
                               self.plan.threads): folder for cfg, folder in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    folder = pending.pop(ref)
                    commit(self._result(ref, folder))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    @staticmethod
    def _result(ref, folder) -> PointDone:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), FedclipCacheError):
                raise e.cause from None
            raise
        except ray.exceptions.RayError as e:  # its worker or node died more often than the retries
            raise RayError(f"point {Path(folder).name}: its Ray task failed {RAY_TASK_RETRIES + 1} times "
                           f"({_first_line(e)}); the finished points are kept: re-run the same command to go on") \
                from None

    def close(self) -> None:
        """Disconnect from Ray (an ``auto`` instance is stopped with it) and remove its session folder."""
        if self.connected:
            import ray

            ray.shutdown()
            self.connected = False
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
