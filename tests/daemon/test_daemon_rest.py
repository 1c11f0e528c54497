"""The REST API of a real `dmgn-node` process, driven with a real HTTP client (httpx).

One daemon per test module (starting one costs a second or two); each test uses its own
memories. The daemon listens on loopback only, mDNS off, like every daemon test.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.rest import MAX_BODY_BYTES
from tests.daemon.test_daemon_process import MCP_INITIALIZE, Node
from wire.testing import free_port

pytestmark = pytest.mark.slow

WRONG = "dmgn_" + "A" * 43


class Rest:
    def __init__(self, node: Node, url: str) -> None:
        self.node = node
        self.url = url
        self.token = node.json("token", "show")["token"]
        self.http = httpx.Client(base_url=url, timeout=30)

    def call(self, method: str, path: str, token: str | None = "", **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return self.http.request(method, path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def rest() -> Iterator[Rest]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))
    node = Node(root / "data")
    node.run("init")
    config = node.root / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False, api_port=free_port())
    config.write_text(json.dumps(document))
    try:
        facts = node.json("start")
        node.pids.add(int(facts["pid"]))
        (url,) = facts["api_urls"]
        client = Rest(node, url)
        yield client
        client.http.close()
    finally:
        node.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def add(rest: Rest, content: str, **fields: Any) -> str:
    response = rest.call("POST", "/v1/memories", json={"content": content, **fields})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_init_made_a_private_token_and_rotation_takes_effect_without_restart(rest: Rest) -> None:
    path = rest.node.root / "api.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rest.call("GET", "/v1/status").status_code == 200
    old = rest.token
    rotated = rest.node.json("token", "rotate")
    assert rotated["rotated"] is True and rotated["token"] != old
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rest.call("GET", "/v1/status", token=old).status_code == 401
    rest.token = rotated["token"]
    assert rest.call("GET", "/v1/status").status_code == 200
    assert rest.node.json("token", "show")["token"] == rest.token


def test_every_endpoint_with_a_good_token(rest: Rest) -> None:
    first = add(rest, "the heron stood in the reeds", metadata={"place": "marsh"})
    second = add(rest, "a heron caught a fish", links=[first])
    got = rest.call("GET", f"/v1/memories/{first}").json()
    assert got["content"] == "the heron stood in the reeds" and got["metadata"] == {
        "place": "marsh"
    }
    assert rest.call("GET", f"/v1/memories/{first[:12]}").json()["id"] == first
    links = rest.call("GET", f"/v1/memories/{first}/links").json()["links"]
    assert [(link["from"], link["to"]) for link in links] == [(second, first)]
    made = rest.call("POST", "/v1/links", json={"from_id": first, "to_id": second, "weight": 0.5})
    assert made.status_code == 201 and made.json()["created"] is True

    found = rest.call("POST", "/v1/query", json={"text": "heron fish", "limit": 5})
    assert found.status_code == 200
    body = found.json()
    assert body["results"][0]["id"] == second
    assert body["partial"] is False and body["devices"][0]["device_id"] == "local"
    vector = add(rest, "an egret in flight", embedding=[0.0] * 7 + [1.0])
    filtered = rest.call(
        "POST",
        "/v1/query",
        json={"embedding": [0.1] * 7 + [1.0], "alpha": 1.0, "types": ["text"], "limit": 1},
    )
    assert filtered.status_code == 200, filtered.text
    assert [r["id"] for r in filtered.json()["results"]] == [vector]
    wrong_size = rest.call("POST", "/v1/query", json={"embedding": [1.0] * 3})
    assert wrong_size.status_code == 400 and wrong_size.json()["code"] == "invalid_request"
    none = rest.call("POST", "/v1/query", json={"text": "heron", "types": ["document"]}).json()
    assert none["count"] == 0

    recent = rest.call("GET", "/v1/recent", params={"limit": 3, "include_content": "true"}).json()
    assert [r["id"] for r in recent["results"]] == [first, second, vector]
    assert recent["results"][1]["content"] == "a heron caught a fish"
    graph = rest.call("GET", f"/v1/graph/{first}", params={"depth": 1}).json()
    assert {n["id"] for n in graph["nodes"]} == {first, second}
    context = rest.call("GET", "/v1/context", params={"limit": 1}).json()
    assert context["count"] == 1
    status = rest.call("GET", "/v1/status").json()
    assert status["memories"] >= 2 and status["api_urls"] == [rest.url]
    peers = rest.call("GET", "/v1/peers").json()
    assert peers["peers"] == [] and set(peers) == set(rest.node.json("peers"))

    deleted = rest.call("DELETE", f"/v1/memories/{second}")
    assert deleted.json() == {"id": second, "deleted": True}
    gone = rest.call("GET", f"/v1/memories/{second}")
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"


ENDPOINTS = [
    ("POST", "/v1/memories", {"content": "x"}),
    ("GET", "/v1/memories/abcdef", None),
    ("DELETE", "/v1/memories/abcdef", None),
    ("GET", "/v1/memories/abcdef/links", None),
    ("POST", "/v1/links", {"from_id": "abcdef", "to_id": "abcdee"}),
    ("POST", "/v1/query", {"text": "x"}),
    ("GET", "/v1/recent", None),
    ("GET", "/v1/graph/abcdef", None),
    ("GET", "/v1/context", None),
    ("GET", "/v1/status", None),
    ("GET", "/v1/peers", None),
    ("GET", "/v1/no-such-endpoint", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_no_token_and_a_wrong_token_get_the_same_401(
    rest: Rest, method: str, path: str, body: Any
) -> None:
    answers = [
        rest.call(method, path, token=None, json=body),
        rest.call(method, path, token=WRONG, json=body),
        rest.call(method, path, token=rest.token[:-1], json=body),
        rest.call(method, path, token=None, json=body, headers={"Authorization": "Basic eDp4"}),
    ]
    for answer in answers:
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json() == {"error": "missing or invalid bearer token", "code": "unauthorized"}
    assert len({a.content for a in answers}) == 1


BODY_ENDPOINTS = ["/v1/memories", "/v1/links", "/v1/query"]


@pytest.mark.parametrize("path", BODY_ENDPOINTS)
def test_oversized_bodies_get_413_declared_or_streamed(rest: Rest, path: str) -> None:
    big = b'{"content": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}'
    declared = rest.call("POST", path, content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while reading
        for start in range(0, len(big), 256 * 1024):
            yield big[start : start + 256 * 1024]

    streamed = rest.call("POST", path, content=chunks())
    assert streamed.status_code == 413 and streamed.json()["code"] == "payload_too_large"
    assert rest.call("GET", "/v1/status").status_code == 200


@pytest.mark.parametrize("path", BODY_ENDPOINTS)
@pytest.mark.parametrize("body", [b"{not json", b"", b'{"content": NaN}', b"\xff\xfe"])
def test_malformed_json_gets_400(rest: Rest, path: str, body: bytes) -> None:
    answer = rest.call("POST", path, content=body)
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_json"
    assert "not valid JSON" in answer.json()["error"]


def test_invalid_requests_get_the_cli_codes(rest: Rest) -> None:
    cases = [
        ("POST", "/v1/memories", {"content": "x", "type": "poem"}, 400, "invalid_input"),
        ("POST", "/v1/memories", {"content": "x", "surprise": 1}, 400, "invalid_input"),
        ("POST", "/v1/memories", ["not", "an", "object"], 400, "invalid_input"),
        ("POST", "/v1/query", {"text": "x", "recent": True}, 400, "invalid_input"),
        ("POST", "/v1/query", {"text": "x", "alpha": 2}, 400, "invalid_input"),
        ("POST", "/v1/query", {}, 400, "invalid_input"),
        ("GET", "/v1/memories/" + "f" * 64, None, 404, "not_found"),
        ("PUT", "/v1/memories", None, 405, "method_not_allowed"),
        ("GET", "/v1/nothing", None, 404, "not_found"),
    ]
    for method, path, body, status, code in cases:
        answer = rest.call(method, path, json=body)
        assert (answer.status_code, answer.json()["code"]) == (status, code), (path, body)
        assert answer.json()["error"]
    bad = rest.call("GET", "/v1/recent", params={"limit": "ten"})
    assert bad.status_code == 400 and "whole number" in bad.json()["error"]
    # The same sentence and code the CLI reports for the same mistake.
    cli = rest.node.run("query", "x", "--limit", "5000", "--json", ok=False)
    rest_answer = rest.call("POST", "/v1/query", json={"text": "x", "limit": 5000}).json()
    assert json.loads(cli.stderr) == rest_answer
    missing = "f" * 64
    cli = rest.node.run("get", missing, "--json", ok=False)
    assert json.loads(cli.stderr) == rest.call("GET", f"/v1/memories/{missing}").json()


def test_openapi_document_lists_every_endpoint(rest: Rest) -> None:
    answer = rest.http.get("/openapi.json")  # no token needed: it holds no data
    assert answer.status_code == 200
    document = answer.json()
    assert document["openapi"].startswith("3.")
    operations = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    expected = {(m, p.replace("abcdef", "{id}")) for m, p, _ in ENDPOINTS[:-1]}
    assert operations == expected
    add_body = document["paths"]["/v1/memories"]["post"]["requestBody"]
    schema = add_body["content"]["application/json"]["schema"]
    assert schema["required"] == ["content"] and "embedding" in schema["properties"]


def test_a_memory_added_over_rest_is_visible_over_the_cli_and_mcp(rest: Rest) -> None:
    memory_id = add(rest, "the kingfisher flashed blue over the canal")
    assert rest.node.json("get", memory_id)["content"].startswith("the kingfisher")
    found = rest.node.json("query", "kingfisher")
    assert found["results"][0]["id"] == memory_id
    messages = [
        MCP_INITIALIZE,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "query_memory", "arguments": {"query": "kingfisher"}},
        },
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "dmgn.app.cli", "mcp"],
        env=rest.node.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        for message in messages:
            process.stdin.write(json.dumps(message) + "\n")
        process.stdin.flush()
        answer: dict[str, Any] = {}
        for line in process.stdout:
            reply = json.loads(line)
            if reply.get("id") == 2:
                answer = reply
                break
    finally:
        process.stdin.close()
        process.wait(timeout=30)
    hits = answer["result"]["structuredContent"]["results"]
    assert hits[0]["memory_id"] == memory_id


def test_the_rest_api_is_off_unless_api_port_is_set() -> None:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))
    node = Node(root / "data")
    try:
        node.run("init")
        config = node.root / "config.json"
        document = json.loads(config.read_text())
        document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
        config.write_text(json.dumps(document))
        facts = node.json("start")
        node.pids.add(int(facts["pid"]))
        assert facts["api_urls"] == []
        assert node.json("status")["api_urls"] == []
    finally:
        node.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    assert not os.path.exists(root)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/memories", {"content": "x", "metadata": {"k": "\udc00"}}, "metadata.k"),
        ("/v1/memories", {"content": "x", "metadata": {"\udc00": "v"}}, "metadata"),
        ("/v1/memories", {"content": "x", "type": "text", "link_type": "\udc00"}, "link_type"),
        ("/v1/query", {"text": "heron \ud800"}, "text"),
        ("/v1/links", {"from_id": "\udc00", "to_id": "ab" * 32}, "from_id"),
        (
            "/v1/links",
            {"from_id": "ab" * 32, "to_id": "cd" * 32, "edge_type": "\udc00"},
            "edge_type",
        ),
    ],
)
def test_text_that_is_not_utf8_gets_400_naming_the_field_and_the_node_stays_up(
    rest: Rest, path: str, body: dict[str, Any], field: str
) -> None:
    # json.dumps escapes the lone surrogate as \udc00: valid JSON, not valid text. Ten of them
    # (the supervisor gives up on an actor after six crashes a minute) leave the node serving.
    raw = json.dumps(body).encode()
    for _ in range(10):
        refused = rest.call("POST", path, content=raw, headers={"content-type": "application/json"})
        assert refused.status_code == 400, refused.text
        answer = refused.json()
        assert answer["code"] == "invalid_input" and f"'{field}" in answer["error"], answer
        assert "not valid text" in answer["error"]
    assert rest.call("GET", "/v1/status").status_code == 200
    assert add(rest, "still taking memories", metadata={"k": "v"})
