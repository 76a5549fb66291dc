"""The federation protocol on the server side, independent of the network.

:class:`FederationService` turns request messages (bytes, see
:mod:`pl_parablock.federation.wire`) into calls on an
:class:`~pl_parablock.federation.aggregator.Aggregator` and answers with
messages. The gRPC server and the in-process transport both call it, so a
one-process federation runs exactly the protocol code a networked one runs.

Every method first checks the caller's token (when the federation has one),
before it reads anything else or changes any state.

Methods (message shapes):

* ``Join``: header ``{client_id, fingerprint, timeout_s}`` ->
  ``{need_state, schedule, rounds, versions, next_round, participants, instance}``
* ``UploadState``: header ``{client_id}`` + tensors -> ``{ok}``
* ``Push``: header ``{client_id, round, block, kind, base_version, weight, loss}`` + tensors ->
  ``{accepted, status, reason, retry, instance}``
* ``Pull``: ``{client_id, round | block, wait_s, instance}`` -> header ``{ready, round, block, version, instance}`` + tensors
  in the parameters' own dtype; a pull for round ``r`` returns version ``r`` of its block exactly, or
  ``{ready: false, superseded: true}`` once a later round replaced that version
* ``Versions``: ``{client_id}`` -> ``{versions, next_round, finished, instance}``
* ``Leave``: ``{client_id, report}`` -> ``{ok}``

The gRPC names of these methods and their call kinds are
:data:`pl_parablock.federation.channel.METHODS`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pl_parablock.errors import FederationError
from pl_parablock.federation.aggregator import Aggregator, RefusedError
from pl_parablock.federation.wire import CorruptStream, StagedTensors, check_specs, encode, header_bytes, parse_header

__all__ = ["FederationService"]

log = logging.getLogger(__name__)

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
        token: the federation's token (every client uses it), or a mapping
            from client id to that client's own token; ``None``: no
            authentication (trusted networks only).
    """

    def __init__(self, aggregator: Aggregator, *, chunk_bytes: int = 1 << 20, token: str | Mapping[int, str] | None = None) -> None:
        self.aggregator = aggregator
        self.chunk_bytes = chunk_bytes
        self.token = token

    def _authorize(self, header: dict[str, Any], token: str | None) -> int:
        client = _int(header, "client_id")
        if self.token is None:
            return client
        expected = self.token if isinstance(self.token, str) else self.token.get(client)
        if expected is None or token is None or not hmac.compare_digest(str(expected).encode(), str(token).encode()):
            log.warning("refused a request for client %s: missing or wrong token", client)
            raise RefusedError(
                f"client {client}: missing or wrong token; give the federation's token "
                "(federation.token or the PL_PARABLOCK_TOKEN environment variable)",
                "unauthenticated",
            )
        return client

    def Join(self, request: bytes, token: str | None = None) -> bytes:  # noqa: N802 - protocol method names
        h = parse_header(request, "join")
        client = self._authorize(h, token)
        fp = h.get("fingerprint")
        if not isinstance(fp, dict) or not {"partition", "tensors", "hash"} <= set(fp):
            raise RefusedError("join request lacks a model fingerprint", "invalid")
        timeout = min(float(h.get("timeout_s", MAX_WAIT_S)), 3600.0)
        return header_bytes(self.aggregator.join(client, fp, timeout))

    def UploadState(self, messages: Iterable[bytes], token: str | None = None) -> bytes:  # noqa: N802
        it = iter(messages)
        h = _first(it, "initial state")
        client = self._authorize(h, token)
        staged = StagedTensors.receive(h, it, max_bytes=self.aggregator.state_nbytes(), what=f"initial state of client {client}")
        with staged:
            self.aggregator.set_initial_state(client, staged)
        return header_bytes({"ok": True})

    def Push(self, messages: Iterable[bytes], token: str | None = None) -> bytes:  # noqa: N802
        it = iter(messages)
        h = _first(it, "update")
        client = self._authorize(h, token)
        agg = self.aggregator
        reply: dict[str, Any]
        try:
            specs = check_specs(h.get("tensors", []), agg.block_nbytes(agg.expected_block(_int(h, "round"))))
            early = agg.precheck(h, specs)
            if early is not None:
                reply = early
            else:
                staged = StagedTensors.receive(h, it, max_bytes=None, what=f"update of client {client}")
                reply = agg.submit(h, staged)
        except CorruptStream as exc:
            reply = {"accepted": False, "status": "corrupt", "reason": str(exc), "retry": True}
        except FederationError as exc:
            reply = agg.refuse({"client": client, "round": h.get("round")}, str(exc))
        return header_bytes({**reply, "instance": agg.instance})

    def Pull(self, request: bytes, token: str | None = None) -> Iterator[bytes]:  # noqa: N802
        h = parse_header(request, "pull")
        client = self._authorize(h, token)
        agg = self.aggregator
        wait_s = max(0.0, min(float(h.get("wait_s", MAX_WAIT_S)), MAX_WAIT_S))
        if h.get("instance") not in (None, agg.instance):
            # the client joined another instance (this server restarted): tell it at once
            yield from encode({"ready": False, "round": h.get("round"), "block": h.get("block"), "instance": agg.instance})
            return
        if h.get("round") is not None:
            rnd = _int(h, "round")
            block = agg.expected_block(rnd)
            if not agg.wait_round(rnd, wait_s):
                if agg.closed:
                    raise RefusedError("the federation server is shutting down", "unavailable")
                yield from encode({"ready": False, "round": rnd, "block": block, "instance": agg.instance})
                return
            try:
                version, tensors = agg.round_value(rnd, client)
            except RefusedError as exc:
                if exc.code != "superseded":
                    raise
                yield from encode({"ready": False, "superseded": True, "round": rnd, "block": block, "instance": agg.instance})
                return
        else:
            rnd = None
            block = _int(h, "block")
            version, tensors = agg.block_value(block)
        # the global travels exactly, in the parameters' own dtype, whatever the uploads' wire dtype
        header = {"ready": True, "round": rnd, "block": block, "version": version, "instance": agg.instance}
        yield from encode(header, tensors, chunk_bytes=self.chunk_bytes)

    def Versions(self, request: bytes, token: str | None = None) -> bytes:  # noqa: N802
        self._authorize(parse_header(request, "versions"), token)
        agg = self.aggregator
        return header_bytes(
            {"versions": agg.versions(), "next_round": agg.next_round(), "finished": agg.finished, "instance": agg.instance}
        )

    def Leave(self, request: bytes, token: str | None = None) -> bytes:  # noqa: N802
        h = parse_header(request, "leave")
        client = self._authorize(h, token)
        report = h.get("report")
        self.aggregator.leave(client, report if isinstance(report, dict) else None)
        return header_bytes({"ok": True})


def _first(it: Iterator[bytes], what: str) -> dict[str, Any]:
    try:
        return parse_header(next(it), what)
    except StopIteration:
        raise RefusedError(f"empty {what} stream", "invalid") from None
