"""The same Flower ServerApp and ClientApp as a deployment, run in Flower's simulation engine (Ray), in one command.

``fedclip-cache simulate CACHE -o RUN --heldout D`` runs :data:`fedclip_cache.flower.server_app.server_app` and
:data:`fedclip_cache.flower.client_app.client_app` unchanged under ``flwr.simulation.run_simulation``: a SuperLink in memory,
one *virtual* SuperNode per client, the ClientApp executed by a pool of Ray actors (processes) on this machine.

Flower's ``run_simulation`` hands the apps an EMPTY run config and a node config of ``partition-id`` /
``num-partitions`` only, so the apps are wrapped (:class:`ConfiguredServerApp`, :class:`ConfiguredClientApp`):
the wrappers put the run config (the federate options, ``cache`` or ``sites``, ``heldout``, ``out``) and each
node's own node config into Flower's ``Context`` and call the real apps -- which read them exactly as in a
deployment:

* one shared cache (``CACHE``): node K < n is the K-th training client (``partition-id=K``) of the shared cache;
  with ``--heldout D`` one more node evaluates the held-out domain. The apps only let a *site's own cache* be the
  held-out site, so its rows are first copied into a single-domain cache in the simulation's temporary folder
  (``summary.json`` names the shared cache as the held-out site's, with a note; the copy is deleted after the run).
* per-site caches (``SITE_CACHE ...``, each one domain): node K has ``cache=SITE_K``.

Offline and contained: Ray is started as a new local instance (``address="local"``, never a cluster named by
``RAY_ADDRESS``), without its dashboard, with usage statistics off (``RAY_USAGE_STATS_ENABLED=0``); Flower's
telemetry is off too. Ray's session folder (its logs, sockets, object spill) lives in a temporary folder outside
the run folder (``$TMPDIR/fedclip-sim-*/ray``) -- removed after the run, kept only when the run failed in Ray or
Flower (the error names it) -- and Ray is shut down on success, failure, Ctrl-C and SIGTERM (the CLI then exits at once,
without waiting for Flower's engine threads that may still wait on Ray). When the simulate process is killed
outright (``kill -9``, the OOM killer), a watcher process (:mod:`fedclip_cache.launch.sim_guard`) kills what is left of
its Ray instance and removes the temporary folder; a folder that outlived both is removed by the next ``simulate``.
What a simulation does NOT exercise: real processes per site, the network, TLS, a SuperNode that dies or comes back
(``fedclip-cache deploy`` does).

Requires ``pip install 'fedclip-cache[simulation]'`` (``flwr[simulation]``: Ray).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from ..errors import ConfigError, FedclipCacheError
from .sim_guard import KEEP, MARK
from .procs import OWNER_FILE, make_owned, sigterm_interrupts, sweep_stale
from ..flower.task import SIMULATION_POLL_INTERVAL as DEFAULT_POLL_INTERVAL

EXTRA_HINT = "pip install 'fedclip-cache[simulation]'"


class SimulationError(FedclipCacheError):
    """The simulation could not start or did not finish; the message says why and where the logs are."""


class Interrupted(Exception):
    """Raised in the ServerApp's thread once the simulation was stopped (Ctrl-C, failure): ends that thread."""


def require_simulation() -> None:
    """A one-line error naming the extra when Flower or Ray is missing."""
    import importlib.util

    missing = [m for m in ("flwr", "ray") if importlib.util.find_spec(m) is None]
    if missing:
        raise SimulationError(f"simulate needs Flower's simulation engine ({' and '.join(missing)} not installed): "
                              f"{EXTRA_HINT}")


# ------------------------------------------------------------------------------------------------ the plan

def run_config(cfg, out: Path, *, cache: Optional[str] = None, sites: int = 0) -> dict:
    """The Flower run config: a deployment's (:func:`fedclip_cache.flower.task.run_config`: the federate options that
    differ from the defaults as scalars, ``sites``, ``heldout``, ``out``), plus ``cache`` for one shared cache."""
    from ..flower.task import run_config as deployment_run_config

    rc = deployment_run_config(cfg, sites, out)
    if cache is not None:
        rc["cache"] = str(cache)
    return rc


def _check_federation(cfg) -> None:
    if cfg.protocol == "lodo" and not cfg.heldout:
        raise ConfigError("simulate: one federation per run: give --heldout DOMAIN (leave-one-domain-out) or "
                          "--protocol personal")
    if len(cfg.heldout) > 1:
        raise ConfigError("simulate: --heldout takes one domain (one federation per run)")


def write_domain_cache(cache, domain: str, out: Path) -> Path:
    """A complete single-domain cache at ``out`` holding ``cache``'s rows of ``domain`` (features as float32, the
    same classes, prompts, text embeddings, model record and logit scale): what a site that owns only that domain
    would have extracted."""
    from ..cache import store
    from ..cache.integrity import shard_record
    from ..cache.schema import FORMAT_VERSION, complete_columns

    rows = np.flatnonzero(cache.domains == domain)
    fmt = cache.meta["format"]
    n = len(rows)
    cols = complete_columns({"id": cache.ids[rows], "path": cache.paths[rows], "domain": cache.domains[rows],
                             "client": cache.clients[rows], "class_name": cache.class_names[rows],
                             "split": cache.splits[rows], "label": cache.labels[rows]}, n)
    session = store.FIXED_SESSION
    name = store.shard_name(session, 0, 0, fmt)
    out = Path(out)
    fingerprint = cache.meta.get("fingerprint")
    cache_id = store.new_cache_id()  # another cache than the one it copies rows from
    store.write_shard(out / store.SHARD_DIR / name, fmt, cols, np.asarray(cache.features[rows], np.float32),
                      "float32", {"fingerprint": fingerprint, "session": session, "cache_id": cache_id,
                                  "skipped": []})
    store.write_text(out, fmt, list(cache.templates), list(cache.classes), cache.text_embeddings)
    meta = {**cache.meta, "format_version": FORMAT_VERSION, "cache_id": cache_id, "dtype": "float32",
            "domains": [domain],
            "counts": {"images": n, "skipped": 0},
            "runs": [], "state": "complete", "shards": {name: shard_record(out / store.SHARD_DIR / name, n)},
            "last_session": session, "skipped": [], "retired": {"count": 0, "paths": []},
            "simulated_site_of": str(cache.path)}
    store.write_json(out / store.META_FILE, meta)
    return out


class SimulationPlan(NamedTuple):
    """What :func:`plan` settled: Flower's run config, the node config of each virtual SuperNode, and what each
    node is (domain -> role, for the log)."""

    run_config: dict
    nodes: list
    roles: dict


def plan(caches: list, cfg, out: Path, tmp: Path) -> SimulationPlan:
    """The run config, the node config per virtual SuperNode and what each node is, for ``caches``: one shared cache or one
    cache per site. May write the held-out domain's single-domain cache under ``tmp``."""
    from ..cache.reader import open_cache
    from ..federated.protocols import build_experiments

    from .checks import check_run_folder

    _check_federation(cfg)
    check_run_folder(out, "simulate")
    caches = [Path(c).resolve() for c in caches]
    if not caches:
        raise ConfigError("simulate: give a cache (one shared cache, or one cache per site)")
    if len(caches) > 1:
        from .checks import check_site_options, check_sites

        domains = check_sites(caches, cfg, "simulate")  # the same checks as a deployment's sites
        check_site_options(caches, cfg)
        rc = run_config(cfg, out, sites=len(caches))
        nodes = [{"cache": str(c)} for c in caches]
        held = cfg.heldout[0] if cfg.heldout else None
        roles = {d: ("held out: evaluates only" if d == held else f"site cache {c}") for d, c in zip(domains, caches)}
        return SimulationPlan(rc, nodes, roles)
    cache = caches[0]
    if not cache.is_dir():
        raise ConfigError(f"simulate: cache {cache} does not exist (run `fedclip-cache extract` first)")
    rc = run_config(cfg, out, cache=str(cache))  # `sites` is set below, once the nodes are known
    from .checks import check_text_towers

    check_text_towers([cache], cfg)  # prompt learning: the text tower every node rebuilds from this cache
    fc = open_cache(cache)
    exp = build_experiments(fc, cfg)[0]  # the run's training clients, exactly as `federate` forms them
    n = len(exp.clients)
    if n < 2:
        raise ConfigError(f"simulate: {n} training client(s) in {cache}; a federation needs at least 2 (use "
                          f"--partition / --clients to split the data)")
    nodes = [{"partition-id": k, "num-partitions": n} for k in range(n)]
    roles = {c.name: f"partition-id {k}" for k, c in enumerate(exp.clients)}
    if exp.heldout_name:  # the apps evaluate a held-out domain only at a site that owns it: give it its own cache
        from ..cache.sources import check_path_name  # (caches made before extract checked names: it names a folder here)

        check_path_name("domain", exp.heldout_name, f"simulate: {cache}")
        site = write_domain_cache(fc, exp.heldout_name, tmp / "heldout" / exp.heldout_name)
        nodes.append({"cache": str(site)})
        roles[exp.heldout_name] = "held out: evaluates only (a single-domain copy of its rows)"
    rc["sites"] = len(nodes)  # the ServerApp opens no cache: it waits for this many nodes
    return SimulationPlan(rc, nodes, roles)


def _name_the_shared_cache(summary: dict, path: Path, cache: Path, domain: str) -> dict:
    """``summary.json``'s entry for the held-out site of a shared-cache simulation names the shared cache (its path
    and identity; the held-out node read a temporary single-domain copy of its rows, deleted after the run) instead
    of that copy."""
    from ..cache.reader import open_cache
    from ..cache.store import write_json

    site = summary.get("cache", {}).get("sites", {}).get(domain)
    if site is None:
        return summary
    fc = open_cache(cache)
    site.update({"path": str(cache), "complete": bool(fc.complete), "identity": json.dumps(fc.identity()),
                 "note": f"evaluated from a temporary copy of domain {domain}'s rows of this cache"})
    write_json(path, summary)
    from ..federated.runfolder import RUN_OUTPUTS, mark_complete

    mark_complete(path.parent, "deploy", RUN_OUTPUTS)  # the ServerApp's record listed the summary before this edit
    return summary


# ------------------------------------------------------------------------------------------------ the apps

def _wrapper_classes():
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    class ConfiguredClientApp(ClientApp):
        """Flower's ClientApp ``app`` with this simulation's run config and node K's node config
        (``partition-id`` K as Flower's simulation numbers the nodes)."""

        def __init__(self, app, run_config: dict, nodes: list[dict]):
            super().__init__()
            self.app, self.run_config, self.nodes = app, dict(run_config), [dict(n) for n in nodes]

        def __call__(self, message, context):
            # a copy: Flower refuses a returned Context whose run config changed; the state is shared
            mine = Context(run_id=context.run_id, node_id=context.node_id, state=context.state,
                           node_config=dict(self.nodes[int(context.node_config["partition-id"])]),
                           run_config=dict(self.run_config))
            return self.app(message, mine)

    class ConfiguredServerApp(ServerApp):
        """Flower's ServerApp ``app`` with this simulation's run config; once ``stop`` is set, every call it makes
        to the grid raises :class:`Interrupted` (so Ctrl-C or a failure also ends the ServerApp's thread)."""

        def __init__(self, app, run_config: dict, stop: threading.Event):
            super().__init__(server_fn=lambda context: None)  # never used: __call__ runs ``app``
            self.app, self.run_config, self.stop = app, dict(run_config), stop
            self.thread: Optional[threading.Thread] = None

        def __call__(self, grid, context):
            self.thread = threading.current_thread()
            for name in ("push_messages", "pull_messages", "get_node_ids", "send_and_receive"):
                setattr(grid, name, self._guard(getattr(grid, name)))
            context.run_config = dict(self.run_config)
            return self.app(grid=grid, context=context)

        def _guard(self, fn):
            def call(*a, **k):
                if self.stop.is_set():
                    raise Interrupted("the simulation was stopped")
                return fn(*a, **k)

            return call

    return ConfiguredClientApp, ConfiguredServerApp


# ------------------------------------------------------------------------------------------------ the run

TMP_PREFIX = "fedclip-sim-"


def sweep_stale_folders(tmpdir: Optional[str] = None) -> list:
    """Remove the temporary folders of simulations whose simulate process is dead (what its watcher,
    :mod:`fedclip_cache.launch.sim_guard`, could not remove: both were killed); a failed run's kept Ray logs have no owner
    file and stay. Returns the removed folders."""
    return sweep_stale(TMP_PREFIX, Path(tmpdir) if tmpdir else None)


def _start_guard(tmp: Path) -> Optional[subprocess.Popen]:
    """The watcher (:mod:`fedclip_cache.launch.sim_guard`) that kills this run's Ray processes and removes ``tmp`` if this
    process dies without cleaning up; None where it cannot start (the run goes on without it)."""
    from . import sim_guard

    try:
        return subprocess.Popen([sys.executable, "-I", sim_guard.__file__, str(tmp), str(tmp)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


def _stop_guard(guard: Optional[subprocess.Popen], keep: bool) -> None:
    """Tell the watcher this process cleaned up (``keep``: the folder holds Ray's logs of a failed run): it kills
    what is left of the run's processes (normally nothing) and exits."""
    if guard is None:
        return
    try:
        if keep:
            guard.stdin.write(KEEP)
        guard.stdin.close()
    except OSError:
        pass
    try:
        guard.wait(timeout=10)
    except subprocess.TimeoutExpired:  # it goes on alone, detached
        pass


def backend_config(num_cpus: Optional[int] = None, client_cpus: float = 1.0, extra: Optional[dict] = None,
                   ray_dir: Optional[Path] = None) -> dict:
    """Flower's backend config for Ray: ``num_cpus`` for Ray in all (default: this machine's), ``client_cpus`` per
    ClientApp actor (actors = num_cpus // client_cpus, each one process), ``extra`` merged on top (``init_args``,
    ``client_resources``, ``actor``); a local Ray instance whatever ``extra`` says."""
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"simulate: --num-cpus {num_cpus}: must be at least 1")
    if not client_cpus > 0:
        raise ConfigError(f"simulate: --client-cpus {client_cpus}: must be more than 0")
    total = num_cpus or os.cpu_count() or 1
    if client_cpus > total:
        raise ConfigError(f"simulate: --client-cpus {client_cpus:g} is more than Ray's {total} CPU(s): no ClientApp "
                          f"could run; lower --client-cpus or raise --num-cpus")
    cfg = {"init_args": {"num_cpus": total, "include_dashboard": False, "logging_level": "WARNING"},
           "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}}
    for key, value in (extra or {}).items():
        if key not in ("init_args", "client_resources", "actor") or not isinstance(value, dict):
            raise ConfigError(f"simulate: --backend-config key {key!r}: expected init_args, client_resources or "
                              f"actor, each a JSON object")
        cfg.setdefault(key, {}).update(value)
    if str(cfg["init_args"].get("address", "local")) != "local":
        raise ConfigError("simulate: --backend-config init_args.address: the simulation starts its own local Ray "
                          "instance (leave address out)")
    cfg["init_args"]["address"] = "local"  # never a cluster from RAY_ADDRESS
    if ray_dir is not None:
        cfg["init_args"].setdefault("_temp_dir", str(ray_dir))
    return cfg


def parse_backend_config(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        value = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"simulate: --backend-config: not a JSON object or @FILE of one ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError("simulate: --backend-config: expected a JSON object, e.g. "
                          "'{\"client_resources\": {\"num_cpus\": 1}}'")
    return value


def simulate(caches: list, out, cfg, *, num_cpus: Optional[int] = None, client_cpus: float = 1.0,
             backend: Optional[dict] = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
             round_timeout: Optional[float] = None, min_results: Optional[int] = None,
             log: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Run ``cfg`` (a validated FederateConfig: ``--heldout D`` or ``--protocol personal``) on ``caches`` (one
    shared cache, or one cache per site) in Flower's simulation engine; the ServerApp writes the run folder
    ``out`` as ``federate`` does. Returns ``{"summary", "run_config", "nodes", "timings", "ray_dir"}``; raises a
    one-line :class:`FedclipCacheError` for bad input (before Ray starts) and when the run failed.

    The steps (:class:`SimulationRun`): plan the nodes and check everything, take the run folder and start the
    watcher, run Flower's engine, collect the run folder's summary; then shut Ray down and remove the temporary
    folder, whatever happened (SIGTERM ends the run as Ctrl-C does)."""
    require_simulation()
    if not 0 < poll_interval <= 60:
        raise ConfigError(f"simulate: --poll-interval {poll_interval}: must be in (0, 60] seconds")
    t0 = time.monotonic()
    out = Path(out).resolve()
    sweep_stale_folders()
    run = SimulationRun(out, log)
    # SIGTERM as Ctrl-C (Ray's driver replaces this handler by one raising SystemExit(15): run_engine handles it)
    with sigterm_interrupts():
        try:
            run.prepare(caches, cfg, poll_interval=poll_interval, round_timeout=round_timeout,
                        min_results=min_results, num_cpus=num_cpus, client_cpus=client_cpus, backend=backend)
            run.start()
            run_s = run.run_engine(verbose)
            return run.collect(t0, run_s)
        except SimulationError:  # its message names Ray's session folder: keep that one
            run.keep_ray_logs = True
            raise
        finally:
            run.clean_up()


class SimulationRun:
    """One simulation's state from its temporary folder (``$TMPDIR/fedclip-sim-*``: Ray's session folder, the
    held-out domain's copy) to its clean-up: the plan, the backend config, the run folder's lock, the ServerApp
    wrapper, the watcher process, and what the run changes in this process's environment."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.out, self.log = out, log
        self.tmp = make_owned(TMP_PREFIX)  # short: Ray's socket paths must stay < 108 characters
        self.keep_ray_logs = False  # a failed run in Ray or Flower: its error names Ray's logs, which stay
        self.env_before = {k: os.environ.get(k)
                           for k in ("RAY_USAGE_STATS_ENABLED", "PYTHONPATH", "FLWR_TELEMETRY_ENABLED", MARK)}
        self.stop = threading.Event()
        self.plan: Optional[SimulationPlan] = None
        self.backend: Optional[dict] = None
        self.server = self.client = self.guard = self.run_lock = None

    def prepare(self, caches: list, cfg, *, poll_interval: float, round_timeout: Optional[float],
                min_results: Optional[int], num_cpus: Optional[int], client_cpus: float,
                backend: Optional[dict]) -> None:
        """Every check before Ray starts: the nodes (:func:`plan`), the run config as the apps will read it, the
        backend config (:func:`backend_config`); Flower and Ray switched offline."""
        self.plan = plan(caches, cfg, self.out, self.tmp)
        rc = self.plan.run_config
        rc["poll_interval"] = float(poll_interval)
        if round_timeout is not None:
            rc["round_timeout"] = float(round_timeout)
        if min_results is not None:
            rc["min_results"] = int(min_results)
        from ..flower.task import check_deployment_keys

        check_deployment_keys(rc)  # before Ray starts
        from ..federated.tracking import check_available

        check_available(cfg.log)  # --log: the ServerApp's trackers installed
        self.backend = backend_config(num_cpus, client_cpus, backend, self.tmp / "ray")
        # offline: no usage statistics from Ray, no telemetry from Flower (read when flwr is first imported, so
        # also switched off in the module if something imported it already)
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
        import flwr.supercore.telemetry as telemetry

        telemetry.FLWR_TELEMETRY_ENABLED = "0"
        from flwr.simulation import run_simulation  # noqa: F401  (Ray: imported before the run folder is taken)

    def start(self) -> None:
        """The apps' own option check, the run folder taken, the apps wrapped with the run config, the watcher
        started and this run's processes marked."""
        rc, nodes, roles = self.plan.run_config, self.plan.nodes, self.plan.roles
        from ..flower.client_app import client_app
        from ..flower.server_app import server_app
        from ..flower.task import federate_config

        federate_config(rc)  # the apps' own option check, before Ray starts
        from ..federated.runfolder import claim

        # the run folder's one lock and state marker, as deploy claims its own (a second simulate or a deploy into
        # it is refused in one line naming the holder; an earlier run's outputs go; the ServerApp marks it complete)
        self.run_lock = claim(self.out, "deploy", "simulate -o")
        ClientW, ServerW = _wrapper_classes()
        self.server = ServerW(server_app, rc, self.stop)
        self.client = ClientW(client_app, rc, nodes)
        for name, role in roles.items():
            self.log(f"node {name}: {role}")
        n_actors = int(self.backend["init_args"]["num_cpus"] // self.backend["client_resources"]["num_cpus"])
        self.log(f"simulating {len(nodes)} SuperNodes on {n_actors} Ray actor(s) (Ray's session folder: "
                 f"{self.tmp / 'ray'})")
        self.guard = _start_guard(self.tmp)
        os.environ[MARK] = str(self.tmp)  # inherited by every process of this run's Ray instance: the guard finds them

    def run_engine(self, verbose: bool) -> float:
        """Flower's ``run_simulation`` until the ServerApp has finished; its failures as one-line errors. Returns
        the seconds it took."""
        from flwr.simulation import run_simulation

        t1 = time.monotonic()
        try:
            with warnings.catch_warnings():  # Ray 2.55's tip about its future default for num_gpus=0 actors (they
                # keep seeing no GPU either way: the apps run on the CPU)
                warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)
                run_simulation(server_app=self.server, client_app=self.client,
                               num_supernodes=len(self.plan.nodes), backend_config=self.backend,
                               verbose_logging=verbose)
        except SystemExit as e:  # flwr_exit(): Flower's own fatal errors exit the process; make them an error
            if e.code == signal.SIGTERM:  # Ray's driver's SIGTERM handler (no Flower exit code is 15)
                raise KeyboardInterrupt from None
            raise SimulationError(f"Flower's simulation engine stopped (exit {e.code}); see the log above "
                                  f"(Ray's logs: {self.tmp / 'ray'})") from None
        except FedclipCacheError:
            raise
        except Exception as e:
            cause = e.__cause__ or e
            if isinstance(cause, FedclipCacheError):
                raise cause from None
            msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise SimulationError(f"the simulation failed: {type(cause).__name__}: {msg[:300]} (Ray's logs: "
                                  f"{self.tmp / 'ray'})") from e
        return time.monotonic() - t1

    def collect(self, t0: float, run_s: float) -> dict:
        """The run folder's summary (a round with failed clients is a :class:`SimulationError`); writes
        ``simulation.json``. The result of :func:`simulate` (``t0``: when it began)."""
        rc, nodes, roles = self.plan.run_config, self.plan.nodes, self.plan.roles
        out, ray_dir = self.out, self.tmp / "ray"
        summary_path = out / "summary.json"
        if not summary_path.exists():
            raise SimulationError(f"the simulation ended without a run folder ({summary_path} missing); see the "
                                  f"ServerApp's log above (Ray's logs: {ray_dir})")
        summary = json.loads(summary_path.read_text())
        if "cache" in rc and rc.get("heldout"):  # the held-out node evaluated a temporary single-domain copy
            summary = _name_the_shared_cache(summary, summary_path, Path(rc["cache"]), str(rc["heldout"]))
        failed = [r for r in summary.get("deployment", {}).get("rounds", [])
                  if r.get("fit_failures") or r.get("evaluate_failures")]
        if failed:
            r = failed[0]
            raise SimulationError(f"round {r['round']}: {r.get('fit_failures', 0)} training and "
                                  f"{r.get('evaluate_failures', 0)} evaluation failure(s) in {len(failed)} round(s); "
                                  f"the ClientApp's error is in the log above (run folder {out}, Ray's logs: "
                                  f"{ray_dir})")
        timings = {"total_s": round(time.monotonic() - t0, 2), "run_s": round(run_s, 2)}
        res = {"run_config": rc, "nodes": nodes, "roles": roles, "backend_config": self.backend, "timings": timings}
        (out / "simulation.json").write_text(json.dumps(res, indent=2))
        self.log(f"simulation finished in {timings['total_s']:.1f} s (run folder: {out})")
        return {**res, "summary": summary, "ray_dir": None}

    def clean_up(self) -> None:
        """Ray shut down, the ServerApp's thread ended, the environment restored, the temporary folder removed
        (kept, without its owner file, when the error names Ray's logs), the watcher told, the run folder freed."""
        self.stop.set()  # a ServerApp thread still waiting for replies (Ctrl-C, a failure) ends at its next poll
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        server = self.server
        if server is not None and server.thread is not None and server.thread is not threading.current_thread():
            server.thread.join(timeout=30)
        for k, v in self.env_before.items():  # Flower's Ray backend rewrites PYTHONPATH in this process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        keep = self.keep_ray_logs and (self.tmp / "ray").exists()
        if keep:
            shutil.rmtree(self.tmp / "heldout", ignore_errors=True)
            (self.tmp / OWNER_FILE).unlink(missing_ok=True)  # the error names the folder: no later run removes it
        else:  # success, bad input, Ctrl-C, SIGTERM: nothing of the simulation's is left behind
            shutil.rmtree(self.tmp, ignore_errors=True)
        _stop_guard(self.guard, keep)
        if self.run_lock is not None:
            self.run_lock.close()
