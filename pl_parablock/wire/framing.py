"""How blocks travel: a JSON header message, raw tensor bytes in chunks, a trailer.

A stream is a sequence of byte messages:

1. a UTF-8 JSON header with the request fields and, when tensors follow,
   their names, dtypes, shapes and byte counts (``tensors``) and the total
   (``nbytes``);
2. the tensors' bytes, packed and cut into chunks of at most ``chunk_bytes``,
   so a block of any size goes through gRPC's per-message limit;
3. a JSON trailer ``{"xxh3_64": N}``: a 64-bit checksum (XXH3) of all the body bytes.

The receiver knows the exact byte count from the header: a declared size
above its bound is refused before anything is read or allocated, a longer or
shorter body is refused, and a body whose checksum differs from the trailer is
refused as corrupt. :func:`encode` takes each chunk's bytes with one copy from
views over the tensors' storage and computes the checksum once over the same
views. :func:`decode` reads a stream into memory (clients;
:func:`receive_tensors` its body, the server for the initial state);
:func:`receive_pieces` hands a stream's elements to a consumer chunk by chunk
as they arrive (the server checks and sums an update that way, holding one
chunk per stream); :class:`StagedTensors` spools a stream to an unnamed
temporary file and reads it back in pieces of a bounded number of elements
(the server, for what it must keep whole: clipped updates, robust
aggregation).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch
import xxhash
from torch import Tensor

from pl_parablock.errors import FederationError

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "MAX_LARGE_HEADER_BYTES",
    "MAX_REPLY_HEADER_BYTES",
    "WIRE_DTYPES",
    "CorruptStream",
    "Spec",
    "StagedTensors",
    "decode",
    "encode",
    "header_bytes",
    "parse_header",
    "receive_pieces",
    "receive_tensors",
    "tensor_specs",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}

with warnings.catch_warnings():
    # torch warns once per process that a tensor over a read-only buffer (a received message) could be
    # written through; :func:`receive_pieces` only reads those views, so the warning is spent here, silently
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)
WIRE_DTYPES: dict[str, torch.dtype] = {name: DTYPES[name] for name in ("float32", "bfloat16", "float16")}
"""The wire dtypes (``federation.wire_dtype``): what a block's floating tensors may be cast to for the
trip. :data:`DTYPES` is every dtype a tensor may travel in, as it is."""


class CorruptStream(FederationError):  # noqa: N818 - reads as what happened to the stream
    """A stream whose bytes do not match its header or its checksum (a transport fault: retry)."""


@dataclass(frozen=True)
class Spec:
    """One tensor of a stream, as its header declares it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: what a message quotes of a peer's input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FederationError(f"tensors of dtype {dtype} cannot travel; use one of {', '.join(DTYPES)}") from None


MAX_HEADER_BYTES = 64 << 10
"""Largest header of a small request (``Pull``, ``Versions``) and of a trailer, in bytes."""
MAX_LARGE_HEADER_BYTES = 4 << 20
"""Largest header that may list every tensor of a model (``Join``, ``UploadState``, ``Push``) or carry a
client's report (``Leave``), in bytes: about 20,000 tensor entries."""
MAX_REPLY_HEADER_BYTES = 64 << 20
"""Largest header a client accepts from its server (a join reply lists every round's clients)."""
MAX_HEADER_DEPTH = 32
"""Deepest nesting of lists and objects a header may have."""


def _finite_floats(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_floats(v) for v in value]
    return value


def header_bytes(header: Mapping[str, Any]) -> bytes:
    """``header`` as compact UTF-8 JSON; a NaN or infinite float (a diverged loss) travels as ``null``."""
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite_floats(header), separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than ``limit`` in ``value`` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children: Iterable[Any] = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_header(
    message: bytes, what: str = "message", *, max_bytes: int | None = MAX_HEADER_BYTES, max_depth: int = MAX_HEADER_DEPTH
) -> dict[str, Any]:
    """A JSON object header, checked before and after it is parsed.

    The size is checked before anything is parsed; NaN, infinite or
    out-of-range numbers and nesting deeper than ``max_depth`` are refused.

    Raises:
        FederationError: one line naming what is wrong with the header.
    """
    if max_bytes is not None and len(message) > max_bytes:
        raise FederationError(f"malformed {what} header: {len(message)} bytes, more than the {max_bytes} allowed")
    try:
        header = json.loads(bytes(message).decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise FederationError(f"malformed {what} header: nested more than {max_depth} deep") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError, as are refused numbers
        raise FederationError(f"malformed {what} header: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FederationError(f"malformed {what} header: not a JSON object")
    if _depth_exceeds(header, max_depth):
        raise FederationError(f"malformed {what} header: nested more than {max_depth} deep")
    return header


def tensor_specs(tensors: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": t.numel() * t.element_size()}
        for n, t in tensors.items()
    ]


def _as_bytes(t: Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def encode(
    header: Mapping[str, Any],
    tensors: Mapping[str, Tensor] | None = None,
    *,
    chunk_bytes: int = 1 << 20,
    dtype: torch.dtype | None = None,
    checksum: int | None = None,
    on_checksum: Callable[[int], None] | None = None,
    zero_copy: bool = False,
) -> Iterator[bytes]:
    """Yield the header message, the tensors' bytes in chunks, then the trailer.

    Each chunk is one copy of the tensors' bytes, taken from views over their
    storage; the checksum is computed once over the same views as they go
    (XXH3, 64 bits: several times faster than CRC32, which was most of the
    framing's cost). With ``zero_copy`` a chunk that lies within one tensor
    is that view itself (a ``memoryview``, valid while the tensor is; no
    copy), for a carrier that sends from memory (the data plane); one that
    needs ``bytes`` copies it as it sends.

    Args:
        header: JSON-serialisable request fields.
        tensors: tensors to send, in order; cast to ``dtype`` when given.
        chunk_bytes: largest chunk.
        dtype: wire dtype for floating tensors (e.g. ``torch.bfloat16``).
        checksum: the body's checksum, when known (the same tensors sent
            before, see ``on_checksum``): not computed again.
        on_checksum: called with the body's checksum once the last chunk went.
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    tensors = dict(tensors or {})
    if dtype is not None:
        tensors = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
    specs = tensor_specs(tensors)
    yield header_bytes({**header, "tensors": specs, "nbytes": sum(s["nbytes"] for s in specs)})
    hasher = xxhash.xxh3_64() if checksum is None else None
    parts: list[memoryview] = []  # views over the tensors' storage that make up the next chunk
    filled = 0
    for t in tensors.values():
        if t.numel() == 0:
            continue
        mv = _as_bytes(t)
        off = 0
        while off < len(mv):
            take = min(chunk_bytes - filled, len(mv) - off)
            part = mv[off : off + take]
            if hasher is not None:
                hasher.update(part)  # once over every byte, from the tensors' storage, as the chunks go
            parts.append(part)
            filled += take
            off += take
            if filled == chunk_bytes:
                # at most one copy a message (gRPC sends bytes objects): straight from the tensors' storage
                # (a memoryview serves every reader of messages as bytes do: len, the buffer protocol)
                yield (parts[0] if zero_copy else parts[0].tobytes()) if len(parts) == 1 else b"".join(parts)  # type: ignore[misc]
                parts, filled = [], 0
    if parts:
        yield (parts[0] if zero_copy else parts[0].tobytes()) if len(parts) == 1 else b"".join(parts)  # type: ignore[misc]
    if hasher is not None:
        checksum = hasher.intdigest()
        if on_checksum is not None:
            on_checksum(checksum)
    yield header_bytes({"xxh3_64": checksum})


def check_specs(raw: Any, max_bytes: int | None) -> list[Spec]:
    """The tensor entries of a header, checked for consistency and against ``max_bytes``.

    Raises:
        FederationError: malformed entries, or a total above ``max_bytes``.
    """
    if not isinstance(raw, list):
        raise FederationError("malformed stream header: `tensors` is not a list")
    out = []
    total = 0
    for s in raw:
        try:
            name, dt, shape, nbytes = str(s["name"]), DTYPES[s["dtype"]], tuple(int(d) for d in s["shape"]), int(s["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise FederationError(f"malformed tensor entry in stream header: {short(s)}") from None
        itemsize = torch.empty((), dtype=dt).element_size()
        if any(d < 0 for d in shape) or nbytes != math.prod(shape) * itemsize:
            raise FederationError(
                f"tensor {short(name)}: declared {short(nbytes)} bytes do not match shape {short(list(shape))} of {s['dtype']}"
            )
        total += nbytes
        out.append(Spec(name, dt, shape, nbytes))
    if max_bytes is not None and total > max_bytes:
        raise FederationError(f"stream declares {total} bytes, more than the {max_bytes} allowed")
    return out


def _body(messages: Iterator[bytes], total: int, what: str) -> Iterator[memoryview]:
    """Yield the body's chunks, then check the trailer's checksum and that nothing follows."""
    hasher = xxhash.xxh3_64()
    filled = 0
    while filled < total:
        try:
            chunk = next(messages)
        except StopIteration:
            raise CorruptStream(f"{what} was cut short after {filled} of {total} bytes") from None
        mv = memoryview(chunk).cast("B")
        if filled + len(mv) > total:
            raise CorruptStream(f"{what} is longer than its header declares")
        hasher.update(mv)
        filled += len(mv)
        yield mv
    try:
        trailer = parse_header(next(messages), f"{what} trailer")
    except StopIteration:
        raise CorruptStream(f"{what} was cut short: no trailer") from None
    except FederationError as exc:
        raise CorruptStream(f"{what} is longer than its header declares ({exc})") from None
    checksum = hasher.intdigest()
    if trailer.get("xxh3_64") != checksum:
        raise CorruptStream(f"{what} is corrupt: checksum {checksum} differs from the sender's {short(trailer.get('xxh3_64'), 40)}")
    for _ in messages:
        raise CorruptStream(f"{what} is longer than its header declares")


def _first(messages: Iterable[bytes], what: str) -> tuple[dict[str, Any], Iterator[bytes]]:
    it = iter(messages)
    try:
        first = next(it)
    except StopIteration:
        raise FederationError(f"empty {what}: no header") from None
    return parse_header(first, what, max_bytes=MAX_REPLY_HEADER_BYTES), it


def decode(messages: Iterable[bytes], *, max_bytes: int | None = None, what: str = "stream") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a header and its tensors from a message stream into memory.

    Raises:
        FederationError: malformed header or a size above ``max_bytes``;
            :class:`CorruptStream` for a body that does not match.
    """
    header, it = _first(messages, what)
    specs = check_specs(header.get("tensors", []), max_bytes)
    return header, receive_tensors(specs, it, what=what)


def receive_tensors(specs: list[Spec], rest: Iterator[bytes], *, what: str) -> dict[str, Tensor]:
    """Read the body that follows a header (already read, its ``specs`` checked) into memory.

    Each tensor is a new buffer, allocated when its first bytes arrive: the
    memory taken grows with the bytes received, not with what the header
    declares. The tensors are returned only once the trailer's checksum
    matched.

    Raises:
        CorruptStream: the body is shorter or longer than the specs, or its
            checksum differs from the trailer's.
    """
    total = sum(s.nbytes for s in specs)
    buffers: list[Tensor | None] = [None] * len(specs)
    view: Any = None  # the numpy view of the buffer being filled
    idx, filled = -1, 0  # the tensor being read (none yet) and its bytes read so far
    for mv in _body(rest, total, what):
        off = 0
        while off < len(mv):
            while idx < 0 or specs[idx].nbytes == filled:
                idx, filled = idx + 1, 0
                if specs[idx].nbytes:
                    buffers[idx] = buf = torch.empty(specs[idx].nbytes, dtype=torch.uint8)
                    view = buf.numpy()
            take = min(specs[idx].nbytes - filled, len(mv) - off)
            view[filled : filled + take] = mv[off : off + take]
            filled += take
            off += take
    out = {}
    for s, b in zip(specs, buffers):
        out[s.name] = (b if b is not None else torch.empty(s.nbytes, dtype=torch.uint8)).view(s.dtype).reshape(s.shape)
    return out


Consumer = Callable[[int, int, Tensor], None]
"""``consume(spec_index, start, values)``: elements ``start .. start + len(values)`` of a stream's tensor, as they arrive."""


def receive_pieces(
    specs: list[Spec],
    rest: Iterator[bytes],
    consume: Consumer,
    *,
    piece_elems: int,
    what: str,
    on_chunk: Callable[[memoryview], None] | None = None,
) -> None:
    """Hand a stream's body to ``consume`` as its chunks arrive, never holding more than one chunk.

    ``consume(i, start, values)`` gets a flat tensor of ``specs[i].dtype``
    over elements ``start .. start + values.numel()`` of tensor ``i``: a view
    of the chunk's bytes (read-only: never write through it) that is valid
    only during the call. Pieces are cut where a chunk ends and at multiples
    of ``piece_elems``, so none crosses a piece boundary; an element split
    between two chunks is reassembled and handed on alone. ``on_chunk``
    sees every body chunk before its pieces are consumed (to spool it).

    The trailer's checksum is checked after the last piece was consumed, so a
    consumer must be ready to undo what it did when this raises.

    Raises:
        CorruptStream: the body is shorter or longer than the specs, or its
            checksum differs from the trailer's.
    """
    total = sum(s.nbytes for s in specs)
    idx, filled = 0, 0  # the tensor being read and its bytes read so far
    carry = bytearray()  # the first bytes of an element split between chunks
    for mv in _body(rest, total, what):
        if on_chunk is not None:
            on_chunk(mv)
        off = 0
        while off < len(mv):
            while specs[idx].nbytes == filled:
                idx, filled = idx + 1, 0
            spec = specs[idx]
            size = spec.dtype.itemsize
            if carry or len(mv) - off < size:
                take = min(size - len(carry), len(mv) - off)
                carry += mv[off : off + take]
                off += take
                if len(carry) == size:
                    consume(idx, filled // size, torch.frombuffer(bytearray(carry), dtype=spec.dtype))
                    filled += size
                    carry.clear()
                continue
            start = filled // size
            count = min((len(mv) - off) // size, (spec.nbytes - filled) // size, piece_elems - start % piece_elems)
            consume(idx, start, torch.frombuffer(mv, dtype=spec.dtype, count=count, offset=off))
            off += count * size
            filled += count * size


class StagedTensors:
    """A stream's tensors spooled to an unnamed temporary file as they arrive.

    Iterating yields ``(name, tensor)`` pairs read back from the file one at
    a time; it can be repeated (e.g. once to validate, once to aggregate).
    Call :meth:`close` (or use ``with``) to drop the file.
    """

    def __init__(self, specs: list[Spec], file: IO[bytes] | None = None, memory: Mapping[str, Tensor] | None = None) -> None:
        self.specs = specs
        self._file = file
        self._memory = dict(memory) if memory is not None else None
        self._offsets: dict[str, tuple[Spec, int]] = {}
        at = 0
        for spec in specs:
            self._offsets[spec.name] = (spec, at)
            at += spec.nbytes

    @classmethod
    def receive(cls, header: Mapping[str, Any], rest: Iterator[bytes], *, max_bytes: int | None, what: str) -> StagedTensors:
        """Spool the body that follows ``header`` (already read from the stream)."""
        specs = check_specs(header.get("tensors", []), max_bytes)
        total = sum(s.nbytes for s in specs)
        file = tempfile.TemporaryFile(prefix="pl_parablock-")
        try:
            for mv in _body(rest, total, what):
                file.write(mv)
        except BaseException:
            file.close()
            raise
        return cls(specs, file)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> StagedTensors:
        """Stage in-memory tensors (tests, in-process callers)."""
        return cls(check_specs(tensor_specs(tensors), None), memory=tensors)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        if self._memory is not None:
            yield from self._memory.items()
            return
        for s in self.specs:
            yield s.name, self.read(s.name, 0, math.prod(s.shape)).reshape(s.shape)

    def read(self, name: str, start: int, count: int, out: Tensor | None = None) -> Tensor:
        """Elements ``start .. start + count`` of tensor ``name``, flattened.

        A view of the tensor when staged in memory; otherwise read from the
        file into ``out`` (a uint8 buffer of at least the piece's bytes,
        reused by the caller) or into a fresh tensor.
        """
        spec, at = self._offsets[name]
        numel = math.prod(spec.shape)
        if start < 0 or count < 0 or start + count > numel:
            raise ValueError(f"elements {start}..{start + count} are outside {name!r} ({numel} elements)")
        if self._memory is not None:
            return self._memory[name].detach().reshape(-1)[start : start + count]
        if self._file is None:
            raise FederationError("staged tensors were closed")
        itemsize = spec.dtype.itemsize
        nbytes = count * itemsize
        buf = out[:nbytes] if out is not None and out.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
        self._file.seek(at + start * itemsize)
        if count and self._file.readinto(buf.numpy()) != nbytes:  # type: ignore[attr-defined]
            raise FederationError(f"staged tensor {name!r} could not be read back")
        return buf.view(spec.dtype)

    def pieces(self, elems: int) -> Iterator[tuple[str, int, Tensor]]:
        """``(name, start, flat piece)`` of every tensor in order, at most ``elems`` elements each.

        Reading a block this way holds one piece in memory at a time, however
        large its tensors are: a piece read from the file lives in one buffer
        that the next piece overwrites, so use (or copy) each piece before
        asking for the next.
        """
        largest = max((min(elems, math.prod(s.shape)) * s.dtype.itemsize for s in self.specs), default=0)
        buffer = torch.empty(largest, dtype=torch.uint8) if self._memory is None else None
        for spec in self.specs:
            numel = math.prod(spec.shape)
            for start in range(0, numel, elems):
                yield spec.name, start, self.read(spec.name, start, min(elems, numel - start), out=buffer)

    def close(self) -> None:
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StagedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
