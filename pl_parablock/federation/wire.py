"""How blocks travel: a JSON header message, then raw tensor bytes in chunks.

A stream is a sequence of byte messages. The first is a UTF-8 JSON header
that carries the request fields and, when tensors follow, their names, dtypes
and shapes. The tensors' bytes follow, packed and cut into chunks of at most
``chunk_bytes``, so a block of any size goes through gRPC's per-message limit.
The receiver knows the exact byte count from the header: a longer stream or a
shorter one is refused before it is used, and a declared size above the
receiver's bound is refused before anything is allocated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from pl_parablock.errors import FederationError

__all__ = ["DTYPES", "decode", "encode", "header_bytes", "parse_header", "tensor_specs"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FederationError(f"tensors of dtype {dtype} cannot travel; use one of {', '.join(DTYPES)}") from None


def header_bytes(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def parse_header(message: bytes, what: str = "message") -> dict[str, Any]:
    try:
        header = json.loads(message.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FederationError(f"malformed {what} header: {exc}") from None
    if not isinstance(header, dict):
        raise FederationError(f"malformed {what} header: not a JSON object")
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
) -> Iterator[bytes]:
    """Yield the header message, then the tensors' bytes in chunks.

    Args:
        header: JSON-serialisable request fields.
        tensors: tensors to send, in order; cast to ``dtype`` when given.
        chunk_bytes: largest chunk.
        dtype: wire dtype for floating tensors (e.g. ``torch.bfloat16``).
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    tensors = dict(tensors or {})
    if dtype is not None:
        tensors = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
    specs = tensor_specs(tensors)
    yield header_bytes({**header, "tensors": specs, "nbytes": sum(s["nbytes"] for s in specs)})
    buf = bytearray()
    for t in tensors.values():
        if t.numel() == 0:
            continue
        mv = _as_bytes(t)
        off = 0
        while off < len(mv):
            if not buf and len(mv) - off >= chunk_bytes:
                yield mv[off : off + chunk_bytes].tobytes()
                off += chunk_bytes
                continue
            take = min(chunk_bytes - len(buf), len(mv) - off)
            buf += mv[off : off + take]
            off += take
            if len(buf) == chunk_bytes:
                yield bytes(buf)
                buf = bytearray()
    if buf:
        yield bytes(buf)


def _check_specs(specs: Any, max_bytes: int | None) -> list[tuple[str, torch.dtype, list[int], int]]:
    if not isinstance(specs, list):
        raise FederationError("malformed stream header: `tensors` is not a list")
    out = []
    total = 0
    for s in specs:
        try:
            name, dt, shape, nbytes = str(s["name"]), DTYPES[s["dtype"]], [int(d) for d in s["shape"]], int(s["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise FederationError(f"malformed tensor entry in stream header: {s!r}") from None
        itemsize = torch.empty((), dtype=dt).element_size()
        if any(d < 0 for d in shape) or nbytes != math.prod(shape) * itemsize:
            raise FederationError(f"tensor {name!r}: declared {nbytes} bytes do not match shape {shape} of {s['dtype']}")
        total += nbytes
        out.append((name, dt, shape, nbytes))
    if max_bytes is not None and total > max_bytes:
        raise FederationError(f"stream declares {total} bytes, more than the {max_bytes} allowed")
    return out


def decode(messages: Iterable[bytes], *, max_bytes: int | None = None, what: str = "stream") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a header and its tensors from a message stream.

    Raises:
        FederationError: malformed header, size above ``max_bytes``, or a
            stream longer or shorter than its header declares.
    """
    it = iter(messages)
    try:
        first = next(it)
    except StopIteration:
        raise FederationError(f"empty {what}: no header") from None
    header = parse_header(first, what)
    specs = _check_specs(header.get("tensors", []), max_bytes)
    tensors: dict[str, Tensor] = {}
    idx = 0
    cur: Tensor | None = None
    cur_np: Any = None
    filled = 0

    def _start() -> None:
        nonlocal cur, cur_np, filled
        while idx < len(specs) and specs[idx][3] == 0:
            name, dt, shape, _ = specs[idx]
            tensors[name] = torch.empty(shape, dtype=dt)
            _advance()
        if idx < len(specs):
            cur = torch.empty(specs[idx][3], dtype=torch.uint8)
            cur_np = cur.numpy()
            filled = 0

    def _advance() -> None:
        nonlocal idx
        idx += 1

    _start()
    for chunk in it:
        mv = memoryview(chunk).cast("B")
        off = 0
        while off < len(mv):
            if cur is None or idx >= len(specs):
                raise FederationError(f"{what} is longer than its header declares")
            name, dt, shape, nbytes = specs[idx]
            take = min(nbytes - filled, len(mv) - off)
            cur_np[filled : filled + take] = mv[off : off + take]
            filled += take
            off += take
            if filled == nbytes:
                tensors[name] = cur.view(dt).reshape(shape)
                cur = None
                _advance()
                _start()
    if idx < len(specs):
        raise FederationError(f"{what} was cut short: tensor {specs[idx][0]!r} incomplete")
    return header, tensors
