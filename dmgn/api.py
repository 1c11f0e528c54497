"""The node's application API: what the CLI, the control socket and MCP can ask a node.

Requests are frozen dataclasses with a strict ``from_wire`` (a dict from msgpack/JSON) so every
door into the node - the CLI in-process, the control socket, the MCP bridge - validates input the
same way. Responses are plain JSON-able dicts, so the CLI prints the same thing whether it ran the
request itself or asked a daemon.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from dmgn.errors import InvalidInput
from dmgn.memory import MAX_EMBEDDING_DIM, MEMORY_TYPES

Response = dict[str, Any]

MAX_LIMIT = 1000
MAX_DEPTH = 10
MAX_LINKS_PER_ADD = 256
MAX_QUERY_CHARS = 10_000


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """Base of every request; ``op`` names it on the wire."""

    op: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, **asdict(self)}

    def validate(self) -> None:
        """Range checks beyond types; raise :class:`InvalidInput` with a sentence."""


@dataclass(frozen=True, slots=True)
class AddMemory(ApiRequest):
    op: ClassVar[str] = "add"
    content: str
    type: str = "text"
    links: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    embedding: tuple[float, ...] | None = None
    link_type: str = "related"

    def validate(self) -> None:
        if self.type not in MEMORY_TYPES:
            raise InvalidInput(
                f"unknown memory type {self.type!r}; use one of {', '.join(MEMORY_TYPES)}"
            )
        if len(self.links) > MAX_LINKS_PER_ADD:
            raise InvalidInput(f"at most {MAX_LINKS_PER_ADD} links per memory")
        _check_embedding(self.embedding)


@dataclass(frozen=True, slots=True)
class QueryMemories(ApiRequest):
    op: ClassVar[str] = "query"
    text: str | None = None
    embedding: tuple[float, ...] | None = None
    limit: int = 10
    types: tuple[str, ...] = ()
    after: int | None = None  # ns since epoch, exclusive
    before: int | None = None  # ns since epoch, exclusive
    links_of: str | None = None
    alpha: float | None = None
    include_content: bool = False
    recent: bool = False

    def validate(self) -> None:
        _check_limit(self.limit)
        if self.text is not None and len(self.text) > MAX_QUERY_CHARS:
            raise InvalidInput(
                f"query text is {len(self.text)} characters; the limit is {MAX_QUERY_CHARS}"
            )
        if not self.recent and not (self.text and self.text.strip()) and self.embedding is None:
            raise InvalidInput("give query text, an embedding, or ask for recent memories")
        for kind in self.types:
            if kind not in MEMORY_TYPES:
                raise InvalidInput(
                    f"unknown memory type {kind!r}; use one of {', '.join(MEMORY_TYPES)}"
                )
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise InvalidInput("alpha must be between 0 (words only) and 1 (meaning only)")
        _check_embedding(self.embedding)


@dataclass(frozen=True, slots=True)
class GetMemory(ApiRequest):
    op: ClassVar[str] = "get"
    id: str


@dataclass(frozen=True, slots=True)
class DeleteMemory(ApiRequest):
    op: ClassVar[str] = "delete"
    id: str


@dataclass(frozen=True, slots=True)
class LinkMemories(ApiRequest):
    op: ClassVar[str] = "link"
    from_id: str
    to_id: str
    edge_type: str = "related"
    weight: float = 1.0

    def validate(self) -> None:
        if not self.edge_type or len(self.edge_type) > 64:
            raise InvalidInput("edge type needs 1-64 characters")
        if not math.isfinite(self.weight) or not 0.0 <= self.weight <= 1e6:
            raise InvalidInput("weight must be a finite number between 0 and 1e6")


@dataclass(frozen=True, slots=True)
class GetGraph(ApiRequest):
    op: ClassVar[str] = "graph"
    start_id: str
    max_depth: int = 2

    def validate(self) -> None:
        if not 0 <= self.max_depth <= MAX_DEPTH:
            raise InvalidInput(f"depth must be between 0 and {MAX_DEPTH}")


@dataclass(frozen=True, slots=True)
class GetContext(ApiRequest):
    op: ClassVar[str] = "context"
    limit: int = 10

    def validate(self) -> None:
        _check_limit(self.limit)


@dataclass(frozen=True, slots=True)
class Status(ApiRequest):
    op: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class Peers(ApiRequest):
    op: ClassVar[str] = "peers"


REQUEST_TYPES: dict[str, type[ApiRequest]] = {
    cls.op: cls
    for cls in (
        AddMemory,
        QueryMemories,
        GetMemory,
        DeleteMemory,
        LinkMemories,
        GetGraph,
        GetContext,
        Status,
        Peers,
    )
}


def request_from_wire(document: object) -> ApiRequest:
    """Build and validate a request from untrusted wire data."""
    if not isinstance(document, dict) or not isinstance(document.get("op"), str):
        raise InvalidInput("a request must be a map with an 'op' string")
    cls = REQUEST_TYPES.get(document["op"])
    if cls is None:
        raise InvalidInput(
            f"unknown request {document['op']!r}; known: {', '.join(sorted(REQUEST_TYPES))}"
        )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    allowed = {f.name for f in fields(cls)}
    extra = set(document) - allowed - {"op"}
    if extra:
        raise InvalidInput(f"{cls.op}: unexpected field(s) {', '.join(sorted(map(str, extra)))}")
    for f in fields(cls):
        if f.name in document:
            values[f.name] = _coerce(cls.op, f.name, document[f.name], hints[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise InvalidInput(f"{cls.op}: missing required field {f.name!r}")
    request = cls(**values)
    request.validate()
    return request


def _coerce(op: str, name: str, value: object, hint: Any) -> Any:
    """Check ``value`` against a field's type; convert lists to tuples."""
    where = f"{op}: field {name!r}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(op, name, value, inner)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidInput(f"{where} must be a string")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{where} must be true or false")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"{where} must be a whole number")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidInput(f"{where} must be a number")
        return float(value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise InvalidInput(f"{where} must be a list")
        return tuple(_coerce(op, name, v, item) for v in value)
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise InvalidInput(f"{where} must be a map of strings to strings")
        return dict(value)
    raise InvalidInput(f"{where} has an unsupported type")  # pragma: no cover


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")


def _check_embedding(embedding: tuple[float, ...] | None) -> None:
    if embedding is None:
        return
    if not 1 <= len(embedding) <= MAX_EMBEDDING_DIM:
        raise InvalidInput(f"an embedding needs 1-{MAX_EMBEDDING_DIM} numbers")
    if not all(math.isfinite(x) for x in embedding):
        raise InvalidInput("an embedding must contain finite numbers only")
