"""One fresh process that imports torch, flwr and the apps ONCE and forks a local deployment's sites and ServerApp
process from there (``python -m fedclip_cache.launch.zygote``, spec as JSON on stdin; used by ``deploy``).

Each of them would otherwise start its own Python and import the same modules (~3 s of CPU each; 4 processes
on 2 cores: most of a deployment's start-up). The zygote is fresh (it never computed anything, so no torch or
OpenMP thread pool exists when it forks) and forks before it starts any thread. Each child runs in its own session
(as ``start_new_session``), its output in its log file. Protocol on stdout, one JSON object per line:
``{"name", "pid"}`` when a child started, ``{"name", "exit"}`` when it ended; the zygote ends with its last child.
On stdin, ``{"log", "early_log", "specs"}``: ``deploy`` starts the zygote before it has checked its options. The
zygote forks the SuperLink's child at once (:func:`_prefork_superlink`: it imports the SuperLink's modules while
the zygote imports torch and the apps, reads the specs from stdin, passes them on and serves as the spec of kind
``superlink`` says: flwr 1.42's ``flower-superlink`` entry point with the spec's ``args``); then the zygote reads
the specs from that child (its stderr moves from ``early_log`` to ``log``) and forks the others.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from .procs import die_with_parent


def _child(spec: dict) -> int:
    os.setsid()
    die_with_parent(int(spec["_zygote"]))
    fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(spec.get("env", {}))
    print(f"$ (forked from the deployment's zygote, pid {os.getppid()}) {spec['name']} {' '.join(spec.get('args', []))}", flush=True)
    if spec["kind"] == "site":
        import torch

        from .site import run_site

        torch.set_num_threads(int(spec["threads"]))
        return run_site(spec["cache"], spec["superlink"], port=int(spec["port"]), insecure=True,
                        poll_interval=float(spec["poll_interval"]), log=lambda m: print(f"[site] {m}", flush=True),
                        private_root=spec.get("private_root"))  # deploy's temporary folder: deploy removes it
    if spec["kind"] == "superlink":  # `flower-superlink ARGS` (flwr 1.42's entry point: flwr.superlink.cli.
        # flower_superlink:flower_superlink, which parses sys.argv, serves until SIGTERM and exits through flwr_exit)
        from flwr.superlink.cli.flower_superlink import flower_superlink

        sys.argv = ["flower-superlink", *spec["args"]]
        flower_superlink()
        return 0
    from .serverapp import main

    main([spec["address"], spec["secret_file"]])
    return 0


# what every site (or the ServerApp process) would otherwise import after the fork, each on its own (measured
# with flwr 1.42: ~0.4 s per process): pandas (pyarrow's Parquet reader imports it when a cache is opened), the
# SuperNode's Runtime API server (uvicorn, FastAPI routers) and the HTTP clients
WARM = ("pandas", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.pandas_compat", "flwr.supernode.main",
        "flwr.supernode.servicer.runtime.runtime_handlers", "flwr.supercore.routers.runtime.router",
        "flwr.supercore.routers.health.router", "uvicorn.protocols.http.httptools_impl",
        "uvicorn.protocols.websockets.websockets_impl", "uvicorn.lifespan.on", "uvicorn.loops.auto", "httpcore",
        "h11", "httpx")


def warm() -> None:
    import importlib

    for name in WARM:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (only a head start: the child imports what it needs anyway)
            pass


def _run_and_exit(body) -> None:
    """In a forked child: run ``body`` with SIGTERM's default action and end the process with its exit code (never
    returns; ``os._exit``: the zygote's own clean-up must not run twice)."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = body() or 0
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork(spec: dict, pids: dict) -> None:
    sys.stdout.flush()
    spec = {**spec, "_zygote": os.getpid()}
    pid = os.fork()
    if pid == 0:
        _run_and_exit(lambda: _child(spec))
    pids[pid] = spec["name"]
    print(json.dumps({"name": spec["name"], "pid": pid}), flush=True)


def _prefork_superlink() -> tuple[int, int]:
    """Fork, at once, the child that will be the SuperLink: it imports the SuperLink's modules (flwr 1.42: ~1.3 s)
    while this process imports torch and the apps (in parallel on a second core instead of one after the other),
    then reads the deployment's specs from stdin (``deploy`` sends them once its checks passed), hands them on to
    this process through a pipe and serves as the ``superlink`` spec says. Until then it stays in this process's
    group (``deploy`` aborting kills both). Returns (its pid, the pipe's read end)."""
    r, w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        return pid, r
    os.close(r)

    def serve() -> int:
        os.dup2(2, 1)  # stdout is the zygote's report pipe to deploy: nothing of this child's may go there
        die_with_parent(os.getppid())
        import flwr.superlink.cli.flower_superlink  # noqa: F401

        data = sys.stdin.buffer.read()
        with os.fdopen(w, "wb") as pipe:
            pipe.write(data)
        spec = next((s for s in json.loads(data)["specs"] if s["kind"] == "superlink"), None)
        return 0 if spec is None else _child({**spec, "_zygote": os.getppid()})

    _run_and_exit(serve)


def main() -> None:
    # started before the deployment's options are checked (deploy kills this process group when a check fails)
    if os.environ.get("FEDCLIP_DEPLOY_PARENT"):
        die_with_parent(int(os.environ["FEDCLIP_DEPLOY_PARENT"]))
    # SIGTERM (deploy stopping everything) is for the children: the zygote reaps them, reports, and ends with the
    # last one, so that no child is left a zombie for init to find
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    superlink, pipe = _prefork_superlink()
    import torch  # noqa: F401

    import flwr.superlink.runtime.run_serverapp  # noqa: F401
    import flwr.supernode.cli.flower_supernode  # noqa: F401
    import flwr.supernode.start_client_internal  # noqa: F401

    from ..flower import client_app, server_app  # noqa: F401
    from . import serverapp, site  # noqa: F401

    warm()
    with os.fdopen(pipe, "rb") as f:  # the specs, as the SuperLink's child read them from stdin
        data = f.read()
    if not data:
        raise SystemExit("launch.zygote: no specs (the SuperLink's child ended before it read them)")
    msg = json.loads(data)
    specs = msg["specs"]
    fd = os.open(msg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # stderr: from now on the run's log,
    with open(msg["early_log"], "rb") as early:  # with what the imports wrote before
        os.write(fd, early.read())
    os.dup2(fd, 2)
    os.close(fd)
    pids: dict = {}
    for spec in specs:
        if spec["kind"] == "superlink":  # forked at the start; serving by now (or soon)
            pids[superlink] = spec["name"]
            print(json.dumps({"name": spec["name"], "pid": superlink}), flush=True)
        else:
            _fork(spec, pids)
    if superlink not in pids:  # no SuperLink wanted: its child has ended (reaped below, not reported)
        pids[superlink] = None
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        name = pids.pop(pid, None)
        if name is not None:
            print(json.dumps({"name": name, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the interpreter's teardown of torch and flwr takes ~0.8 s, and deploy waits for this process


if __name__ == "__main__":
    main()
