"""How ``deploy`` talks to Flower 1.42 (its CLI, its Control API and its logs): the app's ``pyproject.toml`` and
connection config, ``flwr run`` started before the SuperLink is up, following the run's streamed logs, and the
run's final status."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Optional

from ..errors import FedclipCacheError
from ..flower import logproto


class DeployError(FedclipCacheError):
    """The local deployment could not start or the Flower run did not complete; the message names the log."""

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


def app_pyproject(config: dict) -> str:
    import tomli_w

    return tomli_w.dumps({
        "project": {"name": "fedclip-deploy", "version": "0.1.0", "description": "fedclip-cache on Flower",
                    "license": "MIT", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedclip-cache",
                                  "components": {"serverapp": "fedclip_cache.flower.server_app:server_app",
                                                 "clientapp": "fedclip_cache.flower.client_app:client_app"},
                                  "config": config}}}})


def connection_config(port: int) -> str:
    return (f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
            f'insecure = true\n')


def control_client(port: int):
    """An HTTP client of the local SuperLink's Control API (flwr 1.42's own, as ``flwr run``/``flwr ls`` make it);
    the caller closes it."""
    import contextlib
    import io

    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using SuperLink: ..."
        return init_http_client_from_connection(SuperLinkConnection(name="local", address=f"127.0.0.1:{port}",
                                                                    insecure=True))


def start_run(port: int, app: Path, limit: float = 60) -> str:
    """``flwr run APP local`` for a local app without overrides or ``--stream`` (flwr 1.42's
    ``flwr.cli.run.run._run_with_control_api``: the app's pyproject.toml validated, its FAB built, ``StartRun`` on
    the SuperLink's Control API), asked from this process; returns the run id. Spares ``deploy`` a ``flwr run``
    process (a Python start-up and Flower's CLI imports while everything else starts on the same cores) and the
    log stream it would hold open for the whole run (``deploy`` reads the ServerApp process's own log)."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    _, warnings = load_and_validate(app / "pyproject.toml")
    if warnings:
        raise DeployError(f"the app's pyproject.toml: {'; '.join(warnings)}")
    fab_bytes = build_fab_from_disk(app)
    req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
                          override_config=user_config_to_proto({}), federation="")
    deadline = time.monotonic() + limit
    while True:
        try:
            client = control_client(port)
            try:
                res = client.StartRun(req)
            finally:
                client.close()
            break
        except Exception as ex:  # noqa: BLE001  (the SuperLink still starting: asked again)
            if time.monotonic() > deadline:
                raise DeployError(f"the SuperLink did not start the run: {ex}") from None
            time.sleep(0.05)
    if not res.HasField("run_id"):
        raise DeployError("the SuperLink did not start the run (StartRun returned no run id)")
    return str(res.run_id)


def follow_run(run: Optional[subprocess.Popen], path: Path, dep, log, timeout, t1, keep_going: bool = False,
               timings: Optional[dict] = None, t0: Optional[float] = None, status=None,
               run_id: Optional[str] = None) -> str:
    """Wait for ``flwr run --stream`` to end, echoing its rounds; fail fast when the SuperLink dies, a SuperNode
    dies (unless ``keep_going``: then it is reported once and the run goes on) or the timeout passes. Returns the
    run id; ``timings["startup_s"]``: seconds from ``t0`` until every site answered the set-up message. With
    ``status`` (run id -> the SuperLink's status), the wait ends as soon as the run is finished -- once the
    ServerApp process has exited or logged its summary -- instead of when ``flwr run --stream`` notices (its log
    stream lags by a second or two). Without ``run`` (no ``flwr run`` process: the run ``run_id`` was started with
    :func:`start_run`), ``path`` is the ServerApp process's own log, where ``[SUMMARY]`` shows up first."""
    seen, lost, ended = 0, set(), False
    while True:
        done = run is not None and run.poll() is not None
        if status is not None and run_id is not None and (ended or any(d.startswith("serverapp (exit")
                                                                       for d in dep.dead())):
            try:
                if status(run_id).startswith("finished"):
                    break
            except Exception:  # noqa: BLE001  (asked again next time; `flwr run` ends anyway)
                pass
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:  # the ServerApp process not forked yet
            text = ""
        for line in text[seen:].splitlines(keepends=True):
            if not line.endswith("\n") and not done:
                break
            seen += len(line)
            m = re.search(r"Successfully started run (\d+)", line)
            if m:
                run_id = m.group(1)
                log(f"run {run_id} started")
            event = logproto.parse(line)  # the ServerApp's progress lines (flower/logproto.py)
            if event is None:
                continue
            timing = {logproto.START: "serverapp_s", logproto.NODES: "nodes_s", logproto.SETUP: "startup_s"}
            if event.tag in timing and timings is not None:  # when the line reached us (flwr streams logs in batches)
                timings[timing[event.tag]] = round(time.monotonic() - (t0 if t0 is not None else t1), 2)
            if event.tag == logproto.SETUP and timings is not None:
                log(f"set-up done ({timings['startup_s']:.1f} s): {event.text}")
                if status is not None:  # the run's status is asked at the end: its client's modules now, not then
                    preload_status_client()
            ended = ended or event.tag == logproto.SUMMARY
            if event.tag in (logproto.ROUND, logproto.SUMMARY):
                log(f"{event.label} ({time.monotonic() - t1:.1f} s)")
        if done:
            break
        _check_processes(dep, keep_going, lost, log)
        if timeout and time.monotonic() - t1 > timeout:
            raise DeployError(f"the run did not finish within {timeout:.0f} s (logs: {dep.logs})")
        time.sleep(0.1)
    if run_id is None:
        raise DeployError(f"`flwr run` did not start a run (exit {run.returncode if run else '?'}; see {path})")
    return run_id


def _check_processes(dep, keep_going: bool, lost: set, log) -> None:
    """Fail when a process of the deployment ``dep`` exited during the run; with ``keep_going`` a site's exit is
    said once (``lost``) and the run goes on. The ServerApp process ends with its run: exit 0 is no failure (the
    run's status says how it went)."""
    others = [d for d in dep.dead() if not d.startswith("flwr-run") and d not in ("serverapp (exit 0)",
                                                                                   "zygote (exit 0)")]
    if keep_going:
        for d in others:
            if d.startswith("site-") and d not in lost:
                lost.add(d)
                log(f"{d} exited during the run: going on without it (logs: {dep.logs})")
        others = [d for d in others if not d.startswith("site-")]
    if others:
        raise DeployError(f"{', '.join(others)} exited during the run (logs: {dep.logs})")


def preload_status_client() -> None:
    """Import what :func:`run_status` needs (flwr 1.42's CLI helpers: ~0.5-1 s) while the rounds run."""
    import flwr.cli.typing  # noqa: F401
    import flwr.cli.utils  # noqa: F401
    import flwr.common.serde  # noqa: F401
    import flwr.proto.control_pb2  # noqa: F401


def run_status(port: int, run_id: str) -> tuple[str, str]:
    """The run's status from the SuperLink's Control API, asked from this process (flwr 1.42 ``flwr ls``'s own
    request; spawning ``flwr ls`` costs a Flower import, seconds on a busy machine)."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    client = control_client(port)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=int(run_id)))
    finally:
        client.close()
    run = run_from_proto(next(iter(res.run_dict.values())))
    return f"{run.status.status}:{run.status.sub_status}", run.status.details


def final_status(bindir: str, env: dict, run_id: str, dep, port: Optional[int] = None,
                  limit: float = 30) -> tuple[str, str]:
    """The run's status as the SuperLink records it (``flwr run --stream`` exits 0 for failed runs too): asked in
    this process, or with ``flwr ls`` when that fails."""
    deadline = time.monotonic() + limit
    while True:
        try:
            if port is None:
                raise RuntimeError("no port")
            status, details = run_status(port, run_id)
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
