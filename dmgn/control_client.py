"""Client side of the control socket: how `dmgn` talks to a running `dmgn-node`."""

from __future__ import annotations

from dmgn import api
from dmgn.paths import DataDir


def daemon_request(data_dir: DataDir, request: api.ApiRequest) -> api.Response | None:
    """Send ``request`` to the daemon for ``data_dir``; ``None`` when no daemon is running."""
    if not data_dir.control_socket.exists():
        return None
    raise NotImplementedError("the control socket client is not built yet")
