from __future__ import annotations

import pytest
import torch

from pl_parablock.errors import FederationError
from pl_parablock.wire.framing import CorruptStream, StagedTensors, decode, encode, parse_header


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(33, 17, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(101, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, 3, generator=g).to(torch.float16),
    }


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_round_trip_is_exact_for_any_chunk_size(chunk):
    src = tensors()
    messages = list(encode({"round": 3}, src, chunk_bytes=chunk))
    assert all(len(m) <= chunk for m in messages[1:-1])
    header, out = decode(messages)
    assert header["round"] == 3
    assert list(out) == list(src)
    for n, t in src.items():
        assert out[n].dtype == t.dtype and out[n].shape == t.shape and torch.equal(out[n], t)


def test_wire_dtype_casts_floating_tensors():
    header, out = decode(encode({}, {"w": torch.randn(10)}, dtype=torch.bfloat16))
    assert out["w"].dtype == torch.bfloat16
    assert header["nbytes"] == 20


def test_truncated_and_overlong_streams_are_refused():
    messages = list(encode({}, {"w": torch.randn(100)}, chunk_bytes=64))
    with pytest.raises(FederationError, match="cut short"):
        decode(messages[:-1])
    with pytest.raises(FederationError, match="longer"):
        decode([*messages, b"extra"])


def test_declared_size_above_the_bound_is_refused_before_reading():
    def stream():
        yield from encode({}, {"w": torch.randn(1000)})
        raise AssertionError("the body must not be read")

    with pytest.raises(FederationError, match="more than the"):
        decode(stream(), max_bytes=100)


def test_malformed_headers():
    with pytest.raises(FederationError, match="malformed"):
        decode([b"not json"])
    with pytest.raises(FederationError, match="empty"):
        decode([])
    bad = b'{"tensors": [{"name": "w", "dtype": "float32", "shape": [4], "nbytes": 3}]}'
    with pytest.raises(FederationError, match="do not match"):
        decode([bad])


def test_a_flipped_byte_is_caught_by_the_checksum():
    messages = list(encode({}, {"w": torch.randn(100)}, chunk_bytes=64))
    messages[2] = bytes([messages[2][0] ^ 1]) + messages[2][1:]
    with pytest.raises(CorruptStream, match="checksum"):
        decode(messages)


def test_staged_tensors_spool_to_a_file_and_read_back_repeatedly():
    src = tensors()
    it = iter(encode({"round": 1}, src, chunk_bytes=50))
    header = parse_header(next(it))
    with StagedTensors.receive(header, it, max_bytes=None, what="test") as staged:
        assert staged.nbytes == sum(t.numel() * t.element_size() for t in src.values())
        for _ in range(2):
            got = dict(staged)
            assert all(torch.equal(got[n], t) for n, t in src.items())
    with pytest.raises(Exception, match="closed"):
        list(staged)


def test_staging_refuses_a_bad_stream_and_keeps_nothing():
    messages = list(encode({}, {"w": torch.randn(1000)}, chunk_bytes=512))
    it = iter(messages[:-2])
    header = parse_header(next(it))
    with pytest.raises(CorruptStream, match="cut short"):
        StagedTensors.receive(header, it, max_bytes=None, what="update")
    it = iter(messages)
    header = parse_header(next(it))
    with pytest.raises(FederationError, match="more than"):
        StagedTensors.receive(header, it, max_bytes=100, what="update")


def test_staged_tensors_read_back_in_pieces_and_by_range():
    src = {"a": torch.randn(1000), "empty": torch.zeros(0), "m": torch.randn(7, 9).to(torch.bfloat16), "flag": torch.tensor([True, False])}
    it = iter(encode({"round": 1}, src, chunk_bytes=64))
    header = parse_header(next(it))
    with StagedTensors.receive(header, it, max_bytes=None, what="test") as staged:
        pieces = [(n, s, p.clone()) for n, s, p in staged.pieces(300)]  # a piece is valid until the next one is read
        assert [(n, s, p.numel()) for n, s, p in pieces] == [
            ("a", 0, 300),
            ("a", 300, 300),
            ("a", 600, 300),
            ("a", 900, 100),
            ("m", 0, 63),
            ("flag", 0, 2),
        ]
        for name, t in src.items():
            got = torch.cat([p for n, _, p in pieces if n == name]) if t.numel() else torch.zeros(0)
            assert torch.equal(got, t.reshape(-1)), name
        assert torch.equal(staged.read("a", 123, 45), src["a"][123:168])
        with pytest.raises(ValueError, match="outside"):
            staged.read("a", 990, 20)
    in_memory = StagedTensors.from_tensors(src)
    assert torch.equal(in_memory.read("m", 5, 10), src["m"].reshape(-1)[5:15])


def test_headers_are_bounded_before_they_are_parsed_and_checked_after():
    from pl_parablock.wire.framing import MAX_HEADER_BYTES, header_bytes

    ok = header_bytes({"client_id": 0, "pad": "x" * 100})
    assert parse_header(ok) == {"client_id": 0, "pad": "x" * 100}
    too_big = header_bytes({"pad": "x" * MAX_HEADER_BYTES})
    with pytest.raises(FederationError, match="more than the 65536 allowed"):
        parse_header(too_big)
    assert parse_header(too_big, max_bytes=None)["pad"]
    for raw, why in (
        (b'{"a": NaN}', "not a number JSON allows"),
        (b'{"a": -Infinity}', "not a number JSON allows"),
        (b'{"a": 1e400}', "out of range"),
        (b'{"a": ' + b"9" * 5000 + b"}", "malformed"),
        (b'{"a": ' + b"[" * 33 + b"]" * 33 + b"}", "nested more than 32 deep"),
        (b'{"a": ' + b"[" * 30000 + b"]" * 30000 + b"}", "nested more than 32 deep"),
        (b"\xff", "malformed"),
        (b"[]", "not a JSON object"),
    ):
        with pytest.raises(FederationError, match=why) as err:
            parse_header(raw, max_bytes=None)
        assert "\n" not in str(err.value) and len(str(err.value)) < 300
    assert parse_header(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}")


def test_a_non_finite_float_travels_as_null():
    from pl_parablock.wire.framing import header_bytes

    assert parse_header(header_bytes({"loss": float("nan"), "r": {"x": [float("inf"), 1.5]}})) == {"loss": None, "r": {"x": [None, 1.5]}}
