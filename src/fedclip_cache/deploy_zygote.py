"""One fresh process that imports torch, flwr and the apps ONCE and forks a local deployment's sites and ServerApp
process from there (``python -m fedclip_cache.deploy_zygote``, spec as JSON on stdin; used by ``deploy``).

Each of them would otherwise start its own Python and import the same modules (~3 s of CPU each; 4 processes
on 2 cores: most of a deployment's start-up). The zygote is fresh (it never computed anything, so no torch or
OpenMP thread pool exists when it forks) and forks before it starts any thread. Each child runs in its own session
(as ``start_new_session``), its output in its log file. Protocol on stdout, one JSON object per line:
``{"name", "pid"}`` when a child started, ``{"name", "exit"}`` when it ended; the zygote ends with its last child.
On stdin, ``{"log", "early_log", "specs"}``: ``deploy`` starts the zygote before it has checked its options, so the
zygote imports the SuperLink's modules first, then reads its specs (its stderr moves from ``early_log`` to ``log``),
forks the SuperLink (spec kind ``superlink``: flwr 1.42's ``flower-superlink`` entry point with the spec's
``args``) before it imports torch, then the others.
"""
from __future__ import annotations

import json
import os
import signal
import sys


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent ``parent`` ends (``deploy`` killed with SIGKILL cannot stop
    what it started: its zygote, the zygote's children and ``flwr run`` would run on, orphaned). Async-signal-safe
    enough for ``Popen(preexec_fn=...)``: libc's prctl is looked up before the fork (:data:`_PRCTL`)."""
    if _PRCTL is None:
        return
    _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the prctl
        os.kill(os.getpid(), signal.SIGKILL)


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


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

        from .flower_site import run_site

        torch.set_num_threads(int(spec["threads"]))
        return run_site(spec["cache"], spec["superlink"], port=int(spec["port"]), insecure=True,
                        poll_interval=float(spec["poll_interval"]), log=lambda m: print(f"[site] {m}", flush=True))
    if spec["kind"] == "superlink":  # `flower-superlink ARGS` (flwr 1.42's entry point: flwr.superlink.cli.
        # flower_superlink:flower_superlink, which parses sys.argv, serves until SIGTERM and exits through flwr_exit)
        from flwr.superlink.cli.flower_superlink import flower_superlink

        sys.argv = ["flower-superlink", *spec["args"]]
        flower_superlink()
        return 0
    from .flower_serverworker import main

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


def _fork(spec: dict, pids: dict) -> None:
    sys.stdout.flush()
    spec = {**spec, "_zygote": os.getpid()}
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = _child(spec) or 0
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    pids[pid] = spec["name"]
    print(json.dumps({"name": spec["name"], "pid": pid}), flush=True)


def main() -> None:
    # started before the deployment's options are checked: import the SuperLink's modules (flwr 1.42: ~1.2 s) while
    # deploy checks them, then wait for the specs (deploy kills this process when a check fails)
    if os.environ.get("FEDCLIP_DEPLOY_PARENT"):
        die_with_parent(int(os.environ["FEDCLIP_DEPLOY_PARENT"]))
    import flwr.superlink.cli.flower_superlink  # noqa: F401

    msg = json.loads(sys.stdin.read())
    specs = msg["specs"]
    fd = os.open(msg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # stderr: from now on the run's log,
    with open(msg["early_log"], "rb") as early:  # with what the imports wrote before
        os.write(fd, early.read())
    os.dup2(fd, 2)
    os.close(fd)
    # SIGTERM (deploy stopping everything) is for the children: the zygote reaps them, reports, and ends with the
    # last one, so that no child is left a zombie for init to find
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids: dict = {}
    # the SuperLink first, as soon as its own modules are imported (flwr 1.42: ~1.2 s), so that it is up while the
    # zygote imports torch and the apps for the others (instead of a separate `flower-superlink` Python start-up)
    for spec in (s for s in specs if s["kind"] == "superlink"):
        _fork(spec, pids)
    import torch  # noqa: F401

    import flwr.superlink.runtime.run_serverapp  # noqa: F401
    import flwr.supernode.cli.flower_supernode  # noqa: F401
    import flwr.supernode.start_client_internal  # noqa: F401

    from . import flower, flower_serverworker, flower_site  # noqa: F401

    warm()
    for spec in (s for s in specs if s["kind"] != "superlink"):
        _fork(spec, pids)
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        name = pids.pop(pid, None)
        if name is not None:
            print(json.dumps({"name": name, "exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
