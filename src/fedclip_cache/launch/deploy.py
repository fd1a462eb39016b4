"""A real local Flower deployment: one SuperLink, its ServerApp process and one site per site cache, as separate
processes.

``fedclip-cache deploy SITE_CACHE ... -o RUN`` first starts one fresh "zygote" process (deploy_zygote.py; the CLI
starts it through :class:`Launch` even before it validates the options), which forks the SuperLink's child at once
(it imports Flower's SuperLink modules) and imports torch and the apps itself, while this process checks the
options and caches (a failed check kills it: nothing was started or written). Then it writes a throw-away Flower
app folder and ``FLWR_HOME`` (with the connection config) and hands the specs over; the SuperLink's child serves
``flower-superlink --insecure --isolation process`` (flwr 1.42's entry point, on a free localhost port), and the
zygote forks the ServerApp process (flower_serverworker.py: takes the run's ServerApp task and runs it with flwr's
own ``run_serverapp``) and one site per site cache (what ``fedclip-cache site`` runs, flower_site.py: Flower's
SuperNode and the ClientApp worker in one process, node config ``cache="SITE_CACHE"``, its own Runtime API port).
As soon as the SuperLink is up, this process starts the run through its Control API as ``flwr run APP`` would
(deploy_flwr.start_run; run config: the federate options, ``sites = N``, ``heldout``, ``out = RUN``) and follows
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
the ServerApp and the SuperNodes between polls (flower_polls.py; flwr 1.42's own: fixed 3 s) and sets
``flower-superexec``'s task poll.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .flwr_cli import (FLWR_RUN_WHEN_READY, DeployError, app_pyproject, connection_config, final_status, follow_run,
                          run_status, start_run)
from ..errors import ConfigError
from ..cache.store import atomic_write
from .tempdirs import make_owned, sweep_stale
from ..flower.task import run_config  # noqa: F401  (the run config's one codec; also `deploy.run_config`)

BINARIES = ("flower-superlink", "flower-supernode", "flwr")
ISOLATIONS = ("worker", "subprocess", "process")
DEFAULT_POLL_INTERVAL = 0.2


def flower_bin_dir() -> Optional[str]:
    """The folder holding Flower's CLIs: next to this Python (a venv's bin, not necessarily on PATH), else PATH."""
    here = Path(sys.executable).parent
    if all((here / b).exists() for b in BINARIES):
        return str(here)
    found = [shutil.which(b) for b in BINARIES]
    if all(found):
        return str(Path(found[0]).parent)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Deployment:
    """The processes of one local deployment; :meth:`stop` ends them all (idempotent)."""

    env: dict
    logs: Path
    procs: list = field(default_factory=list)  # (name, Popen, log file)

    def start(self, name: str, cmd: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**self.env, **(env or {})},
                             start_new_session=True,  # its own process group: stop() reaches its children too
                             preexec_fn=_dies_with_us())  # a kill -9 of deploy must not leave it running
        self.procs.append((name, p, log))
        return p

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p, _ in self.procs if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process group, SIGKILL to what is left after ``grace`` seconds (``grace=0``: SIGKILL at
        once); then reap. The zygote gets SIGKILL last: it reaps and reports the children it forked, then ends
        itself (killed first, it would leave them to init, which reaps slowly: ~2 s)."""
        for sig in (signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,):
            procs = [(n, p) for n, p, _ in reversed(self.procs)]
            if sig == signal.SIGKILL:
                procs = [x for x in procs if x[0] != "zygote"] + [x for x in procs if x[0] == "zygote"]
            alive = []
            for name, p in procs:
                if sig == signal.SIGKILL and name == "zygote":
                    try:  # it ends with its last child (SIGTERM is ignored by it: nothing else happens)
                        p.wait(timeout=2.0)
                    except subprocess.TimeoutExpired:
                        pass
                try:
                    os.killpg(p.pid, sig)  # the group: flower-superexec, flwr-clientapp/-serverapp under it
                    alive.append(p)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for p in alive:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in alive) and not any(_group_alive(p.pid) for p in alive):
                break
        deadline = time.monotonic() + max(grace, 5.0)  # killed group members are reaped by their parents or init
        while any(_group_alive(p.pid) for _, p, _ in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _, p, log in self.procs:
            p.poll()
            if log is not None:
                log.close()

    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]


class ZygoteChild:
    """A site or the ServerApp process, forked by the zygote (deploy_zygote.py): as much of ``subprocess.Popen``
    as :class:`Deployment` uses; its exit code comes from the zygote's report."""

    def __init__(self, zygote: "Zygote", name: str):
        self.zygote, self.name = zygote, name

    @property
    def pid(self) -> int:
        return self.zygote.pids[self.name]

    @property
    def returncode(self) -> Optional[int]:
        if self.name in self.zygote.exits:
            return self.zygote.exits[self.name]
        if self.zygote.proc.poll() is not None and self.zygote.done.is_set():  # no report will come
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return -1
        return None

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.02)
        return self.returncode


class Zygote:
    """``python -m fedclip_cache.launch.zygote``, started before its specs are known (it imports meanwhile);
    :meth:`send` hands it the specs (then it forks), :meth:`abort` ends it before that. Reads its pid and exit
    reports."""

    def __init__(self, env: dict, early_log: Path):
        self.early = open(early_log, "ab")  # its stderr until send() names the run's log (no run folder yet)
        self.proc = subprocess.Popen([sys.executable, "-m", "fedclip_cache.launch.zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.early, start_new_session=True,
                                     env={**env, "FEDCLIP_DEPLOY_PARENT": str(os.getpid())})  # dies with us
        self.pids: dict = {}
        self.exits: dict = {}
        self.done = threading.Event()
        self.children: list = []
        self.managed = False  # its children are in the Deployment's processes (started() returned)

    def abort(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # it has forked nothing yet: it waits for its specs
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.early.close()

    def send(self, dep: "Deployment", specs: list[dict], log: Path) -> None:
        self.proc.stdin.write(json.dumps({"log": str(log), "early_log": self.early.name, "specs": specs}).encode())
        self.proc.stdin.close()
        threading.Thread(target=self._read, daemon=True).start()
        dep.procs.append(("zygote", self.proc, self.early))
        self.children = [ZygoteChild(self, s["name"]) for s in specs]

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            (self.exits if "exit" in msg else self.pids)[msg["name"]] = msg.get("exit", msg.get("pid"))
        self.done.set()

    def started(self, dep: "Deployment", limit: float = 120) -> None:
        """Wait until every child is forked (the zygote imports torch first), then let ``dep`` manage them."""
        _wait(lambda: len(self.pids) == len(self.children), dep, limit, "the zygote did not fork the sites")
        dep.procs.extend((c.name, c, None) for c in self.children)
        self.managed = True

    def kill(self) -> None:
        """SIGKILL now, while it is still forking (deploy interrupted or failed before :meth:`started` returned):
        its children are not the Deployment's yet, so SIGTERM reaches none of them, and the zygote (which ignores
        SIGTERM and ends with its last child) would keep ``stop`` waiting its whole grace period. Each child it
        forked dies with it (PR_SET_PDEATHSIG, set before the child does anything else)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _dies_with_us():
    """A ``preexec_fn``: the child gets SIGKILL when this process ends (Linux; elsewhere None)."""
    from .zygote import _PRCTL, die_with_parent

    if _PRCTL is None:
        return None
    me = os.getpid()
    return lambda: die_with_parent(me)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def check_sites(site_caches: list, cfg, command: str = "deploy") -> list[str]:
    """Each site's domain, or a one-line error (starting with ``command``) before anything starts. Shared with
    ``simulate``'s per-site caches."""
    from ..cache.reader import cache_overview

    if len(site_caches) < 2:
        raise ConfigError(f"{command}: {len(site_caches)} site cache(s); a federation needs at least 2")
    domains = []
    first = None  # (cache, what every site must share: the model's fingerprint, the feature dim, the class list)
    for c in site_caches:
        if not Path(c).is_dir():
            raise ConfigError(f"{command}: site cache {c} does not exist (extract each site's images into its own "
                              f"cache first)")
        ov = cache_overview(c)
        names = ov.domain_names
        shared = {"model (fingerprint)": ov.meta.get("fingerprint"), "feature dimension": ov.meta.get("embedding_dim"),
                  "class list": list(ov.classes)}
        if first is None:
            first = (c, shared)
        for what, v in shared.items():
            if v != first[1][what]:
                raise ConfigError(f"{command}: site caches {first[0]} and {c} differ in their {what}: extract every "
                                  f"site with the same model and the same --classes file")
        if len(names) != 1:
            raise ConfigError(f"{command}: {c}: a site cache holds one domain (this one: {', '.join(names)}); "
                              f"extract each site's own images into its own cache, or give ONE shared cache")
        from ..cache.sources import path_name_problem  # the rule extract applies; caches made before it was, checked here

        why = path_name_problem(names[0])
        if why:
            raise ConfigError(f"{command}: {c}: domain name {names[0]!r} {why}, so it cannot name a file (a site's "
                              f"files are named after it, e.g. deploy's logs/site-DOMAIN.log): re-extract this site "
                              f"with a plain domain name")
        domains.append(names[0])
    if len(set(domains)) != len(domains):
        raise ConfigError(f"{command}: two site caches hold the same domain ({', '.join(domains)})")
    if len(cfg.heldout) > 1:
        raise ConfigError(f"{command}: --heldout takes one site's domain (one federation per run)")
    if cfg.heldout and cfg.heldout[0] not in domains:
        raise ConfigError(f"{command}: --heldout {cfg.heldout[0]!r} is none of the sites' domains "
                          f"({', '.join(domains)})")
    if cfg.heldout and len(domains) < 3:
        raise ConfigError(f"{command}: with --heldout, at least 2 other sites must train (give 3 or more site "
                          f"caches)")
    return domains


def check_run_folder(out, command: str = "deploy") -> None:
    """A one-line error, before anything starts, when the run folder ``out`` (or a folder above it) is a file (the
    rule ``runfolder.claim`` applies again when it takes the folder)."""
    from ..federated.runfolder import check_not_a_file

    check_not_a_file(out, f"{command} -o")


def check_site_options(site_caches: list, cfg) -> None:
    """What each site checks against its own cache (views for --train-views, --template, the logit scale), here
    before anything starts: a one-line error instead of a run that fails at its set-up message."""
    from ..cache.reader import open_cache
    from ..federated.loop import resolve_logit_scale, resolve_train_views, text_head

    for c in site_caches:
        cache = open_cache(c)
        resolve_train_views(cfg, cache)
        resolve_logit_scale(cfg, cache)
        if cfg.head == "text":
            text_head(cache, cfg.template)


TMP_PREFIX = "fedclip-deploy-"


def sweep_stale_folders(root: Optional[Path] = None) -> list[Path]:
    """Remove the temporary folders of deploys that died without cleaning up (``kill -9``, a power cut): their
    owner process is gone (tempdirs.py); a folder without an owner file goes once it is a day old. Only this user's
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
        if not 0 < poll_interval <= 60:
            raise ConfigError(f"deploy: poll interval {poll_interval}: must be in (0, 60] seconds")
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
        src = str(Path(__file__).resolve().parent.parent)  # so flwr-serverapp/-clientapp import this fedclip_cache
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
    ``round_timeout`` seconds per round, ``min_results`` training results per round; see flower.py); by default
    any dead process fails the deployment at once. ``launch``: a :class:`Launch` the caller started earlier (with
    this ``isolation`` and ``poll_interval``); it is used up either way."""
    t0 = time.monotonic()
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        if launch is not None:
            launch.used = True
            launch.abort()
        raise ConfigError(f"deploy: --timeout {timeout}: give a number of seconds > 0 (0: no limit)")
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends us through the finally below (and,
        # before that, through the abort of the launch: its temporary folder and zygote exist from the start)
        old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if launch is None:
            launch = Launch(isolation, poll_interval)
        elif (launch.isolation, launch.poll_interval) != (isolation, poll_interval):
            launch.abort()
            raise ValueError("deploy: launch was made for another isolation / poll interval")
        launch.used = True
    except BaseException:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        raise
    bindir, tmp, env, zygote = launch.bindir, launch.tmp, launch.env, launch.zygote
    port = free_port()
    try:
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
        rc["poll_interval"] = float(poll_interval)
        check_deployment_keys(rc)
        _, site_cfg = federate_config(dict(rc))  # the ServerApp's own check, before anything starts
        check_site_options(site_caches, site_cfg)
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        lock = _lock_run_folder(out)
        try:
            clear_own_logs(logs, own_logs(domains, isolation))
        except BaseException:
            lock.close()
            raise
    except BaseException:
        launch.abort()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        raise
    (tmp / "app" / "pyproject.toml").write_text(app_pyproject(rc))
    (tmp / "home" / "config.toml").write_text(connection_config(port))
    grace = 10.0  # seconds each process gets to end after SIGTERM (failure, Ctrl-C)
    dep = Deployment(env, logs)
    timings: dict = {}
    try:
        log(f"SuperLink on 127.0.0.1:{port} (logs: {logs})")
        superlink = [f"{bindir}/flower-superlink", "--insecure", "--port", str(port),
                     "--disable-runtime-dependency-installation"]
        if isolation == "worker":  # the ServerApp process is ours, started now (flower_serverworker.py)
            secret_file = tmp / "superexec-secret"  # under the 0700 temporary folder
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secrets.token_bytes(32))
            os.close(fd)
            superlink += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
        else:
            dep.start("superlink", superlink)
        # the sites share this machine's cores: torch threads per site so that together they use them all once
        # (each would take every core, and 3 x 2 threads on 2 cores spin against each other: ~10x slower training)
        site_env = {} if "OMP_NUM_THREADS" in os.environ else {
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(site_caches)))}
        if isolation == "worker":  # the ServerApp process and the sites: forked by one fresh process that imports
            # torch, flwr and the apps once (deploy_zygote.py); each site is what `fedclip-cache site CACHE` runs
            threads = int(site_env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
            specs = [{"name": "superlink", "kind": "superlink", "log": str(logs / "superlink.log"),
                      "args": superlink[1:]},  # forked first, before the zygote imports torch
                     {"name": "serverapp", "kind": "serverapp", "log": str(logs / "serverapp.log"),
                      "address": f"127.0.0.1:{port}", "secret_file": str(secret_file)}]
            specs += [{"name": f"site-{dom}", "kind": "site", "log": str(logs / f"site-{dom}.log"), "env": site_env,
                       "cache": str(cache), "superlink": f"127.0.0.1:{port}", "port": free_port(),
                       "poll_interval": poll_interval, "threads": threads,
                       # each site's SuperExec secret in a folder inside ours: gone with it, even when the sites are
                       # SIGKILLed (their own clean-up never runs then; each run left one /tmp/fedclip-site-*)
                       "private_root": str(tmp)} for cache, dom in zip(site_caches, domains)]
            zygote.send(dep, specs, logs / "zygote.log")
        t1 = time.monotonic()
        run = run_id = None
        if zygote is None:  # `flwr run` at once: it imports Flower's CLI while the SuperLink starts, then waits for
            # its port; its log stream is what the stock runners' rounds are followed by
            run = dep.start("flwr-run", [sys.executable, "-c", FLWR_RUN_WHEN_READY, str(port),
                                         str(tmp / "app"), "local", "--stream"])
        else:  # the run is started from here as soon as the SuperLink is up (while the zygote imports torch)
            _wait(lambda: _port_open(port), dep, 60, "the SuperLink did not open its port")
            run_id = start_run(port, tmp / "app")
            log(f"run {run_id} started")
            zygote.started(dep)
            for cache, dom, child in zip(site_caches, domains, zygote.children[2:]):
                log(f"site {dom}{' (held out: evaluates only)' if cfg.heldout and dom == cfg.heldout[0] else ''}"
                    f" (pid {child.pid}): {cache}")
        _wait(lambda: _port_open(port), dep, 60, "the SuperLink did not open its port")
        for cache, dom in zip(site_caches, domains) if isolation != "worker" else ():
            nport = free_port()
            cmd = [f"{bindir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--node-config", f"cache={json.dumps(str(cache))}", "--port", str(nport)]
            if isolation == "process":
                cmd += ["--isolation", "process"]
            dep.start(f"site-{dom}", cmd)
            if isolation == "process":
                _wait(lambda: _port_open(nport), dep, 60, f"SuperNode {dom} did not open its port")
                dep.start(f"site-{dom}-superexec", [f"{bindir}/flower-superexec", "--insecure",
                                                    "--runtime-api-address", f"127.0.0.1:{nport}"])
            log(f"SuperNode {dom}{' (held out: evaluates only)' if cfg.heldout and dom == cfg.heldout[0] else ''}"
                f": {cache}")
        run_id = follow_run(run, logs / ("flwr-run.log" if run else "serverapp.log"), dep, log, timeout, t1,
                            keep_going, timings, t0, status=lambda rid: run_status(port, rid)[0], run_id=run_id)
        status, details = final_status(bindir, env, run_id, dep, port)
        timings["run_s"] = round(time.monotonic() - t0 - timings.get("startup_s", 0.0), 2)
        if status != "finished:completed":
            raise DeployError(f"the Flower run {run_id} ended {status}: {details} (logs: {logs})")
        timings["total_s"] = round(time.monotonic() - t0, 2)
        log(f"run {run_id} completed in {timings['run_s']:.1f} s (start-up {timings.get('startup_s', 0):.1f} s)")
        summary_path = out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        res = {"run_id": run_id, "status": status, "sites": dict(zip(domains, map(str, site_caches))),
               "run_config": rc, "isolation": isolation, "timings": timings, "pids": dep.pids()}
        (logs / "deploy.json").write_text(json.dumps(res, indent=2))
        grace = 0.0  # the run completed and its folder is written; the SuperLink and SuperNodes keep nothing on
        # disk: SIGKILL at once (their graceful shutdown took ~0.3 s)
        return {**res, "summary": summary}
    finally:
        if old_term is not None:  # a second Ctrl-C/SIGTERM must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        if zygote is not None and not zygote.children:  # failed before it got its specs
            zygote.abort()
        elif zygote is not None and not zygote.managed:  # failed or interrupted while it forked
            zygote.kill()
        dep.stop(grace)
        lock.close()
        if old_term is not None:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(tmp, ignore_errors=True)


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


def _interrupt(*_):
    raise KeyboardInterrupt


def _wait(ready: Callable[[], bool], dep: Deployment, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        if dep.dead():
            raise DeployError(f"{what}: {', '.join(dep.dead())} exited (logs: {dep.logs})")
        if time.monotonic() > deadline:
            raise DeployError(f"{what} within {limit:.0f} s (logs: {dep.logs})")
        time.sleep(0.2)
