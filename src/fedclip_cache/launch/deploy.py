"""A real local Flower deployment: one SuperLink, its ServerApp process and one site per site cache, as separate
processes.

``fedclip-cache deploy SITE_CACHE ... -o RUN`` first starts one fresh "zygote" process (zygote.py; the CLI
starts it through :class:`Launch` even before it validates the options), which forks the SuperLink's child at once
(it imports Flower's SuperLink modules) and imports torch and the apps itself, while this process checks the
options and caches (a failed check kills it: nothing was started or written). Then it writes a throw-away Flower
app folder and ``FLWR_HOME`` (with the connection config) and hands the specs over; the SuperLink's child serves
``flower-superlink --insecure --isolation process`` (flwr 1.42's entry point, on a free localhost port), and the
zygote forks the ServerApp process (serverapp.py: takes the run's ServerApp task and runs it with flwr's
own ``run_serverapp``) and one site per site cache (what ``fedclip-cache site`` runs, site.py: Flower's
SuperNode and the ClientApp worker in one process, node config ``cache="SITE_CACHE"``, its own Runtime API port).
As soon as the SuperLink is up, this process starts the run through its Control API as ``flwr run APP`` would
(flwr_cli.start_run; run config: the federate options, ``sites = N``, ``heldout``, ``out = RUN``) and follows
it in the ServerApp process's log. With ``isolation="subprocess"/"process"`` the SuperLink is a ``flower-superlink``
process of its own and the run is started by ``flwr run APP local --stream`` (followed in its log stream). Every
log goes under ``RUN/logs/``; the run is judged by its status in the SuperLink (``finished:completed``, asked over
the Control API as ``flwr ls`` does), never by ``flwr run``'s exit code (0 even for a failed run in flwr 1.42).
Whatever it started is stopped on success, failure and Ctrl-C (each process is the leader of its own process
group; the group is terminated, then killed; after a completed run everything is killed at once). Temporary
folders of deploys killed with ``kill -9`` are removed by the next deploy (:func:`sweep_stale_folders`); each
site's SuperExec secret lies inside that folder (the sites are SIGKILLed at the end: nothing of theirs may need
their own clean-up). Of ``RUN/logs/`` only the logs a deploy writes are removed (:func:`clear_own_logs`).

Verified recipe (flwr 1.42): the SuperLink serves its Fleet, Control and Runtime APIs on ONE HTTP port
(``--port``; the old ``--fleet-api-address``/``--control-api-address`` are deprecated); a SuperNode's ``--port``
is its own Runtime API (the old ClientAppIo port), so SuperNodes on one machine need distinct ports. The connection
lives in ``$FLWR_HOME/config.toml`` (``[superlink.NAME] address = "host:port"``, ``insecure = true``).

``isolation="subprocess"``/``"process"`` keep Flower's stock runners for comparison: a fresh ``flwr-clientapp``
process per message (~25 s per round with 3 sites on 2 cores). ``poll_interval`` (default 0.2 s) caps the waits of
the ServerApp and the SuperNodes between polls (flower/polls.py; flwr 1.42's own: fixed 3 s) and sets
``flower-superexec``'s task poll.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..cache.store import atomic_write
from ..errors import ConfigError
from .checks import check_run_folder, check_site_options, check_sites
from .flwr_cli import (FLWR_RUN_WHEN_READY, DeployError, app_pyproject, connection_config, final_status, follow_run,
                       run_status, start_run)
from .processes import Deployment, Zygote, wait_until
from ..flower.task import DEFAULT_POLL_INTERVAL, MAX_POLL_INTERVAL
from ..flower.task import run_config  # noqa: F401  (the run config's one codec; also `deploy.run_config`)
from .procs import free_port, make_owned, port_open, signals_ignored, sigterm_interrupts, sweep_stale, write_secret

BINARIES = ("flower-superlink", "flower-supernode", "flwr")
ISOLATIONS = ("worker", "subprocess", "process")


def flower_bin_dir() -> Optional[str]:
    """The folder holding Flower's CLIs: next to this Python (a venv's bin, not necessarily on PATH), else PATH."""
    here = Path(sys.executable).parent
    if all((here / b).exists() for b in BINARIES):
        return str(here)
    found = [shutil.which(b) for b in BINARIES]
    if all(found):
        return str(Path(found[0]).parent)
    return None


TMP_PREFIX = "fedclip-deploy-"


def sweep_stale_folders(root: Optional[Path] = None) -> list[Path]:
    """Remove the temporary folders of deploys that died without cleaning up (``kill -9``, a power cut): their
    owner process is gone (procs.py); a folder without an owner file goes once it is a day old. Only this user's
    folders; returns what was removed."""
    return sweep_stale(TMP_PREFIX, root, unowned_after=86400)


class Launch:
    """What a deployment starts before it knows its options: a private temporary folder, the processes'
    environment and (``isolation="worker"``) the zygote, which imports Flower's SuperLink, torch and the apps while
    the caller imports torch and checks options and caches. :func:`deploy` makes one itself; the CLI makes it
    FIRST, before it validates the federate options (their check imports torch: ~1.5 s the zygote now overlaps).
    :meth:`abort` ends it when a check fails (nothing was forked, nothing written)."""

    def __init__(self, isolation: str = "worker", poll_interval: float = DEFAULT_POLL_INTERVAL):
        if isolation not in ISOLATIONS:
            raise ConfigError(f"deploy: isolation {isolation!r} unknown; choose {', '.join(ISOLATIONS)}")
        if not 0 < poll_interval <= MAX_POLL_INTERVAL:
            raise ConfigError(f"deploy: poll interval {poll_interval}: must be in (0, {MAX_POLL_INTERVAL:g}] seconds")
        self.bindir = flower_bin_dir()
        if self.bindir is None:
            raise DeployError("deploy needs Flower's command-line tools (flower-superlink, flower-supernode, flwr): "
                              "pip install 'fedclip-cache[flower]'")
        self.isolation, self.poll_interval = isolation, poll_interval
        self.zygote = None
        self.used = False  # deploy() took it (and ends it, whatever happens)
        sweep_stale_folders()
        self.tmp = make_owned(TMP_PREFIX)
        try:
            self._start(isolation, poll_interval)
        except BaseException:  # an interrupt right now: no folder left behind
            self.abort()
            raise

    def _start(self, isolation: str, poll_interval: float) -> None:
        tmp = self.tmp
        (tmp / "app").mkdir()
        (tmp / "home").mkdir()
        src = str(Path(__file__).resolve().parents[2])  # src/ (above fedclip_cache/launch/): so flwr-serverapp/
        # -clientapp import this fedclip_cache
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "home"),
                    "PATH": self.bindir + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHONPATH": os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                    "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(max(poll_interval, 0.01))}  # flower-superexec's (1 s)
        # the zygote starts importing flwr and torch now (it forks nothing until it gets its specs)
        self.zygote = Zygote(self.env, tmp / "zygote-early.log") if isolation == "worker" else None

    def abort(self) -> None:
        if self.zygote is not None:
            self.zygote.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def deploy(site_caches: list, out, cfg, *, timeout: Optional[float] = None, log: Callable[[str], None] = print,
           isolation: str = "worker", keep_going: bool = False, round_timeout: Optional[float] = None,
           min_results: Optional[int] = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
           launch: Optional[Launch] = None, flags: Optional[dict] = None) -> dict:
    """Run ``cfg`` (a FederateConfig; validated here, ``flags`` naming its options as the caller spells them) as a
    real Flower deployment on localhost, one SuperNode per site
    cache; return ``{"run_id", "status", "timings", "summary" (RUN/summary.json when the ServerApp wrote one)}``.
    ``isolation="worker"`` (default): each site is ``fedclip-cache site`` (a SuperNode and one long-lived ClientApp
    process); ``"subprocess"``: Flower's SuperNode launches a ``flwr-clientapp`` per message;
    ``isolation="process"``: each SuperNode runs with ``--isolation process`` and this function starts its
    ``flower-superexec`` (which still launches one ``flwr-clientapp`` per message in flwr 1.42). ``keep_going``: a
    SuperNode that dies is reported and the run goes on without it (the ServerApp's fault tolerance:
    ``round_timeout`` seconds per round, ``min_results`` training results per round; see flower/server_app.py); by
    default any dead process fails the deployment at once. ``launch``: a :class:`Launch` the caller started earlier
    (with this ``isolation`` and ``poll_interval``); it is used up either way.

    The steps: take the launch, check everything (:func:`prepare`: nothing started or written on failure), then
    :class:`LocalRun` starts the SuperLink, the sites and the ServerApp, starts and follows the run, collects its
    result, and stops every process on the way out, whatever happened."""
    t0 = time.monotonic()
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        if launch is not None:
            launch.used = True
            launch.abort()
        raise ConfigError(f"deploy: --timeout {timeout}: give a number of seconds > 0 (0: no limit)")
    # SIGTERM ends the deployment as Ctrl-C does, from here on: the launch's temporary folder and zygote exist
    # already, and everything below is undone on the way out
    with sigterm_interrupts():
        launch = _take_launch(launch, isolation, poll_interval)
        try:
            plan = prepare(launch, site_caches, out, cfg, flags, round_timeout, min_results)
        except BaseException:
            launch.abort()
            raise
        run = LocalRun(launch, plan, log, t0)
        try:
            return run.execute(timeout, keep_going)
        finally:
            run.stop()


def _take_launch(launch: Optional[Launch], isolation: str, poll_interval: float) -> Launch:
    """The caller's launch (made for this ``isolation`` and ``poll_interval``) or a new one; marked used: the
    deployment ends it from now on."""
    if launch is None:
        launch = Launch(isolation, poll_interval)
    elif (launch.isolation, launch.poll_interval) != (isolation, poll_interval):
        launch.abort()
        raise ValueError("deploy: launch was made for another isolation / poll interval")
    launch.used = True
    return launch


@dataclass
class DeployPlan:
    """What :func:`prepare` settled before anything starts: the validated options, the sites and the run folder
    (locked, its earlier logs removed)."""

    cfg: object  # the validated FederateConfig
    site_caches: list  # each site's cache (resolved Paths), in the order given
    domains: list  # each site's domain, in the same order
    out: Path  # the run folder (resolved)
    run_config: dict  # Flower's run config: what the ServerApp and every site read
    logs: Path  # RUN/logs/
    lock: object  # the run folder's lock (runfolder.claim), held until the deployment has stopped


def prepare(launch: Launch, site_caches: list, out, cfg, flags: Optional[dict], round_timeout: Optional[float],
            min_results: Optional[int]) -> DeployPlan:
    """Every check of a deployment, before anything starts (one-line errors): the options, the site caches, the
    run folder, the run config as the ServerApp and each site will read it. Then takes the run folder (its lock;
    the earlier run's logs removed)."""
    # (imports flwr: fails early with the install hint)
    from ..flower import client_app  # noqa: F401
    from ..flower.task import check_deployment_keys, federate_config

    cfg = cfg.validate(flags)
    site_caches = [Path(c).resolve() for c in site_caches]
    domains = check_sites(site_caches, cfg)
    out = Path(out).resolve()
    check_run_folder(out)
    rc = run_config(cfg, len(site_caches), out)
    if round_timeout is not None:
        rc["round_timeout"] = float(round_timeout)
    if min_results is not None:
        rc["min_results"] = int(min_results)
    rc["poll_interval"] = float(launch.poll_interval)
    check_deployment_keys(rc)
    _, site_cfg = federate_config(dict(rc))  # the ServerApp's own check, before anything starts
    from ..federated.tracking import check_available

    check_available(site_cfg.log)  # --log: the ServerApp's trackers installed (they run beside deploy)
    check_site_options(site_caches, site_cfg)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lock = _lock_run_folder(out)
    try:
        clear_own_logs(logs, own_logs(domains, launch.isolation))
    except BaseException:
        lock.close()
        raise
    return DeployPlan(cfg, site_caches, domains, out, rc, logs, lock)


class LocalRun:
    """One checked deployment, step by step (:meth:`execute`): the app folder and connection config, the
    SuperLink, the sites and the ServerApp process, the run started, followed and collected. :meth:`stop` ends
    whatever was started (success, failure, Ctrl-C/SIGTERM) and removes the temporary folder.

    ``isolation="worker"``: the launch's zygote forks the SuperLink's child, the ServerApp process and one
    ``fedclip-cache site`` per cache, and the run is started from this process; ``"subprocess"``/``"process"``:
    ``flower-superlink``, ``flwr run`` and one ``flower-supernode`` per site (plus its ``flower-superexec``) are
    processes of their own."""

    def __init__(self, launch: Launch, plan: DeployPlan, log: Callable[[str], None], t0: float):
        self.launch, self.plan, self.log, self.t0 = launch, plan, log, t0
        self.zygote = launch.zygote  # None unless isolation="worker"
        self.port = free_port()
        self.dep = Deployment(launch.env, plan.logs)
        self.timings: dict = {}
        self.grace = 10.0  # seconds each process gets to end after SIGTERM (failure, Ctrl-C)

    def execute(self, timeout: Optional[float], keep_going: bool) -> dict:
        """Start everything, follow the run to its end; the result of :func:`deploy`."""
        tmp = self.launch.tmp
        (tmp / "app" / "pyproject.toml").write_text(app_pyproject(self.plan.run_config))
        (tmp / "home" / "config.toml").write_text(connection_config(self.port))
        self.log(f"SuperLink on 127.0.0.1:{self.port} (logs: {self.plan.logs})")
        if self.zygote is not None:
            self.fork_processes()
        else:
            self.dep.start("superlink", self.superlink_command())
        t1 = time.monotonic()
        flwr_run = run_id = None
        if self.zygote is None:  # `flwr run` at once: it imports Flower's CLI while the SuperLink starts, then
            # waits for its port; its log stream is what the stock runners' rounds are followed by
            flwr_run = self.dep.start("flwr-run", [sys.executable, "-c", FLWR_RUN_WHEN_READY, str(self.port),
                                                   str(tmp / "app"), "local", "--stream"])
        else:
            run_id = self.start_run_in_process()
        wait_until(lambda: port_open(self.port), self.dep, 60, "the SuperLink did not open its port")
        if self.zygote is None:
            self.start_supernodes()
        logs = self.plan.logs
        run_id = follow_run(flwr_run, logs / ("flwr-run.log" if flwr_run else "serverapp.log"), self.dep, self.log,
                            timeout, t1, keep_going, self.timings, self.t0,
                            status=lambda rid: run_status(self.port, rid)[0], run_id=run_id)
        return self.collect(run_id)

    def superlink_command(self, secret_file: Optional[Path] = None) -> list[str]:
        """``flower-superlink`` on this run's port; with ``secret_file`` (the zygote's way), in process isolation
        with that SuperExec secret: the ServerApp process is ours and takes the run's ServerApp task with it."""
        cmd = [f"{self.launch.bindir}/flower-superlink", "--insecure", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if secret_file is not None:
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
        return cmd

    def fork_processes(self) -> None:
        """Hand the zygote its specs: it serves the SuperLink from its pre-forked child and forks the ServerApp
        process and one site (what ``fedclip-cache site CACHE`` runs) per cache, from one process that imported
        torch, flwr and the apps once (zygote.py)."""
        plan, address = self.plan, f"127.0.0.1:{self.port}"
        secret_file = self.launch.tmp / "superexec-secret"  # under the 0700 temporary folder
        write_secret(secret_file)
        # the sites share this machine's cores: torch threads per site so that together they use them all once
        # (each would take every core, and 3 x 2 threads on 2 cores spin against each other: ~10x slower training)
        site_env = {} if "OMP_NUM_THREADS" in os.environ else {
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(plan.site_caches)))}
        threads = int(site_env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        specs = [{"name": "superlink", "kind": "superlink", "log": str(plan.logs / "superlink.log"),
                  "args": self.superlink_command(secret_file)[1:]},  # forked first, before the zygote imports torch
                 {"name": "serverapp", "kind": "serverapp", "log": str(plan.logs / "serverapp.log"),
                  "address": address, "secret_file": str(secret_file)}]
        specs += [{"name": f"site-{dom}", "kind": "site", "log": str(plan.logs / f"site-{dom}.log"), "env": site_env,
                   "cache": str(cache), "superlink": address, "port": free_port(),
                   "poll_interval": self.launch.poll_interval, "threads": threads,
                   # each site's SuperExec secret in a folder inside ours: gone with it, even when the sites are
                   # SIGKILLed (their own clean-up never runs then; each run left one /tmp/fedclip-site-*)
                   "private_root": str(self.launch.tmp)} for cache, dom in zip(plan.site_caches, plan.domains)]
        self.zygote.send(self.dep, specs, plan.logs / "zygote.log")

    def start_run_in_process(self) -> str:
        """Start the run over the Control API as soon as the SuperLink is up (while the zygote imports torch), then
        wait for the zygote's children; returns the run id."""
        wait_until(lambda: port_open(self.port), self.dep, 60, "the SuperLink did not open its port")
        run_id = start_run(self.port, self.launch.tmp / "app")
        self.log(f"run {run_id} started")
        self.zygote.started(self.dep)
        for cache, dom, child in zip(self.plan.site_caches, self.plan.domains, self.zygote.children[2:]):
            self.log(f"site {dom}{self._held_out_note(dom)} (pid {child.pid}): {cache}")
        return run_id

    def start_supernodes(self) -> None:
        """Flower's stock runners: one ``flower-supernode`` per site (``"process"``: with its ``flower-superexec``)."""
        bindir, isolation = self.launch.bindir, self.launch.isolation
        for cache, dom in zip(self.plan.site_caches, self.plan.domains):
            nport = free_port()
            cmd = [f"{bindir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                   "--node-config", f"cache={json.dumps(str(cache))}", "--port", str(nport)]
            if isolation == "process":
                cmd += ["--isolation", "process"]
            self.dep.start(f"site-{dom}", cmd)
            if isolation == "process":
                wait_until(lambda: port_open(nport), self.dep, 60, f"SuperNode {dom} did not open its port")
                self.dep.start(f"site-{dom}-superexec", [f"{bindir}/flower-superexec", "--insecure",
                                                         "--runtime-api-address", f"127.0.0.1:{nport}"])
            self.log(f"SuperNode {dom}{self._held_out_note(dom)}: {cache}")

    def _held_out_note(self, domain: str) -> str:
        heldout = self.plan.cfg.heldout
        return " (held out: evaluates only)" if heldout and domain == heldout[0] else ""

    def collect(self, run_id: str) -> dict:
        """The run's final status in the SuperLink (a failed run raises :class:`DeployError`), its timings and
        summary; writes ``RUN/logs/deploy.json``."""
        plan, timings = self.plan, self.timings
        status, details = final_status(self.launch.bindir, self.launch.env, run_id, self.dep, self.port)
        timings["run_s"] = round(time.monotonic() - self.t0 - timings.get("startup_s", 0.0), 2)
        if status != "finished:completed":
            raise DeployError(f"the Flower run {run_id} ended {status}: {details} (logs: {plan.logs})")
        timings["total_s"] = round(time.monotonic() - self.t0, 2)
        self.log(f"run {run_id} completed in {timings['run_s']:.1f} s (start-up {timings.get('startup_s', 0):.1f} s)")
        summary_path = plan.out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        res = {"run_id": run_id, "status": status, "sites": dict(zip(plan.domains, map(str, plan.site_caches))),
               "run_config": plan.run_config, "isolation": self.launch.isolation, "timings": timings,
               "pids": self.dep.pids()}
        (plan.logs / "deploy.json").write_text(json.dumps(res, indent=2))
        self.grace = 0.0  # the run completed and its folder is written; the SuperLink and SuperNodes keep nothing
        # on disk: SIGKILL at once (their graceful shutdown took ~0.3 s)
        return {**res, "summary": summary}

    def stop(self) -> None:
        """End every process this run started, release the run folder and remove the temporary folder; a second
        Ctrl-C/SIGTERM meanwhile is ignored (it must not cut the clean-up short)."""
        with signals_ignored():
            zygote = self.zygote
            if zygote is not None and not zygote.children:  # failed before it got its specs
                zygote.abort()
            elif zygote is not None and not zygote.managed:  # failed or interrupted while it forked
                zygote.kill()
            self.dep.stop(self.grace)
            self.plan.lock.close()
        shutil.rmtree(self.launch.tmp, ignore_errors=True)


def _lock_run_folder(out: Path):
    """Hold the run folder's lock for the run (``runfolder.claim``, as `federate` and `sweep` do; released when
    closed or when this process dies): a second ``deploy`` (or a `federate`) into the same run folder is a one-line
    error instead of two runs writing (and reading) the same logs and outputs. The folder is marked in-progress and
    a previous run's outputs are removed: it shows a completed run only once this one completed (the ServerApp marks
    it); the earlier run's logs go in :func:`clear_own_logs`."""
    from ..federated.runfolder import claim

    return claim(out, "deploy", "deploy -o")


LOGS_MANIFEST = ".deploy-logs.json"  # in RUN/logs/: the file names the last deploy into it wrote


def own_logs(domains: list, isolation: str) -> list[str]:
    """The file names a deployment writes under ``RUN/logs/`` (what :class:`Deployment` and the zygote name), with
    those of the other isolations too (an earlier run into the folder may have used another one)."""
    assert isolation in ISOLATIONS
    names = ["superlink.log", "serverapp.log", "zygote.log", "flwr-run.log", "deploy.json"]
    for dom in domains:
        names += [f"site-{dom}.log", f"site-{dom}-superexec.log"]
    return names


def clear_own_logs(logs: Path, names: list[str]) -> None:
    """Remove an earlier deployment's logs from ``logs`` (appended to, they would be read as this run's: its run
    id, its end of run): the files this run will write and those the last deploy into this folder listed in
    :data:`LOGS_MANIFEST` -- nothing else (a user's ``RUN/logs/notes.txt`` or ``mine.log`` stays; every ``*.log``
    went before). Then lists this run's names there."""
    try:
        before = json.loads((logs / LOGS_MANIFEST).read_text())
        before = [n for n in before if isinstance(n, str)] if isinstance(before, list) else []
    except (OSError, ValueError):
        before = []
    for name in {*names, *before}:
        if name == Path(name).name and name not in ("", ".", "..") and (name.endswith(".log") or
                                                                        name == "deploy.json"):
            try:  # only plain names of our kinds, whatever the manifest says
                (logs / name).unlink(missing_ok=True)
            except OSError as ex:  # a folder by that name, no permission
                raise ConfigError(f"deploy: cannot remove the earlier run's {logs / name} ({ex.strerror or ex}): "
                                  f"remove it, or give another -o") from None
    atomic_write(logs / LOGS_MANIFEST, lambda t: t.write_text(json.dumps(sorted(names))))
