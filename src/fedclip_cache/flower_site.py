"""What runs at a site of a real Flower deployment: Flower's SuperNode and ONE long-lived ClientApp process.

``fedclip-cache site SITE_CACHE --superlink HOST:PORT`` starts Flower's own SuperNode (``flower-supernode
--isolation process``, node config ``cache=SITE_CACHE``, its Runtime API on ``127.0.0.1:--port``) as a child
process, and serves that SuperNode's ClientApp tasks itself, one after the other, for as long as it runs. Flower's
stock runners (``flower-superexec``) start a fresh ``flwr-clientapp`` process for every message (re-importing torch
and re-opening the cache each time: ~7 s per message on 2 cores); this process imports torch once at start-up, and
:func:`fedclip_cache.flower.client_fn` keeps each run's client (the opened cache, the splits) for the next messages
of the same run.

A task is executed exactly as ``flwr-clientapp`` executes it (flwr 1.42 ``run_clientapp``): acquire a task and its
one-time token from the Runtime API, pull the message, context, run and FAB, send task heartbeats meanwhile, call
``fedclip_cache.flower:client_app`` (the only ClientApp this worker serves: the FAB must name it), push the reply
(an ``Error`` reply when the ClientApp raised) and the task's final status. The differences are the process's
lifetime and how often it asks: the SuperNode is started with its idle poll (3 s in flwr 1.42, between two
"anything for me?" requests to the SuperLink, and 0.5 s while it waits for a reply) capped at ``--poll-interval``,
and the worker asks the SuperNode for a task every ``--poll-interval`` seconds (``flower-superexec``: 1 s).

Failures: a ClientApp exception is an ``Error`` reply (a failed fit/evaluate for the ServerApp); a worker killed
mid-task leaves the task without heartbeats, and the SuperNode answers "ClientApp stopped responding" when its claim
lapses (flwr 1.42: at most 60 s; ``--round-timeout`` bounds the wait on the server side); when the SuperNode child
exits, the site command exits (non-zero), and when the site command dies its SuperNode follows (parent monitor).
The ``AcquireTask`` call of the Runtime API is protected with Flower's SuperExec shared secret (a fresh random
secret per site command, in a 0600 file under a 0700 folder): another local user can not take the site's tasks.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

CLIENT_APP_REF = "fedclip_cache.flower:client_app"
DEFAULT_POLL_INTERVAL = 0.1


class _CappedSleep:
    """Stands in for the ``time`` module inside one flwr module: ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float):
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name):
        return getattr(time, name)


def run_supernode(argv: list[str], poll_interval: float, parent_pid: Optional[int] = None) -> None:
    """Flower's ``flower-supernode`` with ``argv``, its polling sleeps capped at ``poll_interval`` seconds (the
    protocol is unchanged: it asks the SuperLink more often). Ends itself when ``parent_pid`` exits."""
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from .flower import quick_object_pulls

    sci.time = _CappedSleep(poll_interval)  # the module's `time.sleep(3)` / `time.sleep(0.5)` polls
    quick_object_pulls(sci, poll_interval)  # the message's objects, fetched from the SuperLink
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _say(msg: str) -> None:
    print(f"[site] {msg}", flush=True)


class SiteWorker:
    """The long-lived ClientApp process of one SuperNode: serves its Runtime API's ClientApp tasks one by one."""

    def __init__(self, runtime_api_address: str, *, auth_secret: Optional[bytes] = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 log: Callable[[str], None] = _say):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        from . import flower  # noqa: F401  (torch, flwr and our apps: imported once, before the first task)

        # the SuperNode's Runtime API: plain HTTP on this machine's loopback (TLS is for the SuperLink connection)
        self.address = runtime_api_address
        self.poll_interval, self.log = poll_interval, log
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret,
                                                            protected_methods=("/flwr.proto.Runtime/AcquireTask",)))
        self.acquirer = RuntimeHttpClient.from_server_address(server_address=runtime_api_address, insecure=True, root_certificates=None,
                                                              interceptors=interceptors, retry_invoker=None)
        self.tasks = 0
        self._apps: dict[str, object] = {}  # FAB hash -> the ClientApp it names

    def acquire(self):
        """One ClientApp task and its token, or None (nothing pending, or the SuperNode not answering yet)."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        try:
            res = self.acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.TransportError:
            return None
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None

    def serve(self, stop: threading.Event, ready: Optional[Callable[[], bool]] = None) -> None:
        """Execute tasks until ``stop`` is set (or ``ready()`` turns false: the SuperNode is gone)."""
        while not stop.is_set():
            got = self.acquire()
            if got is not None:
                self.run_task(*got)
                continue  # straight on: the next message may be waiting already
            if ready is not None and not ready():
                return
            stop.wait(self.poll_interval)

    def _client_app(self, fab):
        """The ClientApp the run's FAB names; this worker serves fedclip-cache's only."""
        app = self._apps.get(fab.hash_str)
        if app is None:
            from flwr.common.config import get_fab_config

            conf = get_fab_config(fab.content)
            ref = conf.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
            if ref != CLIENT_APP_REF:
                raise RuntimeError(f"this site worker serves {CLIENT_APP_REF} only; the run's app names {ref!r}")
            from .flower import client_app

            app = self._apps[fab.hash_str] = client_app
        return app

    def run_task(self, task, token: str) -> None:
        """One task, as flwr 1.42's ``run_clientapp`` executes it, without leaving the process."""
        import httpx
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import RetryInvoker, exponential
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        t0 = t1 = t2 = time.perf_counter()
        # transport errors are retried for a while; an HTTP error status (e.g. the token lapsed) is not, and never
        # signals this process (flwr's own invoker sends SIGINT, which would end a long-lived worker)
        retry = RetryInvoker(lambda: exponential(max_delay=2), (httpx.TransportError,), max_tries=None, max_time=10)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)

        def heartbeat() -> bool:  # flwr's own raises SIGINT when the claim is gone; here the task just goes on
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                return True
            except Exception:  # noqa: BLE001  (a missed heartbeat is retried by the sender)
                return False

        beat = HeartbeatSender(heartbeat)
        beat.start()
        message = context = reply = None
        sub_status, details, kind = SubStatus.FAILED, "ClientApp task failed due to unknown reason", "?"
        try:
            message, context, run, fab = _pull_task_input(client, self.poll_interval)
            kind = message.metadata.message_type
            t1 = time.perf_counter()
            reply = self._client_app(fab)(message=message, context=context)
            t2 = time.perf_counter()
            sub_status, details = SubStatus.COMPLETED, ""
        except BaseException as ex:  # an Error reply, as flwr-clientapp sends; interrupts still end the worker
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            self.log(f"task {task.task_id}: the ClientApp raised {reason}")
            details = reason
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            if not isinstance(ex, Exception):
                self._finish(client, beat, reply, context, sub_status, details, push_message, push_task_output)
                raise
        self._finish(client, beat, reply, context, sub_status, details, push_message, push_task_output)
        self.tasks += 1
        self.log(f"task {task.task_id} (run {task.run_id}): {kind} {sub_status} in {time.perf_counter() - t0:.3f} s "
                 f"(pull {t1 - t0:.3f} s, ClientApp {t2 - t1:.3f} s)")

    def _finish(self, client, beat, reply, context, sub_status, details, push_message, push_task_output) -> None:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            self.log(f"could not push the reply: {ex}")
            sub_status, details = "failed", f"pushing the reply failed: {ex}"  # SubStatus.FAILED
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if beat.is_running:
            beat.stop()
        client.close()


def _pull_task_input(client, backoff: float):
    """flwr 1.42's ``run_clientapp.pull_task_input`` with the object pull retried every ``backoff`` seconds (flwr:
    1 s, then 2 s, 4 s ...): the task is claimable before its SuperNode has fetched the message's objects from the
    SuperLink, so the first pull of a fast worker regularly finds them missing."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.app import Message
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                     make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=max(backoff, 1.0))
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr: the deflated message lacks its own id
    return message, context, run, fab


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def supernode_command(cache: str, superlink: str, port: int, *, insecure: bool, root_certificates: Optional[str],
                      secret_file: str, poll_interval: float, extra: tuple = ()) -> list[str]:
    import json

    args = ["--superlink", superlink, "--isolation", "process", "--port", str(port),
            "--node-config", f"cache={json.dumps(str(cache))}", "--superexec-auth-secret-file", secret_file]
    args += ["--insecure"] if insecure else (["--root-certificates", root_certificates] if root_certificates else [])
    return [sys.executable, "-m", "fedclip_cache.flower_site", "supernode", "--poll-interval", str(poll_interval),
            "--parent-pid", str(os.getpid()), "--", *args, *extra]


def run_site(cache: str, superlink: str, *, port: int = 9094, insecure: bool = False,
             root_certificates: Optional[str] = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
             extra: tuple = (), log: Callable[[str], None] = _say) -> int:
    """A site: its SuperNode (a child process) and its ClientApp worker (this process) until either ends; returns
    the exit status (0 after SIGTERM/SIGINT, the SuperNode's status when it exited by itself)."""
    from .cache import open_cache

    cache = str(Path(cache).resolve())
    open_cache(cache)  # a missing or broken cache fails here, before the site joins the federation
    if _port_open(port):
        from .errors import ConfigError

        raise ConfigError(f"port {port} (the SuperNode's Runtime API) is in use: choose another --port")
    private = Path(tempfile.mkdtemp(prefix="fedclip-site-"))  # 0700
    secret_file = private / "superexec-secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    secret = secrets.token_bytes(32)
    os.write(fd, secret)
    os.close(fd)
    stop = threading.Event()

    def _stop(*_):
        stop.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    node = subprocess.Popen(supernode_command(cache, superlink, port, insecure=insecure,
                                              root_certificates=root_certificates, secret_file=str(secret_file),
                                              poll_interval=poll_interval, extra=extra), stdin=subprocess.DEVNULL)
    try:
        worker = SiteWorker(f"127.0.0.1:{port}", auth_secret=secret,
                            poll_interval=poll_interval, log=log)
        log(f"worker ready (pid {os.getpid()}): serving the ClientApp tasks of SuperNode pid {node.pid} "
            f"(Runtime API 127.0.0.1:{port}, cache {cache})")
        worker.serve(stop, ready=lambda: node.poll() is None)
        if node.poll() is not None and not stop.is_set():
            log(f"the SuperNode exited ({node.returncode}) after {worker.tasks} task(s): stopping")
            return node.returncode or 1
        return 0
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(private, ignore_errors=True)


def _main(argv: list[str]) -> None:
    """``python -m fedclip_cache.flower_site supernode --poll-interval S [--parent-pid P] -- FLOWER_SUPERNODE_ARGS``"""
    if not argv or argv[0] != "supernode":
        raise SystemExit("usage: python -m fedclip_cache.flower_site supernode --poll-interval S [--parent-pid P] "
                         "-- FLOWER_SUPERNODE_ARGS...")
    own, rest = (argv[1:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv[1:], [])
    opts = dict(zip(own[::2], own[1::2]))
    run_supernode(rest, float(opts.get("--poll-interval", DEFAULT_POLL_INTERVAL)),
                  int(opts["--parent-pid"]) if "--parent-pid" in opts else None)


if __name__ == "__main__":
    _main(sys.argv[1:])
