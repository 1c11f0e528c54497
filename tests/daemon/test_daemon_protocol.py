"""The control protocol as bytes in, events out: no sockets."""

from __future__ import annotations

import struct

import msgpack
import pytest

from dmgn import api
from dmgn.control_protocol import (
    MAX_FRAME_BYTES,
    OP_PING,
    BadRequest,
    ControlProtocolError,
    FrameDecoder,
    decode_request,
    decode_response,
    encode_error,
    encode_ok,
    encode_request,
)
from dmgn.errors import NotFound


def payload_of(frame: bytes) -> bytes:
    (payload,) = FrameDecoder().receive_data(frame)
    return payload


def test_frames_split_across_reads_and_several_in_one_read_are_reassembled() -> None:
    frames = b"".join(encode_request(i, api.Status()) for i in range(3))
    decoder = FrameDecoder()
    got = [p for byte in frames for p in decoder.receive_data(bytes([byte]))]
    assert [decode_request(p).id for p in got] == [0, 1, 2]
    assert FrameDecoder().receive_data(frames) == got
    assert decoder.buffered == 0


def test_oversized_frame_breaks_the_stream_for_good() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ControlProtocolError, match="frames must be"):
        decoder.receive_data(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(ControlProtocolError):
        decoder.receive_data(encode_request(1, api.Status()))


def test_zero_length_frame_is_a_protocol_error() -> None:
    with pytest.raises(ControlProtocolError):
        FrameDecoder().receive_data(b"\0\0\0\0")


def test_api_request_round_trips_with_validation() -> None:
    request = api.AddMemory(content="hi", metadata={"k": "v"}, links=("abc",))
    decoded = decode_request(payload_of(encode_request(7, request)))
    assert decoded.id == 7 and decoded.request == request and decoded.control is None


def test_control_op_is_recognised() -> None:
    decoded = decode_request(payload_of(encode_request(3, OP_PING)))
    assert decoded.control == OP_PING and decoded.request is None


@pytest.mark.parametrize(
    ("document", "request_id", "code"),
    [
        ({"v": 1, "id": 5, "req": {"op": "nope"}}, 5, "invalid_input"),
        ({"v": 2, "id": 6, "req": {"op": "status"}}, 6, "unsupported_version"),
        ({"v": 1, "id": 7, "req": {"op": "add"}}, 7, "invalid_input"),
        (
            {"v": 1, "id": 8, "req": {"op": "query", "limit": "ten", "recent": True}},
            8,
            "invalid_input",
        ),
        ({"v": 1, "id": 9, "req": {"op": "status"}, "extra": 1}, 9, "bad_request"),
        ({"v": 1, "req": {"op": "status"}}, None, "bad_request"),
        ([1, 2, 3], None, "bad_request"),
    ],
)
def test_bad_requests_are_reported_with_their_id(
    document: object, request_id: int | None, code: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_request(msgpack.packb(document))
    assert caught.value.request_id == request_id
    assert caught.value.code == code


def test_garbage_payload_is_a_bad_request_not_a_crash() -> None:
    with pytest.raises(BadRequest, match="not valid msgpack"):
        decode_request(b"\xc1\xc1\xc1")


def test_error_response_becomes_the_typed_error() -> None:
    request_id, error = decode_response(payload_of(encode_error(4, "not_found", "no memory x")))
    assert request_id == 4
    assert isinstance(error, NotFound) and str(error) == "no memory x"


def test_response_too_large_for_a_frame_becomes_an_error() -> None:
    request_id, error = decode_response(payload_of(encode_ok(2, {"blob": "x" * MAX_FRAME_BYTES})))
    assert request_id == 2
    assert isinstance(error, Exception) and "limit" in str(error)
