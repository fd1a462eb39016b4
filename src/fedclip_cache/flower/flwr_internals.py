"""Every part of flwr's insides that fedclip-cache relies on, in one place, checked against flwr 1.42.0.

A deployment runs Flower's own SuperLink, SuperNode and ServerApp runner, but reaches past their public surface in
a few places: it replaces the SuperNode loop's fixed sleeps and wraps its private ``_pull_and_store_message``
(launch/site.py), shortens the object-pull backoff of the SuperNode and the ServerApp's grid, drops the ServerApp
runner's 1 s ``flush_logs`` sleep (launch/serverapp.py), calls the SuperNode's Runtime API handlers in-process
(flower/runtime.py), re-serves the SuperLink's app behind a Fleet-only gate with flwr's private argument parser
(launch/fleet_gate.py), and drives Flower's CLI helpers and runtime clients (launch/flwr_cli.py, launch/site.py,
launch/serverapp.py, launch/zygote.py). The private names and the module patches are made here only;
:data:`INTERNALS` lists every name those modules use, with the keyword arguments they pass, so that
:func:`missing` (run by the test suite, and by :func:`require` at the moment of use) names what a newer flwr
removed or renamed instead of a deployment that hangs or fails deep inside a SuperNode.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, NamedTuple, Optional

FLWR_CHECKED = "1.42.0"  # the flwr version every name below was read in

SUPERNODE_LOOP = "flwr.supernode.start_client_internal"  # the SuperNode's main loop (its polls, its pulls)
INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"
SERVERAPP_RUNNER = "flwr.superlink.runtime.run_serverapp"
SERVERAPP_GRID = "flwr.superlink.grid.http_grid"
SUPERLINK_CLI = "flwr.superlink.cli.flower_superlink"
NODE_HANDLERS = "flwr.supernode.servicer.runtime.runtime_handlers"  # behind the SuperNode's Runtime API router
CORE_HANDLERS = "flwr.supercore.servicer.runtime.runtime_handlers"  # the handlers every component shares


class Internal(NamedTuple):
    """One name inside flwr: ``name`` (dotted: an attribute of an attribute) of module ``module``; ``keywords``:
    the keyword arguments fedclip-cache passes to it; ``used_by``: the module that relies on it."""

    module: str
    name: str
    used_by: str
    keywords: tuple = ()


def _names(module: str, names: str, used_by: str) -> tuple:
    return tuple(Internal(module, n, used_by) for n in names.split())


INTERNALS: tuple = (
    # launch/site.py: the SuperNode loop, patched (patch_supernode_loop)
    Internal(SUPERNODE_LOOP, "_pull_and_store_message", "launch/site.py"),
    Internal(SUPERNODE_LOOP, "time.sleep", "launch/site.py"),  # its fixed 3 s / 0.5 s polls
    Internal(SUPERNODE_LOOP, "pull_objects", "launch/site.py"),
    Internal(INFLATABLE, "pull_objects", "launch/site.py, flower/server_app.py", ("initial_backoff", "backoff_cap")),
    Internal(INFLATABLE, "pull_and_inflate_object_from_tree", "launch/site.py",
             ("return_type", "initial_backoff", "backoff_cap")),
    Internal("flwr.supercore.exit", "add_exit_handler", "launch/site.py", ("run_before_force_exit",)),
    Internal("flwr.supernode.cli.flower_supernode", "flower_supernode", "launch/site.py"),
    Internal("flwr.supernode.runtime.run_clientapp", "push_message", "launch/site.py"),
    Internal("flwr.supernode.runtime.run_clientapp", "push_task_output", "launch/site.py",
             ("client", "context", "sub_status", "details")),
    *_names("flwr.supercore.inflatable.inflatable_protobuf_utils",
            "make_confirm_message_received_fn_protobuf make_pull_object_fn_protobuf", "launch/site.py"),
    Internal("flwr.supercore.task_identity", "TaskIdentity", "launch/site.py"),
    Internal("flwr.supercore.heartbeat", "HeartbeatSender", "launch/site.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address", "launch/site.py, launch/serverapp.py",
             ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker")),
    *_names("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor RuntimeTokenHttpInterceptor",
            "launch/site.py, launch/serverapp.py"),
    Internal("flwr.supercore.interceptors.http.superexec_auth", "SuperExecAuthHttpInterceptor",
             "launch/site.py, launch/serverapp.py", ("master_secret", "protected_methods")),
    Internal("flwr.supercore.retry", "RetryInvoker", "launch/site.py"),
    Internal("flwr.common.config", "get_fab_config", "launch/site.py"),
    # flower/runtime.py: the Runtime API's handlers, called in-process (runtime_handlers)
    *_names(NODE_HANDLERS, "acquire_task pull_task_input pull_messages pull_object confirm_message_received "
                           "push_messages push_object push_task_output", "flower/runtime.py"),
    Internal(CORE_HANDLERS, "send_task_heartbeat", "flower/runtime.py"),
    Internal("flwr.supernode.nodestate", "NodeState.get_task_by_token", "flower/runtime.py"),
    Internal("flwr.supercore.error", "ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED", "flower/runtime.py"),
    # flower/server_app.py: its grid's object pulls (quick_object_pulls)
    Internal(SERVERAPP_GRID, "pull_objects", "flower/server_app.py"),
    # launch/serverapp.py: the ServerApp runner (replace_flush_logs)
    Internal(SERVERAPP_RUNNER, "flush_logs", "launch/serverapp.py"),
    Internal(SERVERAPP_RUNNER, "run_serverapp", "launch/serverapp.py",
             ("runtime_api_address", "log_queue", "token", "insecure", "runtime_dependency_install")),
    Internal("flwr.supercore.logger", "mirror_output_to_queue", "launch/serverapp.py"),
    Internal("flwr.common.constant", "LOG_UPLOAD_INTERVAL", "launch/serverapp.py"),
    # launch/zygote.py and launch/fleet_gate.py: the SuperLink (superlink_lifespan_config)
    Internal(SUPERLINK_CLI, "flower_superlink", "launch/zygote.py"),
    Internal(SUPERLINK_CLI, "_parse_superlink_lifespan_config", "launch/fleet_gate.py"),
    Internal(SUPERLINK_CLI, "SuperLinkLifespan", "launch/fleet_gate.py"),
    Internal("flwr.superlink.main", "create_app", "launch/fleet_gate.py"),
    Internal("flwr.superlink.routers.fleet.router", "router.prefix", "launch/fleet_gate.py"),
    Internal("flwr.supercore.http_logging", "get_uvicorn_log_config", "launch/fleet_gate.py"),
    Internal("flwr.supercore.logger", "console_handler", "launch/fleet_gate.py"),
    # launch/flwr_cli.py: Flower's CLI, its run submission and status requests
    Internal("flwr.cli.app", "app", "launch/flwr_cli.py"),
    Internal("flwr.cli.typing", "SuperLinkConnection", "launch/flwr_cli.py", ("name", "address", "insecure")),
    Internal("flwr.cli.utils", "init_http_client_from_connection", "launch/flwr_cli.py"),
    Internal("flwr.cli.build", "build_fab_from_disk", "launch/flwr_cli.py"),
    Internal("flwr.cli.config_utils", "load_and_validate", "launch/flwr_cli.py"),
    Internal("flwr.supercore.fab", "Fab", "launch/flwr_cli.py"),
    *_names("flwr.common.serde", "fab_to_proto user_config_to_proto run_from_proto context_from_proto "
                                 "fab_from_proto", "launch/flwr_cli.py, launch/site.py"),
    *_names("flwr.proto.control_pb2", "StartRunRequest ListRunsRequest", "launch/flwr_cli.py"),
    # the Runtime API's requests and constants (launch/site.py, launch/serverapp.py, flower/runtime.py)
    Internal("flwr.proto.runtime_pb2", "AcquireTaskRequest", "launch/site.py, launch/serverapp.py"),
    *_names("flwr.proto.runtime_pb2", "PullAppMessagesRequest PullTaskInputRequest SendTaskHeartbeatRequest",
            "launch/site.py"),
    Internal("flwr.proto.node_pb2", "Node", "launch/site.py"),
    Internal("flwr.supercore.constant", "TaskType", "launch/site.py, launch/serverapp.py"),
    *_names("flwr.common.constant", "ErrorCode SubStatus", "launch/site.py"),
    Internal("flwr.supercore.retry", "exponential", "launch/site.py"),
    Internal("flwr.supercore.error", "FlowerError", "flower/runtime.py"),
    # launch/simulate.py: Flower's telemetry switched off in the module (read when flwr is first imported)
    Internal("flwr.supercore.telemetry", "FLWR_TELEMETRY_ENABLED", "launch/simulate.py"),
)


def _resolve(internal: Internal):
    obj = importlib.import_module(internal.module)
    for part in internal.name.split("."):
        obj = getattr(obj, part)
    return obj


def problem(internal: Internal) -> Optional[str]:
    """Why ``internal`` is not what fedclip-cache expects in the installed flwr (gone, or without one of its
    keyword arguments), or None."""
    where = f"{internal.module}.{internal.name}"
    try:
        obj = _resolve(internal)
    except (ImportError, AttributeError) as ex:
        return f"{where} is gone ({type(ex).__name__}: {ex})"
    if internal.keywords:
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return None
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            lost = [k for k in internal.keywords if k not in params]
            if lost:
                return f"{where} takes no {', '.join(lost)} any more"
    return None


def missing(internals: tuple = INTERNALS) -> list[str]:
    """What a newer (or older) flwr changed of :data:`INTERNALS`: one line each, naming the name and who uses it."""
    return [f"{p} (used by {i.used_by})" for i in internals for p in [problem(i)] if p]


def installed_version() -> str:
    """The installed flwr's version ('?' when its metadata cannot be read)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "?"


def require(module: str, name: str):
    """``module.name`` in the installed flwr, or a RuntimeError naming it and the flwr version it was checked
    against."""
    internal = Internal(module, name, "fedclip-cache")
    why = problem(internal)
    if why:
        raise RuntimeError(f"fedclip-cache relies on {why}; checked against flwr {FLWR_CHECKED}, installed "
                           f"{installed_version()}")
    return _resolve(internal)


# ------------------------------------------------------------------------------------------ the patches


def quick_object_pulls(module, backoff: float) -> None:
    """Make ``module``'s ``pull_objects`` retry a missing object after ``backoff`` seconds (flwr 1.42: 1 s, then 2 s,
    4 s, ...). A message becomes visible before all its objects have been pushed, so a reader that polls fast
    regularly finds an object missing and, with flwr's backoff, waits a whole second for it. ``module``: the
    SuperNode's loop or the ServerApp's grid (each imports ``pull_objects`` by name)."""
    require(module.__name__, "pull_objects")
    module.pull_objects = functools.partial(require(INFLATABLE, "pull_objects"), initial_backoff=backoff,
                                            backoff_cap=max(backoff, 1.0))


def patch_supernode_loop(clock, on_pull: Callable[[object], None], on_stored: Callable[[], None],
                         backoff: float) -> None:
    """Patch flwr 1.42's SuperNode loop module: its ``time`` becomes ``clock`` (the loop's two fixed sleeps:
    ``time.sleep(3)`` between two polls of the SuperLink, ``time.sleep(0.5)`` while it waits for a reply); its
    ``_pull_and_store_message`` calls ``on_pull(state)`` (the SuperNode's NodeState) before each pull and
    ``on_stored()`` after a pull that stored a message; its object pulls retry after ``backoff`` seconds. The
    protocol is unchanged."""
    loop = importlib.import_module(SUPERNODE_LOOP)
    require(SUPERNODE_LOOP, "time.sleep")
    pull = require(SUPERNODE_LOOP, "_pull_and_store_message")
    loop.time = clock

    def pull_and_store(*args, **kw):
        on_pull(kw.get("state"))
        run_id = pull(*args, **kw)
        if run_id is not None:
            on_stored()
        return run_id

    loop._pull_and_store_message = pull_and_store
    quick_object_pulls(loop, backoff)


def replace_flush_logs(flush: Callable) -> None:
    """``flush`` in place of flwr's ``flush_logs`` in the MODULE ``flwr.superlink.runtime.run_serverapp`` (whose
    package rebinds the name ``run_serverapp`` to the function: ``import ... as`` would patch the function)."""
    require(SERVERAPP_RUNNER, "flush_logs")
    importlib.import_module(SERVERAPP_RUNNER).flush_logs = flush


def superlink_lifespan_config():
    """flwr 1.42's ``flower-superlink`` options parsed from ``sys.argv`` by flwr's own (private) parser, with its
    checks (TLS files, node authentication needs TLS)."""
    return require(SUPERLINK_CLI, "_parse_superlink_lifespan_config")()


def superlink_lifespan():
    """The lifespan class flwr's ``flower-superlink`` serves its app with (it starts and stops flwr's SuperExec)."""
    return require(SUPERLINK_CLI, "SuperLinkLifespan")


def fleet_api_prefix() -> str:
    """The path prefix of flwr's Fleet HTTP router (``/v1/fleet`` in 1.42)."""
    return require("flwr.superlink.routers.fleet.router", "router.prefix")


class RuntimeHandlers(NamedTuple):
    """The modules flwr's Runtime API router calls: ``core``, the handlers every component shares (the task
    heartbeat); ``node``, the SuperNode's own."""

    core: object
    node: object


def runtime_handlers() -> RuntimeHandlers:
    """The Runtime API's handler modules of the installed flwr (:class:`RuntimeHandlers`)."""
    return RuntimeHandlers(importlib.import_module(CORE_HANDLERS), importlib.import_module(NODE_HANDLERS))
