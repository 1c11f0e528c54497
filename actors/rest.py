"""The REST actor: an HTTP/JSON API on ``api_port`` for scripts and web apps, with a Bearer token.

Served by hypercorn's Trio worker (ASGI on Trio, no asyncio loop); the ASGI app is written by hand
here because it is small: a route table, a JSON body reader with a size cap, the token check and
an error mapper. Handlers own no state and do one thing: turn a route into a :mod:`dmgn.api`
request for the memory service (exactly what the control socket does), so a REST answer is the
same document the CLI prints with ``--json``, and every input is validated by
``dmgn.api.request_from_wire`` like at every other door into the node.

Who may call: whoever presents the token in ``api.token`` in the data dir (0600, made at
``dmgn init``; ``dmgn token rotate`` replaces it and the old one stops working at the next
request, because the file is read again whenever it changes). Compared in constant time
(``hmac.compare_digest``). A missing and a wrong token get the same 401 with the same body, so
a caller learns nothing about which it was. ``/openapi.json`` is served without a token: it
describes the API and holds no data.

Where: ``127.0.0.1`` by default (``api_host`` in config.json to change; the token is the only
fence then, and the traffic is plain HTTP - put TLS in front for anything beyond loopback).

Bounds: a body may have :data:`MAX_BODY_BYTES` (413 beyond, checked against Content-Length
before reading and while reading) and must arrive within :data:`BODY_TIMEOUT` (408 beyond);
:data:`MAX_INFLIGHT` requests run at once (503 ``busy`` beyond); each gets
:data:`REQUEST_DEADLINE` (504 ``timeout``). JSON nested deeper than Python's parser goes is a
400, not a crash.

Connections (issue 30): anyone on the host can open TCP connections to the port without a
token, and hypercorn accepts without limit. So the listener is ours, not hypercorn's: at most
:data:`MAX_CONNECTIONS` are open at once; when all are taken, a newcomer takes the slot of the
connection idle longest (no request in progress), so silent connections cannot keep a real
client out, and only if all are mid-request do we stop accepting (the kernel's backlog holds
the rest, costing us no descriptor); a connection that has not sent a whole request within
:data:`IDLE_TIMEOUT` is closed, and an accept that fails for want of descriptors is logged
once a minute without a traceback (trio's ``serve_listeners`` logs each
retry, ten a second, with one). Each accepted connection is then served by hypercorn's own
per-connection server, exactly as ``hypercorn.trio.serve`` would.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import hypercorn.config
import trio
from hypercorn.events import Event, Updated
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIReceiveCallable,
    ASGISendCallable,
    ConnectionState,
    Scope,
)
from hypercorn.utils import repr_socket_addr, wrap_app

from actors._peer_noise import PeerNoise
from actors._service_requests import ServiceAddress
from actors.runtime import Err, ask
from dmgn import __version__, api
from dmgn.api_token import file_version, read_token
from dmgn.errors import DmgnError, InvalidInput

__all__ = [
    "BODY_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_INFLIGHT",
    "REQUEST_DEADLINE",
    "ConnectionSlots",
    "RestActor",
    "TokenFile",
    "accept_connections",
    "build_app",
    "openapi_document",
    "status_for",
]

log = logging.getLogger("dmgn.rest")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

#: Largest request body: a memory's content may be 1 MiB (``MAX_CONTENT_BYTES``) and JSON may
#: escape it to up to 6 bytes a character for control characters, but real text stays under
#: 2x; with metadata and a 4,096-number embedding (~90 KiB as JSON), 4 MiB fits every valid add
#: with room, and bounds what one request makes us buffer (nginx's default is 1 MiB).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: A body not read (a 413, or an answer decided on the head: 401, 404, 405, 503) is read and
#: dropped up to this size before the answer goes out, so the client sees the answer (a server
#: that stops reading makes most clients report a reset instead) and may reuse the connection;
#: beyond it the answer says ``Connection: close``. Costs bandwidth, never memory.
MAX_DISCARD_BYTES = 16 * 1024 * 1024
#: Requests handled at once; more get 503. The service serves 32 at a time itself; this keeps a
#: burst from a script from holding hundreds of buffered bodies.
MAX_INFLIGHT = 64
#: Open connections at once. Twice :data:`MAX_INFLIGHT`, so keep-alive clients waiting between
#: requests do not starve new ones; far below a default ``ulimit -n`` of 1024, which the node
#: shares with its peers, store and control socket (1,100 held connections at that limit
#: made ``dmgn status`` take 18 s and the accept loop log a traceback ten times a second).
#: nginx's worker_connections default is 512 for a whole web server.
MAX_CONNECTIONS = 128
#: A connection that has not sent a whole request (headers) this long after opening, or after
#: its last answer, is closed (hypercorn's keep-alive timer runs until a request's headers
#: are complete). Loopback clients send headers in microseconds; 10 s allows a slow network
#: (Apache's RequestReadTimeout starts at 20 s for headers, hypercorn's default keep-alive
#: is 5 s). It was 30 s: a silent connection held a slot three times as long.
IDLE_TIMEOUT = 10.0
#: Time to receive a whole request body, from its headers on: a 4 MiB body takes milliseconds
#: on loopback and ~3 s at 10 Mbit/s. A body that stops mid-way held a slot for 5+ minutes.
#: Not hypercorn's ``read_timeout``: that also closes a connection whose client waits silently
#: for a slow answer (a search may take REQUEST_DEADLINE).
BODY_TIMEOUT = 30.0
#: Pause after an accept failed for want of descriptors (EMFILE/ENFILE) or memory: trio's
#: value; the failure is logged once a minute (PeerNoise), not at each retry.
ACCEPT_RETRY = 0.1
#: accept() errors that mean "out of a resource", not "the listener is broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Per-request deadline, as for the control socket (a full-store keyword scan may take tens of
#: seconds at hundreds of thousands of memories).
REQUEST_DEADLINE = 60.0
#: HTTP status for each error code of :mod:`dmgn.errors` and the runtime (the JSON body carries
#: the code itself, so programs need not parse statuses).
STATUS_FOR_CODE = {
    "invalid_input": 400,
    "invalid_json": 400,
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "ambiguous_id": 409,
    "request_timeout": 408,
    "payload_too_large": 413,
    "tampered": 422,
    "busy": 503,
    "actor_gone": 503,
    "actor_crashed": 503,
    "timeout": 504,
}
_UNAUTHORIZED = "missing or invalid bearer token"


def status_for(code: str) -> int:
    return STATUS_FOR_CODE.get(code, 500)


class _HttpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenFile:
    """The token, read again whenever the file is replaced (``dmgn token rotate``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._version: tuple[int, int, int] | None = None
        self._token: bytes | None = None

    def current(self) -> bytes | None:
        version = file_version(self._path)
        if version != self._version:
            self._version = version
            try:
                self._token = read_token(self._path).encode()
            except DmgnError as error:
                # Refuse everyone rather than serve with a token others may have read.
                log.warning("REST API refuses all requests: %s", error)
                self._token = None
        return self._token

    def allows(self, header: bytes | None) -> bool:
        expected = self.current()
        if expected is None or header is None:
            return False
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Constant time in the token's content: a timing side channel reveals nothing.
        return hmac.compare_digest(given.strip(), expected)


# -- routes ---------------------------------------------------------------------------------------

Handler = Callable[[dict[str, str], dict[str, str], Any], api.AnyRequest]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # segments; "{id}" matches one segment
    summary: str
    build: Handler
    body: type[api.ApiRequest] | None = None
    query: tuple[tuple[str, str, str], ...] = ()  # (name, JSON type, description)
    created: bool = False

    def match(self, segments: list[str]) -> dict[str, str] | None:
        pattern = self.path.strip("/").split("/")
        if len(pattern) != len(segments):
            return None
        found: dict[str, str] = {}
        for want, got in zip(pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                found[want[1:-1]] = got
            elif want != got:
                return None
        return found


def _body_request(op: str, exclude: frozenset[str] = frozenset()) -> Handler:
    def build(params: dict[str, str], query: dict[str, str], body: Any) -> api.AnyRequest:
        if not isinstance(body, dict):
            raise InvalidInput("the request body must be a JSON object")
        extra = sorted(set(body) & (exclude | {"op"}))
        if extra:
            raise InvalidInput(f"{op}: unexpected field(s) {', '.join(extra)}")
        return api.request_from_wire({**body, "op": op})

    return build


def _int(query: dict[str, str], name: str, default: int | None = None) -> int | None:
    text = query.get(name)
    if text is None:
        return default
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be a whole number") from None


def _bool(query: dict[str, str], name: str) -> bool:
    text = query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise InvalidInput(f"query parameter {name!r} must be true or false")
    return text in ("true", "1")


def _recent(params: dict[str, str], query: dict[str, str], body: Any) -> api.AnyRequest:
    types = [t for t in query.get("types", "").split(",") if t]
    return api.request_from_wire(
        {
            "op": "query",
            "recent": True,
            "limit": _int(query, "limit", 10),
            "types": types,
            "after": _int(query, "after"),
            "before": _int(query, "before"),
            "include_content": _bool(query, "include_content"),
        }
    )


ROUTES = (
    Route(
        "POST",
        "/v1/memories",
        "Add a memory (encrypted and signed on this device, synced to your devices)",
        _body_request("add"),
        body=api.AddMemory,
        created=True,
    ),
    Route(
        "GET",
        "/v1/memories/{id}",
        "Read one memory (id or unique prefix of at least 6 hex characters)",
        lambda p, q, b: api.GetMemory(id=p["id"]),
    ),
    Route(
        "DELETE",
        "/v1/memories/{id}",
        "Delete a memory (a tombstone that syncs to your devices)",
        lambda p, q, b: api.DeleteMemory(id=p["id"]),
    ),
    Route(
        "GET",
        "/v1/memories/{id}/links",
        "The links of one memory (the memory with its links)",
        lambda p, q, b: api.GetMemory(id=p["id"]),
    ),
    Route(
        "POST",
        "/v1/links",
        "Link two memories (or change the link's weight)",
        _body_request("link"),
        body=api.LinkMemories,
        created=True,
    ),
    Route(
        "POST",
        "/v1/query",
        "Search by text and/or embedding, with filters and alpha (answered with your devices)",
        _body_request("query", frozenset({"recent"})),
        body=api.QueryMemories,
    ),
    Route(
        "GET",
        "/v1/recent",
        "The most recent memories, oldest first",
        _recent,
        query=(
            ("limit", "integer", "how many (1-1000, default 10)"),
            ("types", "string", "comma-separated memory types"),
            ("after", "integer", "only memories created after (ns since the epoch)"),
            ("before", "integer", "only memories created before (ns since the epoch)"),
            ("include_content", "boolean", "whole contents instead of snippets"),
        ),
    ),
    Route(
        "GET",
        "/v1/graph/{id}",
        "The link graph around a memory",
        lambda p, q, b: api.GetGraph(start_id=p["id"], max_depth=_int(q, "depth", 2) or 0),
        query=(("depth", "integer", "link hops to follow (0-10, default 2)"),),
    ),
    Route(
        "GET",
        "/v1/context",
        "The most recent memories as context for an agent",
        lambda p, q, b: api.GetContext(limit=_int(q, "limit", 10) or 0),
        query=(("limit", "integer", "how many (1-1000, default 10)"),),
    ),
    Route("GET", "/v1/status", "Node status", lambda p, q, b: api.Status()),
    Route(
        "GET", "/v1/peers", "Connected, discovered and dialed peers", lambda p, q, b: api.Peers()
    ),
)


# -- the ASGI app ---------------------------------------------------------------------------------


def build_app(
    service: ServiceAddress,
    tokens: TokenFile,
    *,
    max_body: int = MAX_BODY_BYTES,
    max_inflight: int = MAX_INFLIGHT,
    deadline: float = REQUEST_DEADLINE,
    body_timeout: float = BODY_TIMEOUT,
) -> Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]:
    slots = trio.Semaphore(max_inflight)
    document = json.dumps(openapi_document()).encode()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        raw = cast(dict[str, Any], scope)
        out = cast(Send, send)
        incoming = cast(Receive, receive)
        if raw["type"] == "lifespan":
            await _lifespan(incoming, out)
            return
        if raw["type"] != "http":
            return  # websockets are not offered: hypercorn closes the connection
        headers = {k.lower(): v for k, v in raw["headers"]}
        body = _RequestBody(incoming, headers.get(b"content-length"), body_timeout)
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            answer = _error("busy", f"more than {max_inflight} requests at once; retry shortly")
        else:
            try:
                answer = await _serve(raw, headers, body)
            finally:
                slots.release()
        if not await body.drain():
            answer = answer.closing()
        await _respond(out, answer)

    async def _serve(
        scope: dict[str, Any], headers: dict[bytes, bytes], body: _RequestBody
    ) -> _Answer:
        method = scope["method"]
        path = scope["path"]
        if method == "GET" and path == "/openapi.json":
            return _Answer(200, document)
        if not tokens.allows(headers.get(b"authorization")):
            return _error("unauthorized", _UNAUTHORIZED, ((b"www-authenticate", b"Bearer"),))
        try:
            route, params = _find(method, path)
            document_in = await _read_json(body, max_body) if route.body else None
            query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
            request = route.build(params, query, document_in)
        except RecursionError:
            # Deep nesting that the parser took but validating it did not (pydantic recursing).
            return _error("invalid_json", _TOO_DEEP)
        except (_HttpError, DmgnError) as error:
            return _error(error.code, str(error))
        result = await ask(service, request, deadline)
        if isinstance(result, Err):
            return _error(result.code, result.reason)
        status = 201 if route.created else 200
        return _Answer(status, json.dumps(result.value, ensure_ascii=False).encode())

    return app


def _find(method: str, path: str) -> tuple[Route, dict[str, str]]:
    segments = [unquote(s) for s in path.strip("/").split("/")]
    allowed: list[str] = []
    for route in ROUTES:
        params = route.match(segments)
        if params is None:
            continue
        if route.method == method:
            return route, params
        allowed.append(route.method)
    if allowed:
        raise _HttpError("method_not_allowed", f"{path} accepts {', '.join(sorted(allowed))}")
    raise _HttpError("not_found", f"no endpoint {path}; see /openapi.json")


_TOO_DEEP = "the body is not valid JSON for this API: it is nested too deeply"


class _RequestBody:
    """A request's body, read through this so that the connection stays usable after the answer.

    Many answers are decided on the head alone (401, 404, 405, 503, a declared 413). If the
    body was not read to its end when the answer has gone out, hypercorn closes the connection
    (HTTP/1.1 cannot start the next request mid-body) without a ``Connection: close`` in the
    answer, so a keep-alive client (httpx sends a POST's head and body in two writes) sends its
    next request into a closed connection: "Server disconnected without sending a response".
    So before answering, :meth:`drain` reads and drops the rest of the body, bounded: at most
    :data:`MAX_DISCARD_BYTES` and until the body's deadline (:data:`BODY_TIMEOUT` after the
    head); past either, the answer says ``Connection: close`` instead. Dropping costs
    bandwidth, never memory.
    """

    def __init__(self, receive: Receive, declared: bytes | None, timeout: float) -> None:
        self._receive = receive
        self.timeout = timeout
        self.deadline = trio.current_time() + timeout
        self.declared = int(declared) if declared is not None and declared.isdigit() else None
        self.seen = 0
        self.ended = False

    async def receive(self) -> dict[str, Any]:
        message = await self._receive()
        self.seen += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.ended = True
        return message

    async def drain(self) -> bool:
        """Read the rest of the body and drop it; whether it ended (the connection may be
        used again)."""
        if self.declared is not None and self.declared > MAX_DISCARD_BYTES:
            return self.ended
        with trio.move_on_at(self.deadline):
            while not self.ended and self.seen <= MAX_DISCARD_BYTES:
                await self.receive()
        return self.ended


async def _read_json(body: _RequestBody, limit: int) -> Any:
    with trio.move_on_at(body.deadline):
        return await _read_json_now(body, limit)
    raise _HttpError(
        "request_timeout",
        f"the body did not arrive within {body.timeout:g} s; send the whole request at once",
    )


async def _read_json_now(body: _RequestBody, limit: int) -> Any:
    """The body as JSON; over ``limit`` bytes (declared or read) is a 413, and what is left of
    such a body is dropped before the answer (:meth:`_RequestBody.drain`), so that the client,
    still sending, reads our 413 instead of a reset connection."""
    too_large = _HttpError("payload_too_large", f"the body is over the {limit}-byte limit")
    if body.declared is not None and body.declared > limit:
        raise too_large
    chunks: list[bytes] = []
    while True:
        message = await body.receive()
        if message["type"] == "http.disconnect":
            raise _HttpError("invalid_json", "the client went away mid-body")
        if body.seen > limit:
            raise too_large
        chunks.append(message.get("body", b""))
        if body.ended:
            break
    try:
        return json.loads(b"".join(chunks), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise _HttpError("invalid_json", f"the body is not valid JSON: {error}") from None
    except RecursionError:  # thousands of nested brackets: Python's parser recurses
        raise _HttpError("invalid_json", _TOO_DEEP) from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def closing(self) -> _Answer:
        """The same answer, telling the client that this connection ends with it."""
        return _Answer(self.status, self.body, (*self.headers, (b"connection", b"close")))


async def _respond(send: Send, answer: _Answer) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer.body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
                *answer.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


def _error(code: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> _Answer:
    # The same shape the CLI prints with --json.
    body = json.dumps({"error": message, "code": code}, ensure_ascii=False).encode()
    return _Answer(status_for(code), body, extra)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- OpenAPI --------------------------------------------------------------------------------------


def _request_schema(cls: type[api.ApiRequest], exclude: frozenset[str]) -> dict[str, Any]:
    """The JSON Schema of a request's body: the pydantic model every door validates with."""
    schema = cls.model_json_schema()
    for name in exclude:
        schema.get("properties", {}).pop(name, None)
    schema.pop("title", None)
    return schema


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for :data:`ROUTES` (bodies described from the :mod:`dmgn.api` requests)."""
    error = {
        "description": "an error: {error: sentence, code: machine-readable code}",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "security": [{"bearer": []}],
            "responses": {
                "201" if route.created else "200": {
                    "description": "the same document `dmgn ... --json` prints",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "400": error,
                "401": error,
                "404": error,
                "408": error,
                "413": error,
                "503": error,
                "504": error,
            },
        }
        parameters = [
            {"name": name[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.path.split("/")
            if name.startswith("{")
        ]
        parameters += [
            {"name": name, "in": "query", "schema": {"type": kind}, "description": text}
            for name, kind, text in route.query
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            exclude = frozenset({"recent"}) if route.body is api.QueryMemories else frozenset()
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _request_schema(route.body, exclude)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dmgn REST API",
            "version": __version__,
            "description": "Memories of one identity, served by its dmgn-node. See docs/rest.md.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
                    "required": ["error", "code"],
                }
            },
        },
    }


# -- the actor ------------------------------------------------------------------------------------


class RestActor:
    """Serves :func:`build_app` with hypercorn on ``host:port`` until cancelled."""

    def __init__(
        self,
        service: ServiceAddress,
        token_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int,
        max_body: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        if not 1 <= port <= 65535:
            raise InvalidInput(f"api_port {port} is not a port number (1-65535)")
        self._service = service
        self._tokens = TokenFile(token_path)
        self._host = host
        self._port = port
        self._max_body = max_body
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._body_timeout = body_timeout
        self.urls: list[str] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        host = f"[{self._host}]" if ":" in self._host else self._host
        config.bind = [f"{host}:{self._port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("dmgn.rest.server")
        config.keep_alive_timeout = self._idle_timeout
        config.include_server_header = False
        app = build_app(
            self._service, self._tokens, max_body=self._max_body, body_timeout=self._body_timeout
        )
        async with trio.open_nursery() as nursery:
            self.urls = await nursery.start(
                partial(_serve_http, app, config, max_connections=self._max_connections)
            )
            log.info("REST API on %s", ", ".join(self.urls))
            task_status.started()


async def _serve_http(
    app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]],
    config: hypercorn.config.Config,
    *,
    max_connections: int,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` with our own accept loop (see the module docstring).

    Uses hypercorn's per-connection server (``TCPServer``), which is not its documented API;
    the REST tests run every request through it, so a change in hypercorn fails them loudly.
    No lifespan protocol: this app has nothing to start or stop.
    """
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    sockets = config.create_sockets()
    listeners: list[trio.SocketListener] = []
    urls: list[str] = []
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    slots = ConnectionSlots(max_connections)
    noise = PeerNoise(log)

    async def serve_one(stream: trio.SocketStream, slot: trio.CancelScope) -> None:
        await _Connection(
            wrapped,
            config,
            context,
            ConnectionState({}),
            stream,  # type: ignore[arg-type]
            on_idle=partial(slots.mark, slot),
        ).run()

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_connections, listener, serve_one, slots, noise)
        task_status.started(urls)


class _Connection(TCPServer):
    """hypercorn's server for one connection, which ends when the connection does and says
    when it is idle (no request in progress: a newcomer may then take its slot)."""

    def __init__(
        self,
        app: AppWrapper,
        config: hypercorn.config.Config,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SSLStream[trio.SocketStream],
        *,
        on_idle: Callable[[bool], None],
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self._on_idle = on_idle

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            self._on_idle(event.idle)
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        await super()._read_data()
        # The peer has gone (or we closed): hypercorn would leave its keep-alive timer running
        # to the end, so the task - and our connection slot - outlived the connection by up to
        # IDLE_TIMEOUT, and a client that connects and leaves at once could pile them up.
        await self.idle_task.stop()


class ConnectionSlots:
    """At most ``limit`` open connections. When all are taken, a newcomer takes the slot of the
    connection idle longest - no request in progress: silent since it opened, part-way through
    its head, or between keep-alive requests - so silent connections cannot keep a real client
    out (a client sends its request as soon as it connects). Only when every connection is in
    the middle of a request does accepting wait (the kernel's backlog holds the newcomers).

    Each connection holds a cancel scope: cancelling it is how an idle one is evicted, and its
    slot then passes to the newcomer instead of being freed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        #: Scopes of idle connections, longest idle first (a dict as an ordered set).
        self._idle: dict[trio.CancelScope, None] = {}
        self._changed = trio.Event()

    def has_room(self) -> bool:
        return self.open < self.limit or bool(self._idle)

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._changed = trio.Event()
            await self._changed.wait()

    def admit(self) -> trio.CancelScope | None:
        """A slot for a connection just accepted (evicting the longest idle one if all are
        taken), or ``None`` if every connection is busy."""
        if self.open >= self.limit:
            if not self._idle:
                return None
            evicted = next(iter(self._idle))
            del self._idle[evicted]
            evicted.cancel()  # its slot passes to the newcomer: `open` is unchanged
        else:
            self.open += 1
        slot = trio.CancelScope()
        self._idle[slot] = None  # idle until its first request head is complete
        return slot

    def mark(self, slot: trio.CancelScope, idle: bool) -> None:
        self._idle.pop(slot, None)
        if idle and not slot.cancel_called:
            self._idle[slot] = None  # at the end: idle since now
            self._changed.set()

    def release(self, slot: trio.CancelScope) -> None:
        self._idle.pop(slot, None)
        if not slot.cancel_called:  # an evicted connection's slot went to its successor
            self.open -= 1
            self._changed.set()


async def accept_connections(
    listener: trio.abc.Listener[trio.SocketStream],
    serve: Callable[[trio.SocketStream, trio.CancelScope], Awaitable[None]],
    slots: ConnectionSlots,
    noise: PeerNoise,
) -> None:
    """Accept while :class:`ConnectionSlots` has room and serve each connection in its own task
    (in its slot's cancel scope, closing the socket however it ends), until cancelled.

    An accept that fails for want of descriptors or memory is retried after
    :data:`ACCEPT_RETRY` and logged through ``noise`` (once a minute, no traceback); any other
    accept error is the listener broken, and raised.
    """

    async def serve_in(stream: trio.SocketStream, slot: trio.CancelScope) -> None:
        try:
            with slot:
                await serve(stream, slot)
        finally:
            await stream.aclose()  # closes the socket even when cancelled
            slots.release(slot)

    async with listener, trio.open_nursery() as nursery:
        while True:
            await slots.wait_for_room()
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                noise.report(
                    "accept",
                    "REST API: accept failed (%s: %s); retrying - the process is out of file "
                    "descriptors or memory (raise `ulimit -n`, or find what holds connections "
                    "to the API port)",
                    errno.errorcode.get(error.errno or 0, "?"),
                    error.strerror,
                )
                await trio.sleep(ACCEPT_RETRY)
                continue
            slot = slots.admit()
            while slot is None:  # the idle one we counted on began a request meanwhile:
                await slots.wait_for_room()  # hold this one (one descriptor) until there is room
                slot = slots.admit()
            nursery.start_soon(serve_in, stream, slot)
