"""The memory service's request envelope, named once for every actor that speaks to it.

The service (a coordinator, :mod:`actors.service`) serves :mod:`dmgn.api` requests; the local
interfaces (the control socket, REST, the MCP bridge) are leaf actors, which may not import a
coordinator, so the address type they are handed lives here, below both.
"""

from __future__ import annotations

from actors.runtime import Address, Request
from dmgn import api

__all__ = ["ServiceAddress", "ServiceMsg"]

#: What the service's inbox takes: a request body and where to answer.
ServiceMsg = Request[api.AnyRequest, api.Response]
#: Where the local interfaces send requests.
ServiceAddress = Address[ServiceMsg]
