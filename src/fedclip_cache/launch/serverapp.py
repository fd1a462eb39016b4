"""A ServerApp process started BEFORE the run exists: ``python -m fedclip_cache.launch.serverapp HOST:PORT
SECRET_FILE``.

With ``flower-superlink --isolation subprocess`` (flwr 1.42's default) the SuperLink starts its SuperExec only once a
run is submitted, and that SuperExec then starts a fresh ``flwr-serverapp`` process, which imports flwr, torch and
this package: two Python start-ups on the critical path of every deployment (~10 s on 2 busy cores). ``deploy``
instead starts the SuperLink with ``--isolation process`` and this process next to it (forked from its zygote, with
everything imported already, while the SuperLink and the sites start and the run is submitted); it asks the SuperLink's Runtime API for the run's
ServerApp task (the ``AcquireTask`` request of flwr 1.42's SuperExec, guarded by the SuperExec shared secret from
``SECRET_FILE``) and runs it with flwr 1.42's own ``run_serverapp`` -- exactly what ``flwr-serverapp --token``
does: heartbeats, task input, FAB, the ServerApp, logs pushed to the SuperLink (``flwr log``), final status -- and exits.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

MAX_POLL = 0.2


def acquire_serverapp_task(address: str, secret: bytes, timeout: float = 600.0) -> str:
    """The token of the first ServerApp task the SuperLink hands out (waits for the SuperLink and the run)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                    SuperExecAuthHttpInterceptor(master_secret=secret,
                                                 protected_methods=("/flwr.proto.Runtime/AcquireTask",))]
    client = RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                   interceptors=interceptors, retry_invoker=None)
    from ..flower.polls import PollPlan

    deadline, backoff = time.monotonic() + timeout, PollPlan(MAX_POLL)  # 0.01 s, 1.5x, up to MAX_POLL
    try:
        while time.monotonic() < deadline:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
                if res.HasField("task") and res.token:
                    return res.token
            except httpx.TransportError:  # the SuperLink is not up yet
                pass
            time.sleep(backoff.pause())
    finally:
        client.close()
    raise SystemExit(f"no ServerApp task from the SuperLink at {address} within {timeout:.0f} s")


def quick_flush_logs(log_queue, timeout: float = 3.0) -> bool:
    """flwr 1.42's ``flush_logs`` (called by ``run_serverapp`` before it pushes the run's final status) without its
    fixed 1 s sleep once the queue is empty ("allow the PushLogs call to complete"): every run of ``deploy`` ended
    a second late. The uploader pushes what it took from the queue within one upload interval (0.2 s; a few ms on
    localhost), and ``run_serverapp`` joins it (``stop_log_uploader``) before the process exits, so no log line is
    lost; only the last lines may reach the SuperLink a moment after the status (``deploy`` reads this process's
    own log file, not the SuperLink's log stream)."""
    from flwr.common.constant import LOG_UPLOAD_INTERVAL

    deadline = time.monotonic() + timeout
    while not log_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(min(LOG_UPLOAD_INTERVAL / 4, max(0.0, deadline - time.monotonic())))
    return log_queue.empty()


def install_quick_flush() -> None:
    """:func:`quick_flush_logs` in place of flwr's ``flush_logs`` in its ServerApp runner
    (:func:`~fedclip_cache.flower.flwr_internals.replace_flush_logs`)."""
    from ..flower.flwr_internals import replace_flush_logs

    replace_flush_logs(quick_flush_logs)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m fedclip_cache.launch.serverapp HOST:PORT SECRET_FILE")
    address, secret = argv[0], Path(argv[1]).read_bytes()
    from queue import Queue

    from flwr.superlink.runtime.run_serverapp import run_serverapp
    from flwr.supercore.logger import mirror_output_to_queue

    from ..flower import client_app, server_app  # noqa: F401  (torch, flwr and the apps: imported before the run exists)

    install_quick_flush()
    token = acquire_serverapp_task(address, secret)
    log_queue: Queue = Queue()
    mirror_output_to_queue(log_queue)  # as flwr-serverapp: what the ServerApp logs streams to `flwr run`
    run_serverapp(runtime_api_address=address, log_queue=log_queue, token=token, insecure=True,
                  runtime_dependency_install=False)  # ends the process (flwr_exit) with the run's exit code


if __name__ == "__main__":
    main(sys.argv[1:])
