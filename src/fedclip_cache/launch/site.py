"""What runs at a site of a real Flower deployment: Flower's SuperNode and its ClientApp worker, in ONE process.

``fedclip-cache site SITE_CACHE --superlink HOST:PORT`` runs Flower's own SuperNode (flwr 1.42
``flower-supernode --isolation process``, node config ``cache=SITE_CACHE``, its Runtime API on
``127.0.0.1:--port``) in the main thread, and serves that SuperNode's ClientApp tasks in a worker thread, one
after the other, for as long as it runs. Flower's stock runners (``flower-superexec``) start a fresh
``flwr-clientapp`` process for every message (re-importing torch and re-opening the cache each time: ~7 s per
message on 2 cores); here torch is imported once (while the SuperNode connects), and
:func:`fedclip_cache.flower.client_app.site_client` keeps each run's client (the opened cache, the splits) for the next
messages of the same run.

A task is executed exactly as ``flwr-clientapp`` executes it (flwr 1.42 ``run_clientapp``): acquire a task and its
one-time token from the Runtime API, pull the message, context, run and FAB, send task heartbeats meanwhile, call
``fedclip_cache.flower.client_app:client_app`` (the only ClientApp this worker serves: the FAB must name it), push the reply
(an ``Error`` reply when the ClientApp raised) and the task's final status. The differences are the lifetime, the
way the Runtime API is called (in this process: :class:`~fedclip_cache.flower.runtime.DirectRuntime` calls the
functions behind the SuperNode's HTTP router on its own state, no local HTTP for the 2 MB adapter) and how often
things are asked (:func:`patch_supernode`): the SuperNode's idle poll of the SuperLink (flwr 1.42: every 3 s)
follows a :class:`~fedclip_cache.flower.polls.PollPlan` (fast around the time the next message came in recent
rounds, a back-off up to ``--poll-interval`` otherwise); a stored message wakes the worker at once and a pushed
reply wakes the SuperNode at once (flwr: ``flower-superexec`` asks for tasks every 1 s, the SuperNode checks for a
reply every 0.5 s).

Failures: a ClientApp exception is an ``Error`` reply (a failed round for that site on the ServerApp); a worker
that cannot start stops the site; when the process dies, SuperNode and worker die together (``--round-timeout``
bounds the server's wait; see flower/server_app.py). A site started again on the same cache registers as a new node and
rejoins the run from the next round. The ``AcquireTask`` call of the Runtime API is protected with Flower's
SuperExec shared secret (a fresh random secret per site command, in a 0600 file under a 0700 folder): another
local user can not take the site's tasks. That folder never outlives the site: removed on every exit (normal end,
failure, SIGTERM/Ctrl-C: also as one of flwr's exit handlers, which run before its 5 s force-exit timer); a
``fedclip-site-*`` folder of a site killed with ``kill -9`` names its dead owner (procs.py) and is removed by
the next site started on this machine; under ``deploy`` the folder lies inside the deployment's own temporary folder
(removed by ``deploy`` even when it SIGKILLs its sites, and swept by the next ``deploy`` after a ``kill -9``).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ..flower.task import DEFAULT_POLL_INTERVAL
from .procs import make_owned, port_open, sweep_stale, write_secret

CLIENT_APP_REF = "fedclip_cache.flower.client_app:client_app"
SITE_PREFIX = "fedclip-site-"  # a standalone site's private folder under the temporary folder (procs.py)


class SiteClock:
    """Stands in for the ``time`` module inside flwr 1.42's ``flwr.supernode.start_client_internal`` (the
    SuperNode's main loop), which polls with two fixed sleeps: ``time.sleep(3)`` between two "anything for me?"
    requests to the SuperLink, and ``time.sleep(0.5)`` while it waits for the ClientApp's reply. Here the first
    follows a :class:`~fedclip_cache.flower.polls.PollPlan` (cap ``cap`` seconds): the wait for the next message
    starts when the worker has replied, and the SuperNode polls fast around the time the next message came in
    recent rounds (before the first message: a back-off from 0.01 s). The second waits on :attr:`reply`, which
    the worker sets when it has pushed a reply. :attr:`task` is set when the SuperNode has stored a message: the
    worker acquires the task at once."""

    def __init__(self, cap: float):
        from ..flower.polls import PollPlan

        self.plan = PollPlan(cap)
        self.task, self.reply = threading.Event(), threading.Event()
        self._replied = False
        self.state = None  # the SuperNode's NodeState, once its loop has started

    def sleep(self, seconds: float) -> None:
        if seconds >= 1:  # idle: nothing pulled from the SuperLink
            if self._replied:  # the first idle poll after a reply: the wait for the next message starts
                self._replied = False
                self.plan.start()
            time.sleep(self.plan.pause())
        else:  # a reply (or an object of it) is not there yet
            self.reply.wait(min(seconds, 0.05))
            self.reply.clear()

    def replied(self) -> None:
        """The worker pushed a reply to the SuperNode (which sends it on, then waits for the next message)."""
        self._replied = True
        self.reply.set()

    def message_stored(self) -> None:
        self.plan.arrived()
        self.task.set()

    def __getattr__(self, name):
        return getattr(time, name)


def patch_supernode(poll_interval: float) -> SiteClock:
    """Patch flwr 1.42's SuperNode loop (:func:`fedclip_cache.flower.flwr_internals.patch_supernode_loop`): its
    sleeps follow a :class:`SiteClock`, a stored message wakes the worker, a missing object is asked for again
    after at most 0.05 s. The protocol is unchanged."""
    from ..flower.flwr_internals import patch_supernode_loop

    clock = SiteClock(poll_interval)

    def on_pull(state) -> None:
        if clock.state is None:  # the SuperNode's NodeState: the worker calls its Runtime API on it directly
            clock.state = state

    patch_supernode_loop(clock, on_pull, clock.message_stored, min(poll_interval, 0.05))
    return clock


def _say(msg: str) -> None:
    print(f"[site] {msg}", flush=True)


class SiteWorker:
    """The long-lived ClientApp process of one SuperNode: serves its Runtime API's ClientApp tasks one by one."""

    def __init__(self, runtime_api_address: str, *, auth_secret: Optional[bytes] = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 log: Callable[[str], None] = _say):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        from ..flower import client_app  # noqa: F401  (torch, flwr and our app: imported once, before the first task)

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
        self.state = None  # the SuperNode's NodeState when it runs in this process: its Runtime API without HTTP

    def acquire(self):
        """One ClientApp task and its token, or None (nothing pending, or the SuperNode not answering yet)."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        from ..flower.runtime import DirectRuntime

        acquirer = self.acquirer if self.state is None else DirectRuntime(self.state)
        try:
            res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.TransportError:
            return None
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None

    def serve(self, stop: threading.Event, clock: Optional[SiteClock] = None) -> None:
        """Execute tasks until ``stop`` is set. With the SuperNode's ``clock`` (same process), a stored message
        wakes this loop at once and a pushed reply wakes the SuperNode; ``poll_interval`` bounds every wait."""
        while not stop.is_set():
            if clock is not None:
                clock.task.clear()
                self.state = clock.state
            got = self.acquire()
            if got is not None:
                self.run_task(*got)
                if clock is not None:
                    clock.replied()
                continue  # straight on: the next message may be waiting already
            if clock is not None:  # woken when the SuperNode has stored a message and ALL its objects (flwr 1.42
                # creates the task before it pulls the objects: a worker polling on its own may claim the task
                # first and then wait for them); the timeout is only a safety net
                clock.task.wait(max(1.0, self.poll_interval))
            else:
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
            from ..flower.client_app import client_app

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
        if self.state is not None:  # the SuperNode runs in this process: its Runtime API's own functions, no HTTP
            from ..flower.runtime import DirectRuntime

            client = DirectRuntime(self.state, token)
        else:
            retry = RetryInvoker(lambda: exponential(max_delay=2), (httpx.TransportError,), max_tries=None,
                                 max_time=10)
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
            message, context, run, fab = _pull_task_input(client, min(self.poll_interval, 0.02))
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
        try:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        except Exception as ex:  # noqa: BLE001  (flwr's own catches HTTP errors only; in-process: FlowerError)
            self.log(f"could not push the task's output: {ex}")
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


def supernode_args(cache: str, superlink: str, port: int, *, insecure: bool, root_certificates: Optional[str],
                   secret_file: str, extra: tuple = ()) -> list[str]:
    import json

    args = ["--superlink", superlink, "--isolation", "process", "--port", str(port),
            "--node-config", f"cache={json.dumps(str(cache))}", "--superexec-auth-secret-file", secret_file]
    args += ["--insecure"] if insecure else (["--root-certificates", root_certificates] if root_certificates else [])
    return [*args, *extra]


def check_site_credentials(insecure: bool, root_certificates, private_key) -> tuple:
    """One-line errors for ``site``'s TLS and SuperNode-authentication files (missing, unreadable, not what flwr 1.42
    loads), before the site starts; returns the ``flower-supernode`` options they add (beside ``--root-certificates``,
    passed by :func:`supernode_args`)."""
    from ..errors import ConfigError

    def readable(path, option: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as ex:
            raise ConfigError(f"site: {option} {path}: cannot be read ({ex.strerror or ex}); give the path of the "
                              f"file") from None

    if root_certificates is not None:
        if insecure:
            raise ConfigError("site: --insecure and --root-certificates: give one (--root-certificates: TLS)")
        if b"-----BEGIN CERTIFICATE-----" not in readable(root_certificates, "--root-certificates"):
            raise ConfigError(f"site: --root-certificates {root_certificates}: no PEM certificate in it; give the "
                              f"SuperLink's CA certificate (PEM)")
    if private_key is None:
        return ()
    if insecure:
        raise ConfigError("site: --auth-supernode-private-key needs TLS (flwr 1.42 refuses SuperNode authentication "
                          "without it): give --root-certificates instead of --insecure")
    data = readable(private_key, "--auth-supernode-private-key")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(data, None)  # as flwr 1.42's flower-supernode loads it
    except (ValueError, TypeError, UnsupportedAlgorithm) as ex:  # TypeError: a passphrase-protected key
        key = ex
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"site: --auth-supernode-private-key {private_key}: not an unencrypted EC private key in "
                          f"OpenSSH format (make one: ssh-keygen -t ecdsa -b 384 -N '' -f site_key)")
    return ("--auth-supernode-private-key", str(Path(private_key).resolve()))


def private_folder(root: Optional[str] = None) -> Path:
    """A new 0700 folder for a site's secret: inside ``root`` (``deploy``'s temporary folder, which ``deploy``
    removes), else a ``fedclip-site-*`` folder owned by this process (procs.py), after removing those of sites
    that died without cleaning up (``kill -9``)."""
    if root is not None:
        return Path(tempfile.mkdtemp(prefix="site-", dir=root))
    sweep_stale(SITE_PREFIX, unowned_after=86400)
    return make_owned(SITE_PREFIX)


def run_site(cache: str, superlink: str, *, port: int = 9094, insecure: bool = False,
             root_certificates: Optional[str] = None, poll_interval: float = DEFAULT_POLL_INTERVAL,
             extra: tuple = (), log: Callable[[str], None] = _say, private_root: Optional[str] = None) -> int:
    """A site in ONE process: Flower's SuperNode (flwr 1.42 ``flower-supernode``, patched as
    :func:`patch_supernode` says) in the main thread, and the ClientApp worker in a thread beside it; returns the
    SuperNode's exit status (0 after SIGTERM/SIGINT). ``private_root``: the folder to make the site's private
    folder (its SuperExec secret) in -- ``deploy``'s own temporary folder; default: an owned ``fedclip-site-*``
    folder under the temporary folder (:func:`private_folder`).

    The steps: check the cache and the port, make the private folder and its secret (removed on every way out),
    start the worker thread, run the SuperNode until it ends."""
    cache = str(Path(cache).resolve())
    _check_before_start(cache, port)
    made: list = []  # the private folder, once made
    if threading.current_thread() is threading.main_thread():
        # SIGTERM ends the site here until flwr installs its own handlers (its imports take seconds; the default
        # action left the secret's folder behind); flwr's handlers restore this one. It removes the folder and
        # exits at once: a SystemExit raised here was swallowed once by flwr's start-up (the site ran on after
        # SIGTERM, seen under load in test_a_site_secret_never_outlives_the_site)
        signal.signal(signal.SIGTERM, lambda _s, _f: _remove_and_exit(made))
    private = private_folder(private_root)
    made.append(private)
    stop = threading.Event()
    try:
        secret_file = private / "superexec-secret"
        secret = write_secret(secret_file)
        from flwr.supercore.exit import add_exit_handler

        # flwr ends the SuperNode on SIGTERM/SIGINT through its exit handlers, with a 5 s force-exit timer
        # (os._exit: no `finally` then); the secret's folder goes first
        add_exit_handler(lambda: shutil.rmtree(private, ignore_errors=True), run_before_force_exit=True)
        clock = patch_supernode(poll_interval)
        _start_worker(port, secret, poll_interval, log, cache, stop, clock)
        from flwr.supernode.cli.flower_supernode import flower_supernode

        sys.argv = ["flower-supernode", *supernode_args(cache, superlink, port, insecure=insecure,
                                                        root_certificates=root_certificates,
                                                        secret_file=str(secret_file), extra=extra)]
        flower_supernode()
        return 0
    except SystemExit as ex:
        return ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    finally:
        stop.set()
        shutil.rmtree(private, ignore_errors=True)


def _check_before_start(cache: str, port: int) -> None:
    """A missing or broken cache, or a Runtime API port in use, fails here: before the site joins the federation."""
    from ..cache.reader import open_cache

    open_cache(cache)
    if port_open(port):
        from ..errors import ConfigError

        raise ConfigError(f"port {port} (the SuperNode's Runtime API) is in use: choose another --port")


def _start_worker(port: int, secret: bytes, poll_interval: float, log: Callable[[str], None], cache: str,
                  stop: threading.Event, clock: SiteClock) -> threading.Thread:
    """The ClientApp worker thread (it imports torch while the SuperNode connects); a worker that cannot start
    ends the site (SIGTERM to this process)."""
    def work() -> None:
        try:
            worker = SiteWorker(f"127.0.0.1:{port}", auth_secret=secret, poll_interval=poll_interval, log=log)
            log(f"worker ready (pid {os.getpid()}): serving the ClientApp tasks of this SuperNode (Runtime API "
                f"127.0.0.1:{port}, cache {cache})")
            worker.serve(stop, clock)
        except BaseException as ex:  # noqa: BLE001  (a worker that cannot start ends the site)
            log(f"the worker failed: {type(ex).__name__}: {ex}; stopping the site")
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=work, name="clientapp-worker", daemon=True)
    thread.start()
    return thread


def _remove_and_exit(made: list) -> None:
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
    for stream in (sys.stdout, sys.stderr):  # os._exit skips the interpreter's flush: keep the log complete
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)  # as flwr's own handler ends the SuperNode after SIGTERM (exit 0)
