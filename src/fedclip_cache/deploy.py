"""A real local Flower deployment: one SuperLink and one SuperNode per site cache, as separate processes.

``fedclip-cache deploy SITE_CACHE ... -o RUN`` writes a throw-away Flower app folder and ``FLWR_HOME`` (with the
connection config), starts ``flower-superlink --insecure`` on a free localhost port, one ``flower-supernode
--insecure --node-config 'cache="SITE_CACHE"'`` per site (each with its own Runtime API port), runs the app with
``flwr run APP local --stream`` (run config: the federate options, ``sites = N``, ``heldout``, ``out = RUN``),
keeps every log under ``RUN/logs/``, and judges the run by its status in the SuperLink (``flwr ls --run-id``:
``finished:completed``), never by ``flwr run``'s exit code (0 even for a failed run in flwr 1.42). Whatever it
started is stopped on success, failure and Ctrl-C (each process is the leader of its own process group; the group
is terminated, then killed).

Verified recipe (flwr 1.42): the SuperLink serves its Fleet, Control and Runtime APIs on ONE HTTP port
(``--port``; the old ``--fleet-api-address``/``--control-api-address`` are deprecated); a SuperNode's ``--port``
is its own Runtime API (the old ClientAppIo port), so SuperNodes on one machine need distinct ports. The connection
lives in ``$FLWR_HOME/config.toml`` (``[superlink.NAME] address = "host:port"``, ``insecure = true``).

Sites (``isolation``): ``worker`` (the default) runs each site as ``fedclip-cache site`` (flower_site.py): Flower's
SuperNode with ``--isolation process`` and one long-lived ClientApp process that imports torch and opens the cache
once. ``subprocess``/``process`` are Flower's stock runners: a fresh ``flwr-clientapp`` process per message (it
pulls one task with a one-time token and exits), so every fit/evaluate re-imports torch and re-opens the site cache
(~25 s per round with 3 sites on 2 cores; kept for comparison). ``poll_interval`` (default 0.1 s) replaces flwr
1.42's fixed waits between polls -- the ServerApp asking the SuperLink for replies (3 s), an idle SuperNode asking
the SuperLink for messages (3 s; ``worker`` sites only), a SuperExec asking for tasks (1 s) -- which otherwise cost
~6 s per round however fast the clients are.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import ConfigError, FedclipCacheError

BINARIES = ("flower-superlink", "flower-supernode", "flwr")
ISOLATIONS = ("worker", "subprocess", "process")
DEFAULT_POLL_INTERVAL = 0.2
# `flwr run ARGS` (flwr 1.42's CLI entry point, flwr.cli.app:app) started before the SuperLink is up: it imports the
# CLI first, then waits for the SuperLink's port (argv[1]).
FLWR_RUN_WHEN_READY = """
import socket, sys, time
from flwr.cli.app import app
port = int(sys.argv[1])
for _ in range(1200):
    with socket.socket() as s:
        s.settimeout(0.2)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            break
    time.sleep(0.05)
sys.argv = ["flwr", "run", *sys.argv[2:]]
app()
"""


class DeployError(FedclipCacheError):
    """The local deployment could not start or the Flower run did not complete; the message names the log."""


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


def run_config(cfg, n_sites: int, out: Path) -> dict:
    """The Flower run config of a deployment: the federate options that differ from the defaults (Flower's run
    config holds scalars only), ``sites``, ``heldout`` and ``out``."""
    from .federated.config import FederateConfig

    if cfg.protocol == "lodo" and not cfg.heldout:
        raise ConfigError("deploy: --protocol lodo needs --heldout SITE_DOMAIN (one federation per deployment; "
                          "`federate` holds each domain out in turn), or use --protocol personal")
    default = FederateConfig().to_dict()
    rc = {k: v for k, v in cfg.to_dict().items()
          if k not in ("heldout", "protocol") and v is not None and v != default[k]}
    if "split" in rc:  # Flower's run config holds scalars
        rc["split"] = ",".join(repr(float(x)) for x in cfg.split)
    rc.update(sites=n_sites, heldout=cfg.heldout[0] if cfg.heldout else "", out=str(out))
    return rc


def app_pyproject(config: dict) -> str:
    import tomli_w

    return tomli_w.dumps({
        "project": {"name": "fedclip-deploy", "version": "0.1.0", "description": "fedclip-cache on Flower",
                    "license": "MIT", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedclip-cache",
                                  "components": {"serverapp": "fedclip_cache.flower:server_app",
                                                 "clientapp": "fedclip_cache.flower:client_app"},
                                  "config": config}}}})


def connection_config(port: int) -> str:
    return (f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
            f'insecure = true\n')


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
                             env={**self.env, **(env or {})}, start_new_session=True)  # its own process group: stop() reaches its children too
        self.procs.append((name, p, log))
        return p

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p, _ in self.procs if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for _, p, _ in reversed(self.procs):
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
        deadline = time.monotonic() + grace  # orphaned group members (killed above) are reaped by init
        while any(_group_alive(p.pid) for _, p, _ in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _, p, log in self.procs:
            p.poll()
            log.close()

    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def check_sites(site_caches: list, cfg) -> list[str]:
    """Each site's domain, or a one-line error before anything starts."""
    from .cache import open_cache

    if len(site_caches) < 2:
        raise ConfigError(f"deploy: {len(site_caches)} site cache(s); a federation needs at least 2")
    domains = []
    for c in site_caches:
        if not Path(c).is_dir():
            raise ConfigError(f"deploy: site cache {c} does not exist (extract each site's images into its own "
                              f"cache first)")
        names = open_cache(c).domain_names
        if len(names) != 1:
            raise ConfigError(f"deploy: {c}: a site cache holds one domain (this one: {', '.join(names)}); extract "
                              f"each site's own images into its own cache")
        domains.append(names[0])
    if len(set(domains)) != len(domains):
        raise ConfigError(f"deploy: two site caches hold the same domain ({', '.join(domains)})")
    if len(cfg.heldout) > 1:
        raise ConfigError("deploy: --heldout takes one site's domain (one federation per deployment)")
    if cfg.heldout and cfg.heldout[0] not in domains:
        raise ConfigError(f"deploy: --heldout {cfg.heldout[0]!r} is none of the sites' domains "
                          f"({', '.join(domains)})")
    if cfg.heldout and len(domains) < 3:
        raise ConfigError("deploy: with --heldout, at least 2 other sites must train (give 3 or more site caches)")
    return domains


def deploy(site_caches: list, out, cfg, *, timeout: Optional[float] = None, log: Callable[[str], None] = print,
           isolation: str = "worker", keep_going: bool = False, round_timeout: Optional[float] = None,
           min_results: Optional[int] = None, poll_interval: float = DEFAULT_POLL_INTERVAL) -> dict:
    """Run ``cfg`` (a validated FederateConfig) as a real Flower deployment on localhost, one SuperNode per site
    cache; return ``{"run_id", "status", "timings", "summary" (RUN/summary.json when the ServerApp wrote one)}``.
    ``isolation="worker"`` (default): each site is ``fedclip-cache site`` (a SuperNode and one long-lived ClientApp
    process); ``"subprocess"``: Flower's SuperNode launches a ``flwr-clientapp`` per message;
    ``isolation="process"``: each SuperNode runs with ``--isolation process`` and this function starts its
    ``flower-superexec`` (which still launches one ``flwr-clientapp`` per message in flwr 1.42). ``keep_going``: a
    SuperNode that dies is reported and the run goes on without it (the ServerApp's fault tolerance:
    ``round_timeout`` seconds per round, ``min_results`` training results per round; see flower.py); by default
    any dead process fails the deployment at once."""
    t0 = time.monotonic()
    if isolation not in ISOLATIONS:
        raise ConfigError(f"deploy: isolation {isolation!r} unknown; choose {', '.join(ISOLATIONS)}")
    if not 0 < poll_interval <= 60:
        raise ConfigError(f"deploy: poll interval {poll_interval}: must be in (0, 60] seconds")
    bindir = flower_bin_dir()
    if bindir is None:
        raise DeployError("deploy needs Flower's command-line tools (flower-superlink, flower-supernode, flwr): "
                          "pip install 'fedclip-cache[flower]'")
    from .flower import _federate_config  # noqa: F401  (imports flwr: fails early with the install hint)

    site_caches = [Path(c).resolve() for c in site_caches]
    domains = check_sites(site_caches, cfg)
    out = Path(out).resolve()
    rc = run_config(cfg, len(site_caches), out)
    if round_timeout is not None:
        rc["round_timeout"] = float(round_timeout)
    if min_results is not None:
        rc["min_results"] = int(min_results)
    rc["poll_interval"] = float(poll_interval)
    _federate_config({k: v for k, v in rc.items()})  # the ServerApp's own check, before anything starts
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="fedclip-deploy-"))
    (tmp / "app").mkdir()
    (tmp / "home").mkdir()
    (tmp / "app" / "pyproject.toml").write_text(app_pyproject(rc))
    port = free_port()
    (tmp / "home" / "config.toml").write_text(connection_config(port))
    src = str(Path(__file__).resolve().parent.parent)  # so flwr-serverapp/-clientapp import this fedclip_cache
    env = {**os.environ, "FLWR_HOME": str(tmp / "home"), "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(max(poll_interval, 0.01))}  # flower-superexec's (default 1 s)
    dep = Deployment(env, logs)
    timings: dict = {}
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends us through the finally below
        old_term = signal.signal(signal.SIGTERM, _interrupt)
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
            dep.start("serverapp", [sys.executable, "-m", "fedclip_cache.flower_serverworker", f"127.0.0.1:{port}",
                                    str(secret_file)])
        dep.start("superlink", superlink)
        # the sites share this machine's cores: torch threads per site so that together they use them all once
        # (each would take every core, and 3 x 2 threads on 2 cores spin against each other: ~10x slower training)
        site_env = {} if "OMP_NUM_THREADS" in os.environ else {
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(site_caches)))}
        if isolation == "worker":  # started at once: they import torch while the SuperLink starts (and retry it)
            for cache, dom in zip(site_caches, domains):
                dep.start(f"site-{dom}", [sys.executable, "-m", "fedclip_cache", "site", str(cache), "--superlink",
                                          f"127.0.0.1:{port}", "--port", str(free_port()), "--insecure",
                                          "--poll-interval", str(poll_interval)], env=site_env)
                log(f"site {dom}{' (held out: evaluates only)' if cfg.heldout and dom == cfg.heldout[0] else ''}"
                    f": {cache}")
        t1 = time.monotonic()
        # `flwr run` at once too: it imports Flower's CLI while the SuperLink starts, then waits for its port
        run = dep.start("flwr-run", [sys.executable, "-c", FLWR_RUN_WHEN_READY, str(port),
                                     str(tmp / "app"), "local", "--stream"])
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
        run_id = _follow(run, logs / "flwr-run.log", dep, log, timeout, t1, keep_going, timings, t0)
        status, details = _final_status(bindir, env, run_id, dep, port)
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
        return {**res, "summary": summary}
    finally:
        if old_term is not None:  # a second Ctrl-C/SIGTERM must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        dep.stop()
        if old_term is not None:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(tmp, ignore_errors=True)


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


def _follow(run: subprocess.Popen, path: Path, dep: Deployment, log, timeout, t1, keep_going: bool = False,
            timings: Optional[dict] = None, t0: Optional[float] = None) -> str:
    """Wait for ``flwr run --stream`` to end, echoing its rounds; fail fast when the SuperLink dies, a SuperNode
    dies (unless ``keep_going``: then it is reported once and the run goes on) or the timeout passes. Returns the
    run id; ``timings["startup_s"]``: seconds from ``t0`` until every site answered the set-up message."""
    seen, run_id, lost = 0, None, set()
    while True:
        done = run.poll() is not None
        text = path.read_text(errors="replace")
        for line in text[seen:].splitlines(keepends=True):
            if not line.endswith("\n") and not done:
                break
            seen += len(line)
            m = re.search(r"Successfully started run (\d+)", line)
            if m:
                run_id = m.group(1)
                log(f"run {run_id} started")
            for tag, key in (("[START]", "serverapp_s"), ("[NODES]", "nodes_s")):
                if tag in line and timings is not None:  # when the line reached us (flwr streams logs in batches)
                    timings[key] = round(time.monotonic() - (t0 if t0 is not None else t1), 2)
            if "[SETUP]" in line and timings is not None:
                timings["startup_s"] = round(time.monotonic() - (t0 if t0 is not None else t1), 2)
                log(f"set-up done ({timings['startup_s']:.1f} s): {line.split('[SETUP]')[-1].strip()}")
            m = re.search(r"\[(ROUND \d+|SUMMARY)\]", line)
            if m:
                log(f"{m.group(1).lower()} ({time.monotonic() - t1:.1f} s)")
        if done:
            break
        # the ServerApp process ends with its run: exit 0 is no failure (the run's status says how it went)
        others = [d for d in dep.dead() if not d.startswith("flwr-run") and d != "serverapp (exit 0)"]
        if keep_going:
            for d in others:
                if d.startswith("site-") and d not in lost:
                    lost.add(d)
                    log(f"{d} exited during the run: going on without it (logs: {dep.logs})")
            others = [d for d in others if not d.startswith("site-")]
        if others:
            raise DeployError(f"{', '.join(others)} exited during the run (logs: {dep.logs})")
        if timeout and time.monotonic() - t1 > timeout:
            raise DeployError(f"the run did not finish within {timeout:.0f} s (logs: {dep.logs})")
        time.sleep(0.2)
    if run_id is None:
        raise DeployError(f"`flwr run` did not start a run (exit {run.returncode}; see {path})")
    return run_id


def _run_status(port: int, run_id: str) -> tuple[str, str]:
    """The run's status from the SuperLink's Control API, asked from this process (flwr 1.42 ``flwr ls``'s own
    request; spawning ``flwr ls`` costs a Flower import, seconds on a busy machine)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using SuperLink: ..."
        client = init_http_client_from_connection(SuperLinkConnection(name="local", address=f"127.0.0.1:{port}",
                                                                      insecure=True))
    try:
        res = client.ListRuns(ListRunsRequest(run_id=int(run_id)))
    finally:
        client.close()
    run = run_from_proto(next(iter(res.run_dict.values())))
    return f"{run.status.status}:{run.status.sub_status}", run.status.details


def _final_status(bindir: str, env: dict, run_id: str, dep: Deployment, port: Optional[int] = None,
                  limit: float = 30) -> tuple[str, str]:
    """The run's status as the SuperLink records it (``flwr run --stream`` exits 0 for failed runs too): asked in
    this process, or with ``flwr ls`` when that fails."""
    deadline = time.monotonic() + limit
    while True:
        try:
            if port is None:
                raise RuntimeError("no port")
            status, details = _run_status(port, run_id)
        except Exception:  # noqa: BLE001  (flwr's CLI then)
            p = subprocess.run([f"{bindir}/flwr", "ls", "local", "--run-id", run_id, "--format", "json"], env=env,
                               capture_output=True, text=True, timeout=60)
            try:
                runs = json.loads(p.stdout).get("runs") or []
                status, details = runs[0]["status"], runs[0].get("status-details", "")
            except (ValueError, IndexError, KeyError):
                status, details = "unknown", (p.stdout + p.stderr).strip()[-300:]
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(0.2)
