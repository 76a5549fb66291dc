"""Guards of the server's calls, whatever carries them: who calls (auth), how many at once (limits), whose turn to upload (turns).

Every carrier (:mod:`~pl_parablock.server.carriers`) hands its calls to the
same handlers of :class:`~pl_parablock.server.grpc_server.FederationServer`,
which use these guards before they read a request:

* **Auth**: :func:`token_of` reads the bearer token of a call's metadata
  (the service checks it, :meth:`~pl_parablock.server.service.FederationService.identify`);
  :func:`peer_host` names the caller's host for per-peer limits.
* **Limits**: :class:`CallGuard` admits at most ``per_peer`` calls of one peer
  at once and runs the watchdog that cuts a call whose peer sent nothing for
  ``idle_timeout_s`` while the server waits for its next message
  (:func:`reading`), or that runs past ``call_timeout_s``.
* **Turns**: :class:`UploadTurns` lets at most ``limit`` uploads be read at
  once (one per client id with per-client tokens), the others waiting their
  turn unread; an ``Admit`` call reserves a turn for :data:`ADMIT_LEASE_S`.

A call's context is a ``grpc.ServicerContext`` or anything with the same
methods (the data plane's), so the guards know no carrier.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.server.service import Caller
from pl_parablock.server.validation import RefusedError
from pl_parablock.wire.channel import bearer_token

__all__ = ["ADMIT_LEASE_S", "Call", "CallGuard", "UploadTurns", "metadata_of", "one_message", "peer_host", "reading", "token_of"]

log = logging.getLogger(__name__)
warn = RateLimitedLog(log)


def token_of(context: grpc.ServicerContext) -> str | None:
    """The bearer token of a call's metadata, if any."""
    return bearer_token(context.invocation_metadata())


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:10.0.0.5:4321`` -> ``ipv4:10.0.0.5``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer[:200]


class Call:
    """One call the server admitted: who, since when, until when, and whether it waits for the peer."""

    __slots__ = ("caller", "context", "deadline", "key", "method", "reading_since")

    def __init__(self, method: str, key: str, caller: Caller, context: grpc.ServicerContext, deadline: float) -> None:
        self.method = method
        self.key = key
        self.caller = caller
        self.context = context
        self.deadline = deadline
        self.reading_since: float | None = None


class CallGuard:
    """Admission per peer and the watchdog that cuts idle and overdue calls."""

    def __init__(self, *, per_peer: int, idle_timeout_s: float, call_timeout_s: float, on_cut: Callable[[], None]) -> None:
        self.per_peer = per_peer
        self.idle_timeout_s = idle_timeout_s
        self.call_timeout_s = call_timeout_s
        self._on_cut = on_cut
        self._lock = threading.Lock()
        self._calls: set[Call] = set()
        self._per_key: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pl_parablock-server-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def admit(self, method: str, key: str, caller: Caller, context: grpc.ServicerContext) -> Call:
        with self._lock:
            if self._per_key.get(key, 0) >= self.per_peer:
                warn.warning(key, "refused a %s call from %s: it already has %d calls running", method, key, self.per_peer)
                raise RefusedError(f"too many calls at once from {key} (at most {self.per_peer}); retry later", "exhausted")
            call = Call(method, key, caller, context, time.monotonic() + self.call_timeout_s)
            caller.deadline = call.deadline
            self._calls.add(call)
            self._per_key[key] = self._per_key.get(key, 0) + 1
        return call

    def release(self, call: Call) -> None:
        with self._lock:
            if call in self._calls:
                self._calls.discard(call)
                left = self._per_key.get(call.key, 1) - 1
                if left:
                    self._per_key[call.key] = left
                else:
                    self._per_key.pop(call.key, None)

    def active(self) -> int:
        with self._lock:
            return len(self._calls)

    def methods(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for call in self._calls:
                counts[call.method] = counts.get(call.method, 0) + 1
            return counts

    def _watch(self) -> None:
        tick = max(0.05, min(0.5, self.idle_timeout_s / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                reading = call.reading_since
                if reading is not None and now - reading > self.idle_timeout_s:
                    self._cut(call, f"sent nothing for {self.idle_timeout_s:g} s (federation.idle_timeout_s)")
                elif now > call.deadline:
                    self._cut(call, f"ran past the server's limit of {self.call_timeout_s:g} s per call")

    def _cut(self, call: Call, why: str) -> None:
        with self._lock:
            if call not in self._calls:
                return
            call.deadline = math.inf  # cut once
            call.reading_since = None
        warn.warning(call.key, "cut a %s call from %s: it %s", call.method, call.key, why)
        call.caller.cancelled.set()
        call.context.cancel()
        self._on_cut()


def reading(messages: Iterator[bytes], call: Call) -> Iterator[bytes]:
    """The call's messages; while it waits for the next one, the watchdog may cut an idle peer."""
    while True:
        call.reading_since = time.monotonic()
        try:
            message = next(messages)
        except StopIteration:
            return
        finally:
            call.reading_since = None
        yield message


def metadata_of(context: grpc.ServicerContext, key: str) -> str | None:
    """The value of ``key`` in a call's metadata (at most 64 characters), if any."""
    for k, value in context.invocation_metadata() or ():
        if k == key and isinstance(value, str):
            return value[:64]
    return None


def one_message(messages: Iterator[bytes], method: str) -> bytes:
    """The one message of a unary request (refused as ``invalid`` when there is none)."""
    for message in messages:
        return message
    raise RefusedError(f"{method}: empty request", "invalid")


ADMIT_LEASE_S = 10.0
"""How long a turn granted by ``Admit`` waits for the upload that uses it before it goes to the next client."""


class UploadTurns:
    """At most ``limit`` uploads read at once, at most ``per_client`` of one client id; the others wait, first come first served.

    A turn is taken either by the upload itself or, before a gRPC upload
    opens, by an ``Admit`` call: the turn is then reserved for ``lease_s``
    under a slot name the upload presents in its metadata. An upload on the
    data plane sends nothing until the server's go, which comes when its
    handler has a turn; a gRPC upload opened without a turn waits with its
    first bytes held in the server's HTTP/2 receive window.
    """

    def __init__(self, limit: int, per_client: int = 1, lease_s: float = ADMIT_LEASE_S) -> None:
        self.limit = limit
        self.per_client = per_client
        self.lease_s = lease_s
        self._cond = threading.Condition()
        self.reading: dict[object, int] = {}  # turns taken per peer key: uploads being read and reserved slots
        self._queue: list[tuple[object, object, float]] = []  # (ticket, key, the key's limit)
        self._slots: dict[str, tuple[str, float]] = {}  # reserved slot -> (key, when the reservation lapses)

    def _taken(self, key: object, by: int) -> None:
        left = self.reading.get(key, 0) + by
        if left > 0:
            self.reading[key] = left
        else:
            self.reading.pop(key, None)

    def _lapse(self) -> None:
        """Give back the turns of slots whose upload did not come within the lease."""
        now = time.monotonic()
        for slot, (key, until) in list(self._slots.items()):
            if until <= now:
                del self._slots[slot]
                self._taken(key, -1)
                warn.warning(key, "%s was granted a turn to upload and did not use it within %g s", key, self.lease_s)

    def _may_go(self, ticket: object) -> bool:
        """Whether ``ticket`` is the first waiting upload that may be read now."""
        self._lapse()
        if sum(self.reading.values()) >= self.limit:
            return False
        for t, key, cap in self._queue:
            if self.reading.get(key, 0) < cap:
                return t is ticket
        return False

    def enter(self, key: str, caller: Caller, slot: str | None = None) -> None:
        """Wait for a turn until the call is cancelled or cut (its deadline); raises ``RefusedError`` then.

        ``slot``: a turn this key reserved with :meth:`reserve`; the upload
        takes it without waiting (a lapsed or unknown slot: it waits).
        A client id (per-client tokens) has at most ``per_client`` uploads
        read at once, so that one token holder's stalled streams cannot take
        the turns of the others; a host (shared token) is bounded by the
        total only, since its clients are indistinguishable.
        """
        with self._cond:
            if slot is not None and self._slots.get(slot, ("", 0.0))[0] == key:
                del self._slots[slot]  # the reserved turn, already counted, is this upload's
                return
        ticket = object()
        cap = self.per_client if caller.client is not None else math.inf
        with self._cond:
            self._queue.append((ticket, key, cap))
            try:
                while not self._may_go(ticket):
                    if caller.cancelled.is_set() or time.monotonic() >= caller.deadline:
                        raise RefusedError(f"waited for a turn to upload (at most {self.limit} at once) until the call ended", "exhausted")
                    self._cond.wait(0.25)
            finally:
                self._queue = [q for q in self._queue if q[0] is not ticket]
                self._cond.notify_all()
            self._taken(key, 1)

    def reserve(self, key: str, caller: Caller) -> str:
        """Wait for a turn as :meth:`enter` does and reserve it for ``lease_s``; returns the slot's name."""
        self.enter(key, caller)
        slot = secrets.token_urlsafe(18)
        with self._cond:
            self._slots[slot] = (key, time.monotonic() + self.lease_s)
        return slot

    def leave(self, key: str) -> None:
        with self._cond:
            self._taken(key, -1)
            self._cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(turns taken: uploads being read and reserved slots, uploads waiting)."""
        with self._cond:
            return sum(self.reading.values()), len(self._queue)
