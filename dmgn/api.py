"""The node's application API: what the CLI, the control socket, MCP (and REST) can ask a node.

Each request is one pydantic model, declared once here: its fields, their types and their ranges
are the schema every door into the node validates against - the CLI in-process, the control
socket, the MCP bridge (whose tool parameters reuse the constrained types below). Construction
validates: a bad field raises :class:`InvalidInput` with one sentence naming the request and the
field, never a pydantic traceback. Responses are plain JSON-able dicts, so the CLI prints the
same thing whether it ran the request itself or asked a daemon.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dmgn.errors import InvalidInput
from dmgn.memory import MAX_EMBEDDING_DIM, MEMORY_TYPES, check_content, not_text

Response = dict[str, Any]


def rfc3339(ns: int) -> str:
    """Nanoseconds since the epoch as RFC 3339 in UTC, every digit kept
    (``2026-12-01T13:01:43.123456789Z``). Every response that has a time in ns has this string
    beside it: ns values (~1.8e18) are above 2**53, so JavaScript clients round them."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


MAX_LIMIT = 1000
MAX_DEPTH = 10
MAX_LINKS_PER_ADD = 256
MAX_QUERY_CHARS = 10_000
#: Memories per bulk add request (``add_many``): enough for the embedder to batch, few enough
#: that one request answers in seconds (the control socket gives a request 60 s).
MAX_ADD_MANY = 512


def _text(value: str) -> str:
    """Refuse strings that are not UTF-8 text (lone surrogates, which JSON can carry as
    ``\\udc00`` escapes): msgpack refuses them inside an actor, far from the request. A pydantic
    error of its own type, so :func:`explain` names the field."""
    problem = not_text(value)
    if problem is not None:
        raise PydanticCustomError("not_text", problem)
    return value


#: Field types shared by the requests and the MCP tools' parameters. Strict: a number is not a
#: string, ``true`` is not 1; lists are accepted where a tuple is declared (msgpack and JSON have
#: no tuples). Every string is :data:`Text` (or checks the same way): UTF-8 text, nothing else.
Text = Annotated[str, Strict(), AfterValidator(_text)]
Flag = Annotated[bool, Strict()]
WholeNumber = Annotated[int, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
MemoryType = Literal["text", "conversation", "observation", "document"]
Limit = Annotated[int, Strict(), Field(ge=1, le=MAX_LIMIT)]
Depth = Annotated[int, Strict(), Field(ge=0, le=MAX_DEPTH)]
EdgeType = Annotated[str, Strict(), Field(min_length=1, max_length=64), AfterValidator(_text)]
Weight = Annotated[float, Strict(), Field(ge=0.0, le=1e6, allow_inf_nan=False)]
Alpha = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Embedding = Annotated[tuple[Number, ...], Field(min_length=1, max_length=MAX_EMBEDDING_DIM)]
Metadata = dict[Text, Text]
#: A memory's content: the same check (and sentence) on every path, raised as InvalidInput
#: itself rather than as a pydantic error, so no path rewords it (dmgn.memory.check_content).
Content = Annotated[str, Strict(), AfterValidator(check_content)]

assert set(MemoryType.__args__) == set(MEMORY_TYPES)  # type: ignore[attr-defined]


class ApiRequest(BaseModel):
    """Base of every request; ``op`` names it on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    op: ClassVar[str] = ""
    #: Seconds a door (control socket, in-process CLI) waits for the answer; ``None``: its
    #: default (a minute). Only requests whose work grows with the store set a longer one.
    deadline: ClassVar[float | None] = None

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as error:
            raise InvalidInput(explain(self.op, error)) from None

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, **self.model_dump()}


class AddMemory(ApiRequest):
    op: ClassVar[str] = "add"
    content: Content
    type: MemoryType = "text"
    links: Annotated[tuple[Text, ...], Field(max_length=MAX_LINKS_PER_ADD)] = ()
    metadata: Metadata = Field(default_factory=dict)
    embedding: Embedding | None = None
    link_type: EdgeType = "related"


class AddMemories(ApiRequest):
    """Many memories at once (a chat history, an export): sealed one by one, stored in one
    transaction, embedded in batches. A memory the node refuses (a link to nothing) is
    reported by its position and the others go in; content that is not a memory at all (too
    large, not text: ``check_content``) is refused when the request is built, naming the item."""

    op: ClassVar[str] = "add_many"
    memories: Annotated[tuple[AddMemory, ...], Field(min_length=1, max_length=MAX_ADD_MANY)]


class QueryMemories(ApiRequest):
    op: ClassVar[str] = "query"
    text: Annotated[Text, Field(max_length=MAX_QUERY_CHARS)] | None = None
    embedding: Embedding | None = None
    limit: Limit = 10
    types: tuple[MemoryType, ...] = ()
    after: WholeNumber | None = None  # ns since epoch, exclusive
    before: WholeNumber | None = None  # ns since epoch, exclusive
    links_of: Text | None = None
    alpha: Alpha | None = None
    include_content: Flag = False
    recent: Flag = False

    @model_validator(mode="after")
    def _something_to_look_for(self) -> QueryMemories:
        if (
            not self.recent
            and not (self.text and self.text.strip())
            and self.embedding is None
            and self.links_of is None
        ):
            raise ValueError(
                "give query text, an embedding, a memory to list the links of, or ask for "
                "recent memories"
            )
        return self


class GetMemory(ApiRequest):
    op: ClassVar[str] = "get"
    id: Text


class DeleteMemory(ApiRequest):
    op: ClassVar[str] = "delete"
    id: Text


class LinkMemories(ApiRequest):
    op: ClassVar[str] = "link"
    from_id: Text
    to_id: Text
    edge_type: EdgeType = "related"
    weight: Weight = 1.0


class GetGraph(ApiRequest):
    op: ClassVar[str] = "graph"
    start_id: Text
    max_depth: Depth = 2


class GetContext(ApiRequest):
    op: ClassVar[str] = "context"
    limit: Limit = 10


class Status(ApiRequest):
    op: ClassVar[str] = "status"


class Peers(ApiRequest):
    op: ClassVar[str] = "peers"


class Backup(ApiRequest):
    """Write an encrypted archive of the store to ``path`` (absolute; must not exist), from a
    consistent snapshot taken while the node keeps serving. Local admin only: not on MCP."""

    op: ClassVar[str] = "backup"
    #: A backup streams the whole store: ~4 s per 10k memories here, so an hour covers
    #: millions.
    deadline: ClassVar[float | None] = 3600.0
    path: Annotated[Text, Field(min_length=1, max_length=4096)]

    @model_validator(mode="after")
    def _absolute(self) -> Backup:
        # The daemon writes the file, and its working directory is not the caller's.
        if not self.path.startswith("/"):
            raise ValueError("the backup path must be absolute")
        return self


class Retention(ApiRequest):
    """Apply the retention policy (config ``retention``) now: delete expired memories, as
    tombstones that sync; ``dry_run`` only lists what would go."""

    op: ClassVar[str] = "retention"
    #: Up to 10,000 deletes (each a commit and a feed op) in one run.
    deadline: ClassVar[float | None] = 900.0
    dry_run: Flag = True


#: Every request the service serves; its handler matches on this union, so mypy checks that
#: each one is handled.
AnyRequest = (
    AddMemory
    | AddMemories
    | QueryMemories
    | GetMemory
    | DeleteMemory
    | LinkMemories
    | GetGraph
    | GetContext
    | Status
    | Peers
    | Backup
    | Retention
)

REQUEST_TYPES: dict[str, type[AnyRequest]] = {
    cls.op: cls
    for cls in (
        AddMemory,
        AddMemories,
        QueryMemories,
        GetMemory,
        DeleteMemory,
        LinkMemories,
        GetGraph,
        GetContext,
        Status,
        Peers,
        Backup,
        Retention,
    )
}


def request_from_wire(document: object) -> AnyRequest:
    """Build and validate a request from untrusted wire data (msgpack or JSON)."""
    if not isinstance(document, dict) or not isinstance(document.get("op"), str):
        raise InvalidInput("a request must be a map with an 'op' string")
    cls = REQUEST_TYPES.get(document["op"])
    if cls is None:
        raise InvalidInput(
            f"unknown request {document['op']!r}; known: {', '.join(sorted(REQUEST_TYPES))}"
        )
    fields = {k: v for k, v in document.items() if k != "op"}
    if not all(isinstance(k, str) for k in fields):
        raise InvalidInput(f"{cls.op}: field names must be strings")
    return cls(**fields)


#: How pydantic's error types read in our messages ("add: field 'content' must be a string").
_PLAIN = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a map of strings to strings",
    "missing": "is required",
    "extra_forbidden": "is not a field of this request",
    "literal_error": "must be one of: " + ", ".join(MEMORY_TYPES),
}


_NOT_UNICODE = (
    "is not valid text: it holds half of a UTF-16 pair (bytes that were not UTF-8?); "
    "give the text in UTF-8"
)


def explain(op: str, error: ValidationError) -> str:
    """One sentence for the first problem pydantic found (the rest follow from fixing it)."""
    first = error.errors()[0]
    kind = str(first["type"])
    loc = [str(part) for part in first["loc"]]
    if loc[-1:] == ["[key]"]:  # the key itself is in the location: name the map instead
        loc = [*loc[:-2], "(a key)"]
    where = ".".join(loc)
    if kind == "not_text":
        return f"{op}: field {where!r} {first['msg']}"
    if kind == "string_unicode":  # pydantic's own check of a length-constrained string
        return f"{op}: field {where!r} {_NOT_UNICODE}"
    if kind == "value_error":  # our own model checks: their message is the sentence
        return f"{op}: {str(first['msg']).removeprefix('Value error, ')}"
    ctx = first.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"{op}: field {where!r} must be at least {ctx.get('ge')} (got {first['input']!r})"
    if kind == "less_than_equal":
        return f"{op}: field {where!r} must be at most {ctx.get('le')} (got {first['input']!r})"
    if kind in ("too_long", "too_short") and where == "embedding":
        return f"{op}: an embedding needs 1-{MAX_EMBEDDING_DIM} numbers"
    if kind in ("too_long", "too_short"):
        return f"{op}: field {where!r} {str(first['msg']).lower().removeprefix('value ')}"
    plain = _PLAIN.get(kind)
    if plain is None:
        plain = str(first["msg"]).lower()
    if kind == "literal_error" and "expected" in ctx:
        plain = f"must be one of: {ctx['expected']}"
    return f"{op}: field {where!r} {plain}"
