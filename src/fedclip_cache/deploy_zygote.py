"""One fresh process that imports torch, flwr and the apps ONCE and forks a local deployment's sites and ServerApp
process from there (``python -m fedclip_cache.deploy_zygote``, spec as JSON on stdin; used by ``deploy``).

Each of them would otherwise start its own Python and import the same modules (~3 s of CPU each; 4 processes
on 2 cores: most of a deployment's start-up). The zygote is fresh (it never computed anything, so no torch or
OpenMP thread pool exists when it forks) and forks before it starts any thread. Each child runs in its own session
(as ``start_new_session``), its output in its log file. Protocol on stdout, one JSON object per line:
``{"name", "pid"}`` when a child started, ``{"name", "exit"}`` when it ended; the zygote ends with its last child.
"""
from __future__ import annotations

import json
import os
import signal
import sys


def _child(spec: dict) -> int:
    os.setsid()
    fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.update(spec.get("env", {}))
    print(f"$ (forked from the deployment's zygote, pid {os.getppid()}) {spec['name']}", flush=True)
    if spec["kind"] == "site":
        import torch

        from .flower_site import run_site

        torch.set_num_threads(int(spec["threads"]))
        return run_site(spec["cache"], spec["superlink"], port=int(spec["port"]), insecure=True,
                        poll_interval=float(spec["poll_interval"]), log=lambda m: print(f"[site] {m}", flush=True))
    from .flower_serverworker import main

    main([spec["address"], spec["secret_file"]])
    return 0


def main() -> None:
    specs = json.loads(sys.stdin.read())
    import torch  # noqa: F401

    import flwr.superlink.runtime.run_serverapp  # noqa: F401
    import flwr.supernode.cli.flower_supernode  # noqa: F401
    import flwr.supernode.start_client_internal  # noqa: F401

    from . import flower, flower_serverworker, flower_site  # noqa: F401

    # SIGTERM (deploy stopping everything) is for the children: the zygote reaps them, reports, and ends with the
    # last one, so that no child is left a zombie for init to find
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = {}
    for spec in specs:
        sys.stdout.flush()
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
