"""The node's local interfaces, started by the daemon: the Prometheus endpoint, the MCP
bridge, the REST API and the control socket."""

from __future__ import annotations

import logging
from collections.abc import Callable

from actors._node_handles import RunningNode
from actors._node_networking import first_os_error
from actors.control import ControlActor
from actors.metrics_http import COLLECT_TIMEOUT, MetricsEndpoint
from actors.runtime import ActorSpec, Err, ask, reuse
from dmgn import api
from dmgn.api_token import ensure_token
from dmgn.config import Config, split_metrics_address
from dmgn.errors import ConfigError
from dmgn.paths import DataDir

log = logging.getLogger("dmgn.node")

__all__ = ["start_local_interfaces", "start_metrics_endpoint"]


async def start_metrics_endpoint(node: RunningNode, address: str) -> tuple[str, int]:
    """Serve ``GET /metrics`` on ``address`` (config ``metrics_addr``); returns what it bound.

    A scrape first asks the service for its status, which refreshes the gauges that mirror
    other actors (store counts, peers, sync lag, inbox depths), then renders the registry.
    """
    host, port = split_metrics_address(address)

    async def collect() -> bytes:
        result = await ask(node.service, api.Status(), COLLECT_TIMEOUT)
        if isinstance(result, Err):
            log.warning("metrics scrape: status failed: %s", result.reason)
        return node.metrics.render()

    endpoint = MetricsEndpoint(host, port, collect)
    try:
        await node.supervisor.start(ActorSpec("metrics", reuse(endpoint)))
    except OSError as error:
        raise ConfigError(
            f"cannot serve metrics on {address}: {error.strerror or error}; set metrics_addr "
            "in config.json to a free port (or null to turn metrics off)"
        ) from None
    assert endpoint.bound is not None
    return endpoint.bound


async def start_local_interfaces(
    node: RunningNode,
    data_dir: DataDir,
    describe: Callable[[], dict[str, object]],
    request_shutdown: Callable[[], None],
    *,
    config: Config | None = None,
) -> None:
    """Start the daemon's local interfaces: the MCP bridge, the REST API (when ``api_port``
    is set), then the control socket.

    The control socket comes last, so a `dmgn` that can reach it finds every actor up.
    """
    # Imported here, not at the top: the MCP SDK (hundreds of pydantic models) and hypercorn
    # cost an offline `dmgn add` or `dmgn status` most of its start-up, and only the daemon
    # serves these interfaces.
    from actors.mcp_bridge import McpBridge
    from actors.rest import RestActor

    bridge = McpBridge(node.service, data_dir.mcp_socket)
    await node.supervisor.start(ActorSpec("mcp_bridge", reuse(bridge)))
    if config is not None and config.api_port:
        # Data dirs made before the REST API existed get their token now.
        ensure_token(data_dir.api_token)
        rest = RestActor(
            node.service, data_dir.api_token, host=config.api_host, port=config.api_port
        )
        try:
            await node.supervisor.start(ActorSpec("rest", reuse(rest)))
        except Exception as failure:  # the bind error arrives inside nursery groups
            error = first_os_error(failure)
            if error is None:
                raise
            raise ConfigError(
                f"cannot serve the REST API on {config.api_host}:{config.api_port}: "
                f"{error.strerror or error}; another program may use that port: set "
                "api_port in config.json to a free one (or 0 for no REST API)"
            ) from None
        node.info.api_urls = list(rest.urls)
    control = ControlActor(
        data_dir.control_socket,
        node.service,
        describe=describe,
        request_shutdown=request_shutdown,
    )
    await node.supervisor.start(ActorSpec("control", reuse(control)))
