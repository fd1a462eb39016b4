"""``fedclip-cache superlink``: flwr 1.42's own SuperLink, with its Fleet API -- and only its Fleet API -- on the
address the sites reach.

Why: flwr 1.42's ``flower-superlink`` serves its Fleet, Control and Runtime APIs on ONE HTTP server (``--host``,
default ``127.0.0.1``, and ``--port``; the separate ``--fleet-api-address``/``--control-api-address`` are deprecated
and not used by that server). With ``--host 127.0.0.1`` remote sites cannot connect; with ``--host 0.0.0.0`` anyone
who reaches the port reaches the Control API too, which has no authentication in the open-source distribution
(``load_control_authn_plugin``: OIDC only with Flower's enterprise plugin): they could submit runs (a run names
the ServerApp code the SuperLink executes), stop runs, read logs and register SuperNodes.

What: flwr's SuperLink app (``flwr.superlink.main.create_app`` with flwr's own lifespan, everything parsed by
flwr's own ``flower-superlink`` argument parser) is served unchanged on ``--host``/``--port``, which must be a
loopback address; the SAME app object (one state: nodes, runs, messages) is served a second time on
``--fleet-address`` behind :class:`FleetOnly` (``POST /v1/fleet/*``, the calls a SuperNode makes, and
``GET /health``; anything else: 404), with the SuperLink's TLS certificate. SuperNode authentication
(``--enable-supernode-auth``) is flwr's own: its Fleet middleware and servicer run for both listeners.
"""
from __future__ import annotations

import ipaddress
import sys
import threading
import time

from ..errors import ConfigError

FLEET_PATHS = "/v1/fleet/"  # flwr 1.42's Fleet HTTP router's prefix (flwr_internals.fleet_api_prefix, checked)
HEALTH_PATH = "/health"


class FleetOnly:
    """An ASGI app that passes the Fleet API's requests to ``app`` and answers 404 to everything else (the Control
    and Runtime APIs, the OpenAPI docs, websockets). The path is compared as the server received it (Starlette routes
    on it without normalising ``..``: ``/v1/fleet/../control/x`` reaches no Control route)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and allowed(scope.get("method", ""), scope.get("path", "")):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"not served on the Fleet API address\n"})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})


def allowed(method: str, path: str) -> bool:
    if method == "POST" and path.startswith(FLEET_PATHS):
        rest = path[len(FLEET_PATHS):]
        return bool(rest) and "/" not in rest and rest not in (".", "..")
    return method == "GET" and path == HEALTH_PATH


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_fleet_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ok = sep and host and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"superlink: --fleet-address {address!r}: give HOST:PORT (e.g. 0.0.0.0:9092, the address "
                          f"the sites' --superlink names)")
    return host, int(port)


def serve(fleet_address: str, flwr_args: list[str]) -> None:
    """Run the SuperLink (``flwr_args``: ``flower-superlink``'s options) until SIGTERM/Ctrl-C."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    from ..flower.flwr_internals import superlink_lifespan, superlink_lifespan_config

    host, port = parse_fleet_address(fleet_address)
    sys.argv = ["flower-superlink", *flwr_args]
    config = superlink_lifespan_config()  # flwr's own parser and checks (TLS files, node auth needs TLS)
    if not is_loopback(config.host):
        raise ConfigError(f"superlink: --host {config.host}: the Control and Runtime APIs stay on loopback (give "
                          f"--host 127.0.0.1, the default); the sites reach the Fleet API on --fleet-address")
    if config.certificates is None and not is_loopback(host):
        raise ConfigError(f"superlink: --insecure with --fleet-address {fleet_address}: the sites' traffic would "
                          f"cross the network unencrypted and unauthenticated; give --ssl-ca-certfile, "
                          f"--ssl-certfile and --ssl-keyfile (and --enable-supernode-auth)")
    if (host, port) == (config.host, config.port):
        raise ConfigError(f"superlink: --fleet-address {fleet_address} is the SuperLink's own --host/--port: give "
                          f"another port")
    app = create_app(config, superlink_lifespan())
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    log_config = get_uvicorn_log_config(console_handler.level)
    fleet = uvicorn.Server(uvicorn.Config(app=FleetOnly(app), host=host, port=port, lifespan="off",
                                          access_log=True, log_config=log_config, workers=1, **tls))
    thread = threading.Thread(target=fleet.run, name="fleet-api", daemon=True)  # ends with the process
    thread.start()
    while thread.is_alive() and not fleet.started:
        time.sleep(0.05)
    if not fleet.started:
        raise ConfigError(f"superlink: the Fleet API could not listen on {fleet_address} (in use? see the log above)")
    print(f"Fleet API (only) on {host}:{port}; Control and Runtime APIs on {config.host}:{config.port}", flush=True)
    # flwr's own `flower-superlink` server (flwr.superlink.cli.flower_superlink._run_superlink_http_api), in the
    # main thread: its signal handling ends the process and the lifespan stops flwr's SuperExec
    uvicorn.run(app=app, host=config.host, port=config.port, reload=False, access_log=True, log_config=log_config,
                workers=1, **tls)
