"""The federation protocol on the server side, independent of the network.

:class:`FederationService` turns request messages (bytes, see
:mod:`pl_parablock.wire.framing`) into calls on an
:class:`~pl_parablock.server.aggregator.Aggregator` and answers with
messages. The gRPC server and the in-process transport both call it, so a
one-process federation runs exactly the protocol code a networked one runs.

Every method first checks the caller's token (when the federation has one),
before it reads anything else or changes any state: :meth:`FederationService.identify`
turns the call's token into a :class:`Caller` (the gRPC server does it from
the call's metadata before it reads a message). With one token per client
(``token`` a mapping), a caller can only speak as the client its token
belongs to; with one shared token, any holder can speak as any client.

Every request is checked before it is used: its header's size before it is
parsed (:data:`~pl_parablock.wire.framing.MAX_HEADER_BYTES`, or
:data:`~pl_parablock.wire.framing.MAX_LARGE_HEADER_BYTES` for the
headers that list a model's tensors or carry a report), then each field's
type and range; a bad request is refused with one line
(:class:`~pl_parablock.server.validation.RefusedError`, code
``invalid``), never with an internal error.

Methods (message shapes):

* ``Join``: header ``{client_id, fingerprint, timeout_s}`` ->
  ``{need_state, schedule, rounds, versions, next_round, participants, instance}``
* ``UploadState``: header ``{client_id}`` + tensors -> ``{ok}``
* ``Push``: header ``{client_id, round, block, kind, base_version, weight, loss}`` + tensors ->
  ``{accepted, status, reason, retry, instance}``
* ``Pull``: ``{client_id, round | block, wait_s, instance, delta}`` -> header ``{ready, round, block, version, instance}`` + tensors
  in the parameters' own dtype; a pull for round ``r`` returns version ``r`` of its block exactly, or
  ``{ready: false, superseded: true}`` once a later round replaced that version. With ``delta: true`` and a
  lossy download codec, the answer is the round's compressed broadcast ``D`` instead: header
  ``{kind: "delta", codec, base_versions, shapes}`` + the parts of ``D``
* ``Versions``: ``{client_id}`` -> ``{versions, next_round, finished, instance}``
* ``Leave``: ``{client_id, report}`` -> ``{ok}``

An evaluator (not a client: it has no client id, and no round waits for
it) reads and leaves with ``evaluator: true``: ``Pull``
``{evaluator, after, block, wait_s}`` -> header ``{ready, after, block,
blocks, instance}`` + the block's global value after ``after`` rounds (or
after a later point: see :mod:`~pl_parablock.server.evaluator`), and
``Leave`` ``{evaluator, report}`` -> ``{ok}``. It presents a token as a
client does (any client's, with one token per client).

The gRPC names of these methods and their call kinds are
:data:`pl_parablock.wire.channel.METHODS`.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pl_parablock.core.aggregate import PIECE_ELEMS
from pl_parablock.errors import FederationError
from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.intake import Consume
from pl_parablock.server.validation import RefusedError, StreamRefused
from pl_parablock.wire.framing import (
    MAX_LARGE_HEADER_BYTES,
    CorruptStream,
    StagedTensors,
    check_specs,
    encode,
    header_bytes,
    parse_header,
    receive_pieces,
    receive_tensors,
    short,
)

__all__ = ["Caller", "FederationService"]

log = logging.getLogger(__name__)
warn = RateLimitedLog(log)

MAX_CHECKSUMS = 256
"""Versions of blocks whose checksum the service remembers for the next pulls."""
MAX_WAIT_S = 30.0
"""Longest a ``Pull`` waits for its round before it answers "not ready" (the client polls again)."""


@dataclass
class Caller:
    """Who makes a call, as its token tells (before any of its messages is read).

    Attributes:
        client: the client id the token belongs to (one token per client), or
            ``None`` (a shared token, or no authentication): any client id.
        peer: where the call comes from (for logs and per-peer limits).
        cancelled: set when the call ends early (the caller went away, or the
            server cut it); the service's waits end at once.
        deadline: ``time.monotonic()`` by which the server cuts the call; the
            service's waits end a second before.
    """

    client: int | None = None
    peer: str = "in-process"
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = math.inf

    def wait_limit(self, seconds: float) -> float:
        """``seconds``, or less so that a wait ends a second before the call's deadline."""
        return max(0.0, min(seconds, self.deadline - time.monotonic() - 1.0))


def _int(header: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise RefusedError(f"request lacks a valid `{key}` (a 64-bit integer): {short(value, 40)}", "invalid")
    return value


def _seconds(header: Mapping[str, Any], key: str, default: float, limit: float) -> float:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise RefusedError(f"request lacks a valid `{key}` (seconds >= 0): {short(value, 40)}", "invalid")
    return min(float(value), limit)


def _header(message: bytes, what: str, *, large: bool = False) -> dict[str, Any]:
    try:
        if large:
            return parse_header(message, what, max_bytes=MAX_LARGE_HEADER_BYTES)
        return parse_header(message, what)
    except FederationError as exc:
        raise RefusedError(str(exc), "invalid") from None


class FederationService:
    """Server-side handlers of the federation protocol.

    Args:
        aggregator: the global state.
        chunk_bytes: chunk size of the blocks it streams back.
        token: the federation's token (every client uses it), or a mapping
            from client id to that client's own token; ``None``: no
            authentication (trusted networks only).
        max_wait_s: longest a ``Join`` waits for the initial state, whatever
            its ``timeout_s`` asks (``federation.timeout_s``).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        chunk_bytes: int = 1 << 20,
        token: str | Mapping[int, str] | None = None,
        max_wait_s: float = 600.0,
    ) -> None:
        self.aggregator = aggregator
        self.chunk_bytes = chunk_bytes
        self.token = token
        self.max_wait_s = max_wait_s
        self.announce: dict[str, Any] = {}  # what the server adds to every join reply (its data plane's port)
        self._checksums: dict[
            tuple[bool, tuple[str, ...], int], int
        ] = {}  # (a broadcast D?, names, version) -> checksum of what a pull sends
        if isinstance(token, Mapping):
            tokens = [str(t) for t in token.values()]
            if len(set(tokens)) != len(tokens) or not all(tokens):
                raise FederationError("federation.token maps two clients to one token (or to an empty one): give each client its own")
            self._tokens = [(int(c), str(t).encode()) for c, t in token.items()]

    # ------------------------------------------------------------ identity

    @property
    def per_client_tokens(self) -> bool:
        """Whether every client has its own token (so a token names its client)."""
        return isinstance(self.token, Mapping)

    def identify(self, token: str | None, peer: str = "in-process") -> Caller:
        """The caller of a call that presents ``token``; the first check of every call.

        Raises:
            RefusedError: code ``unauthenticated``: no token, or a wrong one.
        """
        if self.token is None:
            return Caller(None, peer)
        given = str(token or "").encode()
        if isinstance(self.token, Mapping):
            client = None
            for c, expected in self._tokens:  # compare with every token, in constant time each
                if hmac.compare_digest(expected, given):
                    client = c
            if client is not None and token:
                return Caller(client, peer)
        elif token and hmac.compare_digest(str(self.token).encode(), given):
            return Caller(None, peer)
        warn.warning(peer, "refused a call from %s: missing or wrong token", peer)
        raise RefusedError(
            "missing or wrong token; give the federation's token (federation.token or the PL_PARABLOCK_TOKEN environment variable)",
            "unauthenticated",
        )

    def _authorize(self, header: Mapping[str, Any], caller: Caller) -> int:
        client = _int(header, "client_id")
        if caller.client is not None and client != caller.client:
            warn.warning(
                caller.peer, "refused a call from %s: client %s's token used to speak as client %s", caller.peer, caller.client, client
            )
            raise RefusedError(f"client {caller.client}'s token does not allow speaking as client {client}", "unauthenticated")
        return client

    def _caller(self, token: str | None, caller: Caller | None) -> Caller:
        return caller if caller is not None else self.identify(token)

    # ------------------------------------------------------------ methods

    def Join(self, request: bytes, token: str | None = None, caller: Caller | None = None) -> bytes:  # noqa: N802 - protocol method names
        caller = self._caller(token, caller)
        h = _header(request, "join", large=True)
        client = self._authorize(h, caller)
        fp = h.get("fingerprint")
        if not isinstance(fp, dict) or not {"partition", "tensors", "hash"} <= set(fp):
            raise RefusedError("join request lacks a model fingerprint", "invalid")
        timeout = caller.wait_limit(_seconds(h, "timeout_s", MAX_WAIT_S, self.max_wait_s))
        return header_bytes({**self.aggregator.join(client, fp, timeout, cancelled=caller.cancelled), **self.announce})

    def UploadState(self, messages: Iterable[bytes], token: str | None = None, caller: Caller | None = None) -> bytes:  # noqa: N802
        caller = self._caller(token, caller)
        it = iter(messages)
        h = _first(it, "initial state")
        client = self._authorize(h, caller)
        agg = self.aggregator
        try:
            specs = check_specs(h.get("tensors", []), None)
        except FederationError as exc:
            raise RefusedError(str(exc), "invalid") from None
        agg.begin_upload(client, specs)  # from the client asked for it, exactly the fingerprint's tensors (so their size)
        try:
            # read into memory, where the state is kept: no spooling to a file and reading it back
            tensors = receive_tensors(specs, it, what=f"initial state of client {client}")
            agg.set_initial_state(client, tensors)
        except CorruptStream as exc:
            raise RefusedError(str(exc), "invalid") from None
        finally:
            agg.end_upload()
        return header_bytes({"ok": True})

    def Push(self, messages: Iterable[bytes], token: str | None = None, caller: Caller | None = None) -> bytes:  # noqa: N802
        caller = self._caller(token, caller)
        it = iter(messages)
        h = _first(it, "update")
        client = self._authorize(h, caller)
        agg = self.aggregator
        reply: dict[str, Any]
        try:
            specs = check_specs(h.get("tensors", []), agg.block_nbytes(agg.expected_block(_int(h, "round"), client)))
            what = f"update of client {client}"
            if agg.streams:  # checked and summed as it arrives, one chunk held at a time

                def feed(consume: Consume, spool: Callable[[memoryview], None]) -> None:
                    receive_pieces(
                        specs,
                        it,
                        lambda i, start, values: consume(specs[i].name, start, values),
                        piece_elems=PIECE_ELEMS,
                        what=what,
                        on_chunk=spool,
                    )

                reply = agg.receive(h, specs, feed)
            else:
                early = agg.precheck(h, specs)
                if early is not None:
                    reply = early
                else:
                    staged = StagedTensors.receive(h, it, max_bytes=None, what=what)
                    reply = agg.submit(h, staged)
        except CorruptStream as exc:
            reply = {"accepted": False, "status": "corrupt", "reason": str(exc), "retry": True}
        except StreamRefused:
            raise  # the stream itself is refused (its guards): the call ends, no update was read to refuse
        except FederationError as exc:
            reply = agg.refuse({"client": client, "round": h.get("round")}, str(exc))
        return header_bytes({**reply, "instance": agg.instance})

    def Pull(self, request: bytes, token: str | None = None, caller: Caller | None = None) -> Iterator[bytes]:  # noqa: N802
        caller = self._caller(token, caller)
        h = _header(request, "pull")
        if h.get("evaluator") is True:
            yield from self._evaluator_pull(h, caller)
            return
        client = self._authorize(h, caller)
        agg = self.aggregator
        wait_s = caller.wait_limit(_seconds(h, "wait_s", MAX_WAIT_S, MAX_WAIT_S))
        instance = h.get("instance")
        if instance is not None and not isinstance(instance, str):
            raise RefusedError(f"request lacks a valid `instance` (a string): {short(instance, 40)}", "invalid")
        if instance not in (None, agg.instance):
            # the client joined another instance (this server restarted): tell it at once
            yield from encode({"ready": False, "round": h.get("round"), "block": h.get("block"), "instance": agg.instance})
            return
        if h.get("round") is not None:
            rnd = _int(h, "round")
            block = agg.expected_block(rnd, client)
            if not agg.wait_round(rnd, wait_s, cancelled=caller.cancelled):
                if agg.closed:
                    raise RefusedError("the federation server is shutting down", "unavailable")
                yield from encode({"ready": False, "round": rnd, "block": block, "instance": agg.instance})
                return
            try:
                version, tensors, bases = agg.round_answer(rnd, client, delta=h.get("delta") is True)
            except RefusedError as exc:
                if exc.code != "superseded":
                    raise
                yield from encode({"ready": False, "superseded": True, "round": rnd, "block": block, "instance": agg.instance})
                return
        else:
            rnd, bases = None, None
            block = _int(h, "block")
            version, tensors = agg.block_value(block)
        header: dict[str, Any] = {"ready": True, "round": rnd, "block": block, "version": version, "instance": agg.instance}
        if bases is not None:  # the compressed broadcast D of the round's aggregate: the client forms g + D as the server did
            assert rnd is not None
            header.update(
                kind="delta",
                codec=agg.compression.download.name,
                base_versions={str(b): v for b, v in bases.items()},
                shapes=agg.round_shapes(rnd),
            )
        # otherwise the global travels exactly, in the parameters' own dtype
        # what a pull sends for a version never changes: its checksum is computed by its first pull only, not by every client's
        key = (bases is not None, tuple(tensors), version)
        sums = self._checksums

        def remember(checksum: int) -> None:
            sums[key] = checksum
            while len(sums) > MAX_CHECKSUMS:
                sums.pop(next(iter(sums)), None)

        yield from encode(header, tensors, chunk_bytes=self.chunk_bytes, checksum=sums.get(key), on_checksum=remember, zero_copy=True)

    def _evaluator_pull(self, h: Mapping[str, Any], caller: Caller) -> Iterator[bytes]:
        """An evaluator's ``Pull``: a block of the global after ``after`` rounds, once they are aggregated."""
        agg = self.aggregator
        after, block = _int(h, "after"), _int(h, "block")
        if not 0 <= after <= agg.rounds:
            raise RefusedError(f"`after` {after} is outside 0..{agg.rounds} (rounds aggregated)", "invalid")
        wait_s = caller.wait_limit(_seconds(h, "wait_s", MAX_WAIT_S, MAX_WAIT_S))
        got = agg.evaluator.read(after, block) if after == 0 or agg.wait_round(after - 1, wait_s, cancelled=caller.cancelled) else None
        if got is None:
            if agg.closed:
                raise RefusedError("the federation server is shutting down", "unavailable")
            yield from encode({"ready": False, "after": after, "block": block, "instance": agg.instance})
            return
        point, tensors = got
        header = {"ready": True, "after": point, "block": block, "blocks": agg.evaluator.blocks(), "instance": agg.instance}
        yield from encode(header, tensors, chunk_bytes=self.chunk_bytes, zero_copy=True)

    def Versions(self, request: bytes, token: str | None = None, caller: Caller | None = None) -> bytes:  # noqa: N802
        caller = self._caller(token, caller)
        self._authorize(_header(request, "versions"), caller)
        agg = self.aggregator
        return header_bytes(
            {"versions": agg.versions(), "next_round": agg.next_round(), "finished": agg.finished, "instance": agg.instance}
        )

    def Leave(self, request: bytes, token: str | None = None, caller: Caller | None = None) -> bytes:  # noqa: N802
        caller = self._caller(token, caller)
        h = _header(request, "leave", large=True)
        evaluator = h.get("evaluator") is True
        client = None if evaluator else self._authorize(h, caller)
        report = h.get("report")
        if report is not None and not isinstance(report, dict):
            raise RefusedError("leave request's `report` is not a JSON object", "invalid")
        if client is None:
            self.aggregator.evaluator.leave(report)
        else:
            self.aggregator.leave(client, report)
        return header_bytes({"ok": True})


def _first(it: Iterator[bytes], what: str) -> dict[str, Any]:
    try:
        return _header(next(it), what, large=True)
    except StopIteration:
        raise RefusedError(f"empty {what} stream", "invalid") from None
