"""The federation protocol on the server side, independent of the network.

:class:`FederationService` turns request messages (bytes, see
:mod:`pl_parablock.federation.wire`) into calls on an
:class:`~pl_parablock.federation.aggregator.Aggregator` and answers with
messages. The gRPC server and the in-process transport both call it, so a
one-process federation runs exactly the protocol code a networked one runs.

Methods (message shapes):

* ``Join``: header ``{client_id, fingerprint, timeout_s}`` -> ``{need_state, schedule, rounds, versions, mode}``
* ``UploadState``: header ``{client_id}`` + tensors -> ``{ok}``
* ``Push``: header ``{client_id, round, block, kind, base_version, weight, loss}`` + tensors -> ``{accepted, reason}``
* ``Pull``: ``{client_id, round | block, wait_s, wire_dtype}`` -> header ``{ready, round, block, version}`` + tensors
* ``Versions``: ``{client_id}`` -> ``{versions, finished}``
* ``Leave``: ``{client_id, report}`` -> ``{ok}``
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from pl_parablock.federation.aggregator import Aggregator, RefusedError
from pl_parablock.federation.wire import DTYPES, decode, encode, header_bytes, parse_header

__all__ = ["METHODS", "SERVICE_NAME", "FederationService"]

log = logging.getLogger(__name__)

SERVICE_NAME = "pl_parablock.Federation"
METHODS = {
    "Join": "unary",
    "UploadState": "stream_unary",
    "Push": "stream_unary",
    "Pull": "unary_stream",
    "Versions": "unary",
    "Leave": "unary",
}
MAX_WAIT_S = 30.0


def _int(header: dict[str, Any], key: str) -> int:
    try:
        return int(header[key])
    except (KeyError, TypeError, ValueError):
        raise RefusedError(f"request lacks a valid `{key}`", "invalid") from None


class FederationService:
    """Server-side handlers of the federation protocol.

    Args:
        aggregator: the global state.
        chunk_bytes: chunk size of the blocks it streams back.
    """

    def __init__(self, aggregator: Aggregator, *, chunk_bytes: int = 1 << 20) -> None:
        self.aggregator = aggregator
        self.chunk_bytes = chunk_bytes

    def Join(self, request: bytes) -> bytes:  # noqa: N802 - protocol method names
        h = parse_header(request, "join")
        fp = h.get("fingerprint")
        if not isinstance(fp, dict) or not {"partition", "tensors", "hash"} <= set(fp):
            raise RefusedError("join request lacks a model fingerprint", "invalid")
        timeout = min(float(h.get("timeout_s", MAX_WAIT_S)), 3600.0)
        reply = self.aggregator.join(_int(h, "client_id"), fp, timeout)
        return header_bytes(reply)

    def UploadState(self, messages: Iterable[bytes]) -> bytes:  # noqa: N802
        limit = self.aggregator.state_nbytes()
        header, tensors = decode(messages, max_bytes=limit, what="initial state")
        self.aggregator.set_initial_state(_int(header, "client_id"), tensors)
        return header_bytes({"ok": True})

    def Push(self, messages: Iterable[bytes]) -> bytes:  # noqa: N802
        it = iter(messages)
        try:
            first = next(it)
        except StopIteration:
            raise RefusedError("empty update stream", "invalid") from None
        h = parse_header(first, "update")
        block = self.aggregator.expected_block(_int(h, "round"))
        limit = self.aggregator.block_nbytes(block)

        def _all() -> Iterator[bytes]:
            yield first
            yield from it

        header, tensors = decode(_all(), max_bytes=limit, what=f"update of client {h.get('client_id')}")
        accepted, reason = self.aggregator.submit(header, tensors)
        return header_bytes({"accepted": accepted, "reason": reason})

    def Pull(self, request: bytes) -> Iterator[bytes]:  # noqa: N802
        h = parse_header(request, "pull")
        wait_s = max(0.0, min(float(h.get("wait_s", MAX_WAIT_S)), MAX_WAIT_S))
        wire = h.get("wire_dtype")
        dtype = DTYPES.get(wire) if wire else None
        if "round" in h and h["round"] is not None:
            rnd = _int(h, "round")
            block = self.aggregator.expected_block(rnd)
            if not self.aggregator.wait_round(rnd, wait_s):
                if self.aggregator.closed:
                    raise RefusedError("the federation server is shutting down", "unavailable")
                yield header_bytes({"ready": False, "round": rnd, "block": block})
                return
        else:
            rnd = None
            block = _int(h, "block")
        version, tensors = self.aggregator.block_value(block)
        yield from encode(
            {"ready": True, "round": rnd, "block": block, "version": version}, tensors, chunk_bytes=self.chunk_bytes, dtype=dtype
        )

    def Versions(self, request: bytes) -> bytes:  # noqa: N802
        return header_bytes({"versions": self.aggregator.versions(), "finished": self.aggregator.finished})

    def Leave(self, request: bytes) -> bytes:  # noqa: N802
        h = parse_header(request, "leave")
        report = h.get("report")
        self.aggregator.leave(_int(h, "client_id"), report if isinstance(report, dict) else None)
        return header_bytes({"ok": True})
