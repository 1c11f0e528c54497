"""The MCP bridge actor: serves the Model Context Protocol to local AI tools.

AI tools (Claude Desktop, Cline, Cursor, ...) start ``dmgn mcp``, which relays its stdio to this
actor's Unix socket in the data dir. Each connection is one MCP session, served by the official
``mcp`` SDK (anyio, which runs on Trio); sessions run concurrently, up to :data:`MAX_SESSIONS`.

The wire on the socket is exactly MCP's stdio transport: newline-delimited JSON-RPC messages
(MCP spec, "Transports: stdio": messages are delimited by newlines and must not contain embedded
newlines). Using the same framing is what lets ``dmgn mcp`` be a plain byte relay.

Tool handlers own no state: each one turns validated MCP arguments into a :mod:`dmgn.api` request
for the memory service and turns the service's ``Err`` into an MCP tool error (``is_error``)
carrying the reason, so a bad argument is the model's problem to fix, never a crash of the
session or the daemon.

Tools mirror the reference implementation's names, arguments and result fields; knowledge-graph
tools (``add_node``, ``add_edge``, ``query_graph``) map onto memories and links, see docs/mcp.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NotRequired, TypeVar

import anyio
import mcp_types
import trio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.shared.message import SessionMessage
from pydantic import Field, ValidationError
from pydantic_core import PydanticSerializationError
from typing_extensions import TypedDict  # pydantic needs it for TypedDicts before 3.12

from actors._service_requests import ServiceAddress
from actors._unix_socket import (
    accept_stream,
    listen_private_unix,
    peer_credentials,
    remove_if_ours,
)
from actors.runtime import Err, ask
from dmgn import __version__, api
from dmgn.errors import InvalidInput
from dmgn.skill import SKILL_TEXT

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_SESSIONS",
    "McpBridge",
    "build_server",
    "mcp_message_streams",
    "parse_time_ns",
]

log = logging.getLogger("dmgn.mcp")

R = TypeVar("R", bound=api.ApiRequest)

#: Concurrent MCP sessions. A person runs a handful of AI tools at once; each session costs a few
#: tasks and buffers. Beyond this, new connections are told "too many sessions" and closed, so a
#: runaway client loop cannot exhaust the daemon's file descriptors.
MAX_SESSIONS = 16

#: A session with no traffic either way for this long gives up its slot when a new session
#: needs one and all :data:`MAX_SESSIONS` are taken (the longest-idle goes first). Sessions are not
#: closed for idleness otherwise: an AI tool keeps its MCP server for the app's lifetime and may
#: sit unused for hours, and closing it would break the tool for nothing. Longer than a tool
#: call may take (:data:`TOOL_TIMEOUT`), so a session waiting for an answer is never taken.
EVICT_IDLE_AFTER = 90.0

#: Largest JSON-RPC message accepted from a client. The largest legitimate request is an
#: add_memory with 1 MiB of content (dmgn.memory.MAX_CONTENT_BYTES), which JSON escaping can grow
#: up to 6x in the worst case (``\\u00XX``), plus a 4096-number embedding (~100 KB). A line longer
#: than this is not a memory; the connection is closed rather than buffered without bound.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

#: Deadline for one tool call's request to the memory service. The keyword scan decrypts the whole
#: store, so a large store can take seconds; a minute means the node is wedged.
TOOL_TIMEOUT = 60.0

#: How long a refused (over-capacity) client gets to send its first message so it can be answered
#: with a JSON-RPC error instead of a bare hang-up.
REFUSAL_GRACE = 2.0

#: Graph nodes whose names/snippets ``query_graph`` fetches (one decrypt each).
MAX_DESCRIBED_NODES = 64

_RECEIVE_CHUNK = 65536
_SERVER_INSTRUCTIONS = (
    "dmgn is the user's private, encrypted long-term memory. Call load_skill once to learn how "
    "to use these tools well; call get_context at the start of a conversation."
)

#: Tool parameters reuse the request schema's constrained types (dmgn.api), so a range is
#: declared once and MCP clients see the same limits the node enforces.
MemoryType = api.MemoryType


# -- result shapes (they become the tools' output schemas) -------------------------------------


class AddResult(TypedDict):
    id: str
    timestamp: int
    timestamp_rfc3339: str
    type: str
    links: NotRequired[list[str]]


class NewMemory(TypedDict):
    """One memory of an ``add_memories`` call."""

    content: Annotated[str, Field(min_length=1, description="The memory itself.")]
    type: NotRequired[MemoryType]
    links: NotRequired[list[str]]
    metadata: NotRequired[dict[str, str]]
    embedding: NotRequired[list[float]]


class AddProblem(TypedDict):
    index: int
    error: str


class AddManyResult(TypedDict):
    added: int
    already_present: int
    refused_deleted: int
    ids: list[str | None]
    errors: list[AddProblem]


class QueryHit(TypedDict):
    memory_id: str
    #: Absent when nothing was ranked (recent memories).
    score: NotRequired[float]
    type: str
    timestamp: int
    timestamp_rfc3339: str
    snippet: NotRequired[str]
    content: NotRequired[str]


class QueryResult(TypedDict):
    results: list[QueryHit]
    count: int


class ContextMemory(TypedDict):
    id: str
    content: str
    type: str
    timestamp: int
    timestamp_rfc3339: str
    time_ago: str
    metadata: dict[str, str]


class ContextResult(TypedDict):
    memories: list[ContextMemory]
    count: int
    context_window_hint: str


class LinkResult(TypedDict):
    from_id: str
    to_id: str
    edge_type: str
    weight: NotRequired[float]
    created: bool


class GraphNode(TypedDict):
    id: str
    type: str
    timestamp: int
    timestamp_rfc3339: str
    link_count: int
    name: NotRequired[str]
    node_type: NotRequired[str]
    snippet: NotRequired[str]


GraphEdge = TypedDict(
    "GraphEdge",
    {
        "from": str,
        "to": str,
        "type": str,
        "weight": float,
        "created": NotRequired[int],
        "created_rfc3339": NotRequired[str],
    },
)


class GraphResult(TypedDict):
    root_id: str
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    depth: int


class KnowledgeGraphResult(GraphResult):
    matched_query: NotRequired[str]


class DeleteResult(TypedDict):
    id: str
    deleted: bool


class NodeResult(TypedDict):
    id: str
    name: str
    node_type: str
    timestamp: int
    timestamp_rfc3339: str


class EdgeResult(TypedDict):
    from_id: str
    to_id: str
    relation: str
    weight: float
    created: bool


# -- the actor -----------------------------------------------------------------------------


class McpBridge:
    """Listens on a Unix socket; one MCP session per connection, handled by the official SDK.

    The bridge has no inbox: its inputs are connections. It holds the memory service's address
    and nothing else, so a crash (restarted by the supervisor) loses nothing but open sessions,
    which the AI tools re-open.
    """

    def __init__(
        self,
        service: ServiceAddress,
        socket_path: Path,
        *,
        max_sessions: int = MAX_SESSIONS,
        evict_idle_after: float = EVICT_IDLE_AFTER,
    ) -> None:
        self._service = service
        self._socket_path = socket_path
        self._max_sessions = max_sessions
        self._evict_idle_after = evict_idle_after
        self._live: set[_Session] = set()
        self._server = build_server(service)

    @property
    def sessions(self) -> int:
        """Sessions open right now."""
        return len(self._live)

    def _make_room(self) -> bool:
        """Whether a new session may start: a free slot, or one taken from the longest-idle
        session once it has been idle for :data:`EVICT_IDLE_AFTER`."""
        if len(self._live) < self._max_sessions:
            return True
        idlest = max(self._live, key=lambda session: session.idle_for())
        if idlest.idle_for() < self._evict_idle_after:
            return False
        log.info(
            "closing an MCP session idle for %.0fs: a new session needs its slot",
            idlest.idle_for(),
        )
        self._live.discard(idlest)
        idlest.scope.cancel()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener, identity = await listen_private_unix(
            self._socket_path, backlog=MAX_SESSIONS, what="MCP socket"
        )
        try:
            with listener:
                async with trio.open_nursery() as nursery:
                    task_status.started()
                    log.info("MCP bridge listening on %s", self._socket_path)
                    while True:
                        stream = await accept_stream(listener, "MCP bridge")
                        nursery.start_soon(self._serve_connection, stream)
        finally:
            remove_if_ours(self._socket_path, identity)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not _peer_is_us(stream.socket):
                log.warning("refused an MCP connection from another user")
                return
            if not self._make_room():
                await _refuse_busy(stream, self._max_sessions)
                return
            session = _Session(stream)
            self._live.add(session)
            try:
                with session.scope:
                    await serve_session(self._server, session)
            except Exception as error:
                # One broken session (a client that vanished mid-write, a bug in a handler the
                # SDK did not catch) must not take the other sessions or the daemon with it.
                log.info("MCP session ended with %s: %s", type(error).__name__, error)
            finally:
                self._live.discard(session)


class _Session(trio.abc.Stream):
    """One session's connection, remembering when bytes last moved (for idle eviction); its
    cancel scope ends the session."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.scope = trio.CancelScope()
        self._last = trio.current_time()

    def idle_for(self) -> float:
        return trio.current_time() - self._last

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._last = trio.current_time()
        await self._stream.send_all(data)
        self._last = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self._last = trio.current_time()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


async def serve_session(server: MCPServer[Any], stream: trio.abc.Stream) -> None:
    """Run one MCP session over ``stream`` until the client closes its side."""
    # The SDK's MCPServer only runs its own transports; over our streams we drive its low-level
    # server, as the SDK's in-process client does. `_lowlevel_server` is the one private name
    # we touch; the bridge tests exercise it end to end, so an SDK change fails loudly.
    lowlevel = server._lowlevel_server
    async with mcp_message_streams(stream) as (read_stream, write_stream):
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


@asynccontextmanager
async def mcp_message_streams(
    stream: trio.abc.Stream,
) -> AsyncIterator[
    tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]
]:
    """MCP's stdio framing (one JSON-RPC message per line) over any Trio byte stream.

    Yields the (read, write) message streams the SDK's sessions take, for a server or a client.
    A malformed line is delivered as an exception item, as the SDK's stdio transport does, so the
    session answers it with a JSON-RPC error and carries on.
    """
    inbound_send, inbound = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    outbound, outbound_receive = anyio.create_memory_object_stream[SessionMessage](0)

    async def read_messages() -> None:
        async with inbound_send:
            async for line in _lines(stream):
                try:
                    message = _parse_message(line)
                except ValidationError as error:
                    await inbound_send.send(error)
                    continue
                await inbound_send.send(SessionMessage(message))

    async def write_messages() -> None:
        async with outbound_receive:
            async for item in outbound_receive:
                try:
                    await stream.send_all(_message_line(item.message))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the peer left; the read side will see it too

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_messages)
        nursery.start_soon(write_messages)
        try:
            yield inbound, outbound
        finally:
            nursery.cancel_scope.cancel()


def _parse_message(line: bytes) -> mcp_types.JSONRPCMessage:
    """One JSON-RPC message from a line; raises :class:`ValidationError` if it is not one.

    The SDK's parser (jiter) refuses a whole line over one ``"\\udc00"`` escape (a lone UTF-16
    surrogate), and a line it refuses can only be logged, not answered - the request would hang
    until the client's timeout. JSON itself allows those escapes, so such a line is read again
    with the standard library: the request then reaches its tool, whose argument check refuses
    the string by name (``dmgn.api``), and the caller gets a tool error.
    """
    try:
        return mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as error:
        try:
            document = json.loads(line, parse_constant=_not_json)
        except (ValueError, RecursionError):
            raise error from None
        return mcp_types.jsonrpc_message_adapter.validate_python(document, by_name=False)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # the stdlib parser takes NaN and Infinity; jiter not


def _message_line(message: mcp_types.JSONRPCMessage) -> bytes:
    """A message as one line of JSON. An answer that cannot be encoded (a string that is not
    text came back in it, e.g. an unknown tool's name echoed by the SDK) becomes a JSON-RPC
    error for the same request, so the client still gets an answer."""
    try:
        return message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"
    except PydanticSerializationError:
        request_id = getattr(message, "id", None)
        log.warning("an MCP answer held text that is not UTF-8; sent an error instead")
        error = {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {
                "code": -32602,
                "message": "the request held text that is not valid UTF-8 (half of a UTF-16 "
                "surrogate pair); send UTF-8 text",
            },
        }
        return json.dumps(error).encode() + b"\n"


async def _lines(stream: trio.abc.Stream) -> AsyncIterator[bytes]:
    """Newline-terminated lines (without the newline) until EOF; blank lines are skipped."""
    buffer = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(_RECEIVE_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not chunk:
            return
        start = len(buffer)
        buffer += chunk
        newline = buffer.find(b"\n", start)
        while newline >= 0:
            line = bytes(buffer[:newline]).strip()
            del buffer[: newline + 1]
            if line:
                yield line
            newline = buffer.find(b"\n")
        if len(buffer) > MAX_MESSAGE_BYTES:
            log.warning("closing an MCP connection: a message exceeded %d bytes", MAX_MESSAGE_BYTES)
            return


async def _refuse_busy(stream: trio.SocketStream, limit: int) -> None:
    """Answer the client's first request with a JSON-RPC error saying why, then hang up."""
    reason = (
        f"dmgn: {limit} MCP sessions are already open on this node; close another AI tool's "
        "connection and try again"
    )
    log.warning("refused an MCP connection: %d sessions open", limit)
    with trio.move_on_after(REFUSAL_GRACE):
        async for line in _lines(stream):
            try:
                request_id = json.loads(line).get("id")
            except (ValueError, AttributeError):
                request_id = None
            error = {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": -32000, "message": reason},
            }
            await stream.send_all(json.dumps(error).encode() + b"\n")
            return


# -- socket plumbing -------------------------------------------------------------------------


def _peer_is_us(sock: trio.socket.SocketType) -> bool:
    """True if the connecting process runs as this user (Linux SO_PEERCRED).

    Where the kernel offers no peer credentials, the 0600 socket in a 0700 directory is the check.
    """
    if getattr(socket, "SO_PEERCRED", None) is None:  # pragma: no cover - not Linux
        return True
    _pid, uid, _gid = peer_credentials(sock)
    return uid == os.getuid()


# -- argument helpers --------------------------------------------------------------------------

_FRACTION = re.compile(r"(T\d\d:\d\d(?::\d\d)?)\.(\d+)")


def parse_time_ns(value: str | int, name: str) -> int:
    """A point in time as ns since the epoch, from ns ints or ISO-8601 / RFC 3339 text.

    Text without a zone is UTC. Fractions keep nanosecond precision (``datetime`` alone stops at
    microseconds). A string of digits is read as ns, like the int form.
    """
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    nanos = 0
    fraction = _FRACTION.search(text)
    if fraction:
        nanos = int(fraction.group(2)[:9].ljust(9, "0"))
        text = text[: fraction.start(2) - 1] + text[fraction.end(2) :]
    try:
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise InvalidInput(
            f"{name} must be an ISO-8601 / RFC 3339 time like 2025-03-01 or "
            f"2025-03-01T12:00:00Z, or nanoseconds since the epoch; got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int(moment.timestamp())
    return seconds * 1_000_000_000 + nanos


async def _link(
    service: ServiceAddress, from_id: str, to_id: str, edge_type: str, weight: float
) -> dict[str, Any]:
    """One link between two memories: what both ``link_memories`` and the knowledge graph's
    ``add_edge`` (its relation is the edge type) ask of the service."""
    request = _validated(
        api.LinkMemories, from_id=from_id, to_id=to_id, edge_type=edge_type, weight=weight
    )
    return await _service_call(service, request)


async def _service_call(service: ServiceAddress, request: api.AnyRequest) -> dict[str, Any]:
    """Send one (already validated) request; any refusal becomes a tool error with the reason."""
    result = await ask(service, request, TOOL_TIMEOUT)
    if isinstance(result, Err):
        raise ToolError(result.reason)
    return result.value


def _validated(build: Callable[..., R], **values: Any) -> R:
    try:
        request = build(**values)
    except InvalidInput as error:
        raise ToolError(str(error)) from None
    return request


def _explain(tool: str, error: ValidationError) -> str:
    """Pydantic's report, reworded for a model: which argument, what is wrong, no echo of data."""
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        if item["type"] == "missing":
            problems.append(f"'{where}' is required")
        elif item["type"] == "string_unicode":  # a lone UTF-16 surrogate ("\\udc00")
            problems.append(f"'{where}' is not valid text (half of a UTF-16 pair); send UTF-8")
        else:
            problems.append(f"'{where}': {item['msg']}")
    return f"invalid arguments for {tool}: " + "; ".join(problems)


class _BridgeServer(MCPServer[Any]):
    """MCPServer whose argument errors read as one clear sentence per bad argument."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> mcp_types.CallToolResult | mcp_types.InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as error:
            if isinstance(error.__cause__, ValidationError):
                raise ToolError(_explain(name, error.__cause__)) from error.__cause__
            raise


# -- the tools -------------------------------------------------------------------------------

Id = Annotated[
    str,
    Field(
        description="A memory id (64 hex characters) or a unique prefix of at "
        "least 6 characters, as returned by other tools."
    ),
]


def build_server(service: ServiceAddress) -> MCPServer[Any]:
    """The MCP server: every tool and resource, each a thin mapping onto dmgn.api requests."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    server = _BridgeServer("dmgn", version=__version__, instructions=_SERVER_INSTRUCTIONS)
    # MCPServer's constructor calls logging.basicConfig; the daemon owns logging, so undo it.
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Add memory"))
    async def add_memory(
        content: Annotated[
            str,
            Field(
                description="The memory itself: a self-contained fact, "
                "summary or passage, in plain language.",
                min_length=1,
            ),
        ],
        type: Annotated[
            MemoryType,
            Field(
                description="observation = a fact or preference; "
                "conversation = a dialogue summary; document = part "
                "of a file or page; text = anything else."
            ),
        ] = "text",
        links: Annotated[
            list[str],
            Field(
                description="Ids of existing memories this one "
                "relates to; links are created with it."
            ),
        ] = [],  # noqa: B006
        embedding: Annotated[
            list[float] | None,
            Field(
                description="Optional vector for semantic search; omit to let the node compute one."
            ),
        ] = None,
        metadata: Annotated[
            dict[str, str],
            Field(description='Optional string key/value labels, e.g. {"project": "atlas"}.'),
        ] = {},  # noqa: B006
    ) -> AddResult:
        """Store a new memory in the user's encrypted long-term memory. Returns its id."""
        request = _validated(
            api.AddMemory,
            content=content,
            type=type,
            links=tuple(links),
            metadata=dict(metadata),
            embedding=tuple(embedding) if embedding is not None else None,
        )
        out = await _service_call(service, request)
        return AddResult(
            id=out["id"],
            timestamp=out["timestamp"],
            timestamp_rfc3339=out["timestamp_rfc3339"],
            type=out["type"],
            links=list(out.get("links", [])),
        )

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Add many memories"))
    async def add_memories(
        memories: Annotated[
            list[NewMemory],
            Field(
                min_length=1,
                max_length=api.MAX_ADD_MANY,
                description="The memories, each like add_memory's arguments (content required; "
                f"type, links, metadata, embedding optional); at most {api.MAX_ADD_MANY} a call.",
            ),
        ],
    ) -> AddManyResult:
        """Store many memories in one call (importing a chat history or notes): embedded in
        batches and committed together. A memory that cannot be stored is listed in errors by
        its position; the others are stored. Returns each one's id (null where it failed)."""
        items = []
        for position, memory in enumerate(memories):
            embedding = memory.get("embedding")
            try:
                items.append(
                    api.AddMemory(
                        content=memory["content"],
                        type=memory.get("type", "text"),
                        links=tuple(memory.get("links", ())),
                        metadata=dict(memory.get("metadata", {})),
                        embedding=tuple(embedding) if embedding is not None else None,
                    )
                )
            except InvalidInput as error:  # nothing was stored: the call is all or nothing here
                raise ToolError(f"memories[{position}]: {error}") from None
        request = _validated(api.AddMemories, memories=tuple(items))
        out = await _service_call(service, request)
        return AddManyResult(
            added=out["added"],
            already_present=out["present"],
            refused_deleted=out["refused"],
            ids=list(out["ids"]),
            errors=[AddProblem(index=e["index"], error=e["error"]) for e in out["errors"]],
        )

    @server.tool(
        annotations=mcp_types.ToolAnnotations(title="Search memories", read_only_hint=True)
    )
    async def query_memory(
        query: Annotated[
            str | None,
            Field(
                description="Words to search for: names, topics, "
                "distinctive terms likely to appear in the memory."
            ),
        ] = None,
        embedding: Annotated[
            list[float] | None, Field(description="Optional query vector for semantic search.")
        ] = None,
        limit: Annotated[api.Limit, Field(description="Most results to return.")] = 10,
        include_content: Annotated[
            bool,
            Field(
                description="True to return each memory's full content instead of a short snippet."
            ),
        ] = False,
        filter_type: Annotated[
            MemoryType | None, Field(description="Only memories of this type.")
        ] = None,
        filter_after: Annotated[
            str | int | None,
            Field(
                description="Only memories created "
                "after this time: ISO-8601/RFC 3339 (2025-03-01, "
                "2025-03-01T12:00:00Z) or ns since the epoch."
            ),
        ] = None,
        filter_before: Annotated[
            str | int | None,
            Field(
                description="Only memories created before this time, same formats as filter_after."
            ),
        ] = None,
        recent: Annotated[
            bool,
            Field(
                description="True to list the most recent memories (oldest first, no score) "
                "instead of searching; query may then be omitted. The filters still apply."
            ),
        ] = False,
    ) -> QueryResult:
        """Search the user's memories by words (and optionally a vector), best matches first;
        or, with recent, list the most recent ones."""
        after, before = _time_filters(filter_after, filter_before)
        request = _validated(
            api.QueryMemories,
            text=query,
            limit=limit,
            include_content=include_content,
            embedding=tuple(embedding) if embedding is not None else None,
            types=(filter_type,) if filter_type else (),
            after=after,
            before=before,
            recent=recent,
        )
        out = await _service_call(service, request)
        hits = [_hit(item) for item in out["results"]]
        return QueryResult(results=hits, count=len(hits))

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Recent context", read_only_hint=True))
    async def get_context(
        limit: Annotated[api.Limit, Field(description="How many recent memories to return.")] = 10,
    ) -> ContextResult:
        """The most recent memories with full content, oldest first: call at the start of a
        conversation to pick up where the user left off."""
        out = await _service_call(service, api.GetContext(limit=limit))
        return ContextResult(
            memories=out["memories"],
            count=out["count"],
            context_window_hint=out["context_window_hint"],
        )

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Link memories", idempotent_hint=True))
    async def link_memories(
        from_id: Id,
        to_id: Id,
        weight: Annotated[
            api.Weight, Field(description="Strength of the relation; 1.0 is normal.")
        ] = 1.0,
        edge_type: Annotated[
            str,
            Field(
                min_length=1,
                max_length=64,
                description="Kind of relation, e.g. related, supersedes, causes, part_of.",
            ),
        ] = "related",
    ) -> LinkResult:
        """Create a directed link between two existing memories."""
        out = await _link(service, from_id, to_id, edge_type, weight)
        return LinkResult(
            from_id=out["from_id"],
            to_id=out["to_id"],
            edge_type=out["edge_type"],
            weight=out["weight"],
            created=out["created"],
        )

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Memory graph", read_only_hint=True))
    async def get_graph(
        start_id: Id,
        max_depth: Annotated[
            api.Depth, Field(description="How many link hops to follow from start_id.")
        ] = 2,
    ) -> GraphResult:
        """The memories linked to one memory (in both directions), up to max_depth hops."""
        out = await _service_call(service, api.GetGraph(start_id=start_id, max_depth=max_depth))
        return _graph(out)

    @server.tool(
        annotations=mcp_types.ToolAnnotations(title="Delete memory", destructive_hint=True)
    )
    async def delete_memory(id: Id) -> DeleteResult:
        """Permanently delete a memory on every device of the user. Only on explicit request."""
        out = await _service_call(service, api.DeleteMemory(id=id))
        return DeleteResult(id=out["id"], deleted=out["deleted"])

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Node status", read_only_hint=True))
    async def get_status() -> dict[str, Any]:
        """The memory node's status: identity, memory and link counts, peers, uptime."""
        return await _service_call(service, api.Status())

    @server.tool(
        annotations=mcp_types.ToolAnnotations(title="Load memory skill", read_only_hint=True),
        structured_output=False,
    )
    async def load_skill() -> str:
        """Instructions for using these memory tools well: what to store, how to search, how to
        link. Read once per conversation before relying on memory."""
        return SKILL_TEXT

    @server.tool(annotations=mcp_types.ToolAnnotations(title="Add graph node"))
    async def add_node(
        name: Annotated[
            str,
            Field(
                min_length=1,
                max_length=256,
                description="The entity's name, e.g. 'Ada Lovelace' or 'Project Atlas'.",
            ),
        ],
        node_type: Annotated[
            str,
            Field(
                min_length=1,
                max_length=64,
                description="The kind of entity, e.g. person, project, concept, place.",
            ),
        ] = "entity",
        description: Annotated[str, Field(description="What is known about the entity.")] = "",
        properties: Annotated[
            dict[str, str], Field(description='Extra string attributes, e.g. {"role": "lead"}.')
        ] = {},  # noqa: B006
    ) -> NodeResult:
        """Add an entity to the knowledge graph (stored as an observation memory). Returns its
        id for add_edge and query_graph."""
        reserved = sorted(set(properties) & {"kg", "name", "node_type"})
        if reserved:
            raise ToolError(f"property names {', '.join(reserved)} are reserved; rename them")
        content = f"{name} ({node_type})" + (f": {description}" if description else "")
        metadata = {**properties, "kg": "node", "name": name, "node_type": node_type}
        request = _validated(api.AddMemory, content=content, type="observation", metadata=metadata)
        out = await _service_call(service, request)
        return NodeResult(
            id=out["id"],
            name=name,
            node_type=node_type,
            timestamp=out["timestamp"],
            timestamp_rfc3339=out["timestamp_rfc3339"],
        )

    @server.tool(
        annotations=mcp_types.ToolAnnotations(title="Add graph edge", idempotent_hint=True)
    )
    async def add_edge(
        from_id: Id,
        to_id: Id,
        relation: Annotated[
            str,
            Field(
                min_length=1,
                max_length=64,
                description="A verb-like "
                "relation from from_id to to_id, e.g. works_on, "
                "depends_on, knows.",
            ),
        ],
        weight: Annotated[
            api.Weight, Field(description="Strength of the relation; 1.0 is normal.")
        ] = 1.0,
    ) -> EdgeResult:
        """Relate two knowledge-graph nodes (or any two memories) with a named relation."""
        out = await _link(service, from_id, to_id, relation, weight)
        return EdgeResult(
            from_id=out["from_id"],
            to_id=out["to_id"],
            relation=out["edge_type"],
            weight=out["weight"],
            created=out["created"],
        )

    @server.tool(
        annotations=mcp_types.ToolAnnotations(title="Explore knowledge graph", read_only_hint=True)
    )
    async def query_graph(
        node_id: Annotated[
            str | None, Field(description="Start from this node or memory id.")
        ] = None,
        query: Annotated[
            str | None,
            Field(
                description="Or start from the best match for these words (e.g. an entity's name)."
            ),
        ] = None,
        max_depth: Annotated[api.Depth, Field(description="How many hops to follow.")] = 2,
    ) -> KnowledgeGraphResult:
        """The neighbourhood of a knowledge-graph node, with each node's name and a snippet.
        Give node_id or query (not both)."""
        if (node_id is None) == (query is None):
            raise ToolError("give exactly one of node_id or query")
        start = node_id
        if query is not None:
            search = _validated(api.QueryMemories, text=query, limit=1)
            found = await _service_call(service, search)
            if not found["results"]:
                raise ToolError(f"no memory matches {query!r}; try other words or add_node first")
            start = found["results"][0]["memory_id"]
        assert start is not None
        out = await _service_call(service, api.GetGraph(start_id=start, max_depth=max_depth))
        graph = _graph(out)
        await _describe_nodes(service, graph["nodes"])
        result = KnowledgeGraphResult(
            root_id=graph["root_id"],
            nodes=graph["nodes"],
            edges=graph["edges"],
            depth=graph["depth"],
        )
        if query is not None:
            result["matched_query"] = query
        return result

    @server.resource(
        "dmgn://memory/{id}",
        name="memory",
        mime_type="application/json",
        description="One memory with its content, metadata and links, by id.",
    )
    async def memory_resource(id: str) -> str:
        return json.dumps(await _resource_call(service, api.GetMemory(id=id)))

    @server.resource(
        "dmgn://context/recent",
        name="recent-context",
        mime_type="application/json",
        description="The 20 most recent memories with content, oldest first.",
    )
    async def recent_context_resource() -> str:
        return json.dumps(await _resource_call(service, api.GetContext(limit=20)))

    @server.resource(
        "dmgn://status",
        name="status",
        mime_type="application/json",
        description="The memory node's status.",
    )
    async def status_resource() -> str:
        return json.dumps(await _resource_call(service, api.Status()))

    @server.resource(
        "dmgn://skill",
        name="skill",
        mime_type="text/markdown",
        description="How to use dmgn's memory tools well (same as load_skill).",
    )
    async def skill_resource() -> str:
        return SKILL_TEXT

    return server


def _time_filters(
    after: str | int | None, before: str | int | None
) -> tuple[int | None, int | None]:
    try:
        return (
            None if after is None else parse_time_ns(after, "filter_after"),
            None if before is None else parse_time_ns(before, "filter_before"),
        )
    except InvalidInput as error:
        raise ToolError(str(error)) from None


def _hit(item: dict[str, Any]) -> QueryHit:
    hit = QueryHit(
        memory_id=item["memory_id"],
        type=item["type"],
        timestamp=item["timestamp"],
        timestamp_rfc3339=item["timestamp_rfc3339"],
    )
    if "score" in item:
        hit["score"] = item["score"]
    if "content" in item:
        hit["content"] = item["content"]
    else:
        hit["snippet"] = item.get("snippet", "")
    return hit


def _graph(out: dict[str, Any]) -> GraphResult:
    return GraphResult(
        root_id=out["root_id"],
        nodes=[
            GraphNode(
                id=n["id"],
                type=n["type"],
                timestamp=n["timestamp"],
                timestamp_rfc3339=n["timestamp_rfc3339"],
                link_count=n["link_count"],
            )
            for n in out["nodes"]
        ],
        edges=[_graph_edge(e) for e in out["edges"]],
        depth=out["depth"],
    )


def _graph_edge(edge: dict[str, Any]) -> GraphEdge:
    out = GraphEdge(
        {"from": edge["from"], "to": edge["to"], "type": edge["type"], "weight": edge["weight"]}
    )
    if "created" in edge:
        out["created"] = edge["created"]
        out["created_rfc3339"] = edge["created_rfc3339"]
    return out


async def _describe_nodes(service: ServiceAddress, nodes: list[GraphNode]) -> None:
    """Add name/node_type (graph nodes) or a snippet (plain memories) to the first nodes."""

    async def describe(node: GraphNode) -> None:
        result = await ask(service, api.GetMemory(id=node["id"]), TOOL_TIMEOUT)
        if isinstance(result, Err):
            return  # deleted or unreadable: the node stays, undescribed
        memory = result.value
        metadata = memory.get("metadata", {})
        if metadata.get("kg") == "node":
            node["name"] = metadata.get("name", "")
            node["node_type"] = metadata.get("node_type", "")
        content = str(memory.get("content", ""))
        node["snippet"] = content if len(content) <= 200 else content[:200] + "…"

    async with trio.open_nursery() as nursery:
        for node in nodes[:MAX_DESCRIBED_NODES]:
            nursery.start_soon(describe, node)


async def _resource_call(service: ServiceAddress, request: api.AnyRequest) -> dict[str, Any]:
    result = await ask(service, request, TOOL_TIMEOUT)
    if isinstance(result, Err):
        if result.code == "not_found":
            raise ResourceNotFoundError(result.reason)
        raise ResourceError(result.reason)
    return result.value
