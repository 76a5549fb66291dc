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
  (:func:`reading`), or that runs past ``call_timeout_s``; and an upload
  holding a turn whose body makes no progress (:class:`Progress`).
* **Turns**: :class:`UploadTurns` lets at most ``limit`` uploads be read at
  once (one per client id with per-client tokens, a fair share per host
  under a shared token), the others waiting their turn unread, at most
  ``wait_s``; an ``Admit`` call reserves a turn for ``lease_s``.

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
from pl_parablock.server.validation import RefusedError, StreamRefused
from pl_parablock.wire.channel import bearer_token

__all__ = [
    "ADMIT_LEASE_S",
    "BODY_TIMEOUT_S",
    "MIN_MESSAGE_BYTES",
    "MIN_UPLOAD_BPS",
    "UPLOAD_GRACE_S",
    "Call",
    "CallGuard",
    "Progress",
    "UploadTurns",
    "metadata_of",
    "one_message",
    "peer_host",
    "reading",
    "token_of",
    "turn_wait_s",
]

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
    """One call the server admitted: who, since when, until when, and whether it waits for the peer.

    Attributes:
        reading_since: when the server began waiting for the peer's next
            message (``None``: it is not waiting).
        read_s: the time the server has waited for the peer's messages so
            far, the wait under way not included.
        upload: what an upload holding its turn has sent (``None``: not an upload, or no turn yet).
    """

    __slots__ = ("caller", "context", "deadline", "key", "method", "read_s", "reading_since", "upload")

    def __init__(self, method: str, key: str, caller: Caller, context: grpc.ServicerContext, deadline: float) -> None:
        self.method = method
        self.key = key
        self.caller = caller
        self.context = context
        self.deadline = deadline
        self.reading_since: float | None = None
        self.read_s = 0.0
        self.upload: Progress | None = None

    def waited_s(self, now: float) -> float:
        """The time the server has waited for the peer's messages, the wait under way included."""
        since = self.reading_since
        return self.read_s + (now - since if since is not None else 0.0)


MIN_MESSAGE_BYTES = 1024
"""Smallest message of an upload's body but its last: the smallest chunk a client sends (``federation.chunk_kb``
is at least 1). A body is cut into chunks of exactly ``chunk_kb`` KiB but the last
(:func:`~pl_parablock.wire.framing.encode`, on gRPC and on the data plane alike), so no honest upload has a
smaller message but its body's last and its trailer."""
BODY_TIMEOUT_S = 30.0
"""Default of ``federation.body_timeout_s``: an upload holding a turn that sent no body bytes for this long is cut."""
MIN_UPLOAD_BPS = 12_500.0
"""Default floor of an upload's rate, bytes per second (0.1 Mbit/s, a tenth of a 1 Mbit/s uplink), when the
recipe declares no link (``federation.min_upload_mbps``)."""
UPLOAD_GRACE_S = 2.0
"""An upload's rate is measured once the server has waited this long for its messages."""


class Progress:
    """What an upload holding a turn has sent: its messages' sizes, checked as they come, and its body's bytes.

    An upload is a header, its body in chunks, then a small trailer
    (:mod:`pl_parablock.wire.framing`). Every body chunk but the last has
    at least ``min_message`` bytes, so past the header a message smaller
    than that may only be one of the last two (the body's last and the
    trailer): a third is refused, and so is any message after the first
    small one but the trailer, and an empty one at once. Only messages of
    at least ``min_message`` bytes after the header count as progress, so
    empty or tiny messages never keep a turn.
    """

    __slots__ = ("body_bytes", "messages", "min_message", "progress_s", "small")

    def __init__(self, min_message: int) -> None:
        self.min_message = min_message
        self.messages = 0
        self.small = 0  # messages below min_message after the header
        self.body_bytes = 0  # bytes of the messages that count as progress
        self.progress_s = 0.0  # Call.read_s when the last of them came

    def check(self, message: bytes, call: Call) -> None:
        """Count one message of the upload; raises :class:`StreamRefused` for a message no honest upload sends."""
        self.messages += 1
        if self.messages == 1:
            return  # the header: not a body message
        n = len(message)
        if n == 0:
            raise StreamRefused(f"{call.method}: message {self.messages} is empty (an upload never sends an empty message)")
        if self.small and (n >= self.min_message or self.small >= 2):
            raise StreamRefused(
                f"{call.method}: message {self.messages} follows a message of fewer than {self.min_message} bytes "
                f"(every message of an upload's body but its last has at least {self.min_message} bytes; only the trailer follows it)"
            )
        if n < self.min_message:
            self.small += 1
            return
        self.body_bytes += n
        self.progress_s = call.read_s


class CallGuard:
    """Admission per peer and the watchdog that cuts idle and overdue calls, and uploads that make no progress.

    An upload holding its turn (:meth:`uploading`) is cut when, counting only
    the time the server waits for its messages (:attr:`Call.read_s`: never
    the server's own work), it sent no body bytes for ``body_timeout_s``, or
    once that time passes ``grace_s``, when its body bytes plus one chunk in
    flight (``chunk_bytes``) fall under ``min_upload_bps`` times that time.
    An honest upload at ``min_upload_bps`` or faster is never cut by the
    rate (it has sent all but the chunk under way); set the floor well under
    the slowest client's link (the recipe's default: a tenth of it).
    """

    def __init__(
        self,
        *,
        per_peer: int,
        idle_timeout_s: float,
        call_timeout_s: float,
        on_cut: Callable[[], None],
        body_timeout_s: float = BODY_TIMEOUT_S,
        min_upload_bps: float = MIN_UPLOAD_BPS,
        chunk_bytes: int = 1 << 20,
        min_message_bytes: int = MIN_MESSAGE_BYTES,
        grace_s: float = UPLOAD_GRACE_S,
    ) -> None:
        self.per_peer = per_peer
        self.idle_timeout_s = idle_timeout_s
        self.call_timeout_s = call_timeout_s
        self.body_timeout_s = body_timeout_s
        self.min_upload_bps = min_upload_bps
        self.chunk_bytes = chunk_bytes
        self.min_message_bytes = min_message_bytes
        self.grace_s = grace_s
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

    def uploading(self, call: Call) -> None:
        """The call is an upload that now holds its turn: its messages are checked and its progress watched."""
        call.upload = Progress(self.min_message_bytes)

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
        tick = max(0.05, min(0.5, self.idle_timeout_s / 4, self.body_timeout_s / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                reading = call.reading_since
                stalled = self.stalled(call, now) if reading is not None else None
                if reading is not None and now - reading > self.idle_timeout_s:
                    self._cut(call, f"sent nothing for {self.idle_timeout_s:g} s (federation.idle_timeout_s)")
                elif stalled:
                    self._cut(call, stalled)
                elif now > call.deadline:
                    self._cut(call, f"ran past the server's limit of {self.call_timeout_s:g} s per call")

    def stalled(self, call: Call, now: float) -> str | None:
        """Why an upload holding its turn makes no progress (see the class), or ``None``."""
        up = call.upload
        if up is None:
            return None
        waited = call.waited_s(now)
        if waited - up.progress_s > self.body_timeout_s:
            return f"held a turn to upload and sent no body bytes for {self.body_timeout_s:g} s (federation.body_timeout_s)"
        if self.min_upload_bps > 0 and waited > self.grace_s and up.body_bytes + self.chunk_bytes < self.min_upload_bps * waited:
            return (
                f"held a turn to upload and sent its body at {up.body_bytes / waited / 1000:.1f} kB/s, "
                f"under the server's floor of {self.min_upload_bps / 1000:.1f} kB/s (federation.min_upload_mbps)"
            )
        return None

    def _cut(self, call: Call, why: str) -> None:
        with self._lock:
            if call not in self._calls:
                return
            call.deadline = math.inf  # cut once
            call.reading_since = None
            call.upload = None
        warn.warning(call.key, "cut a %s call from %s: it %s", call.method, call.key, why)
        call.caller.cancelled.set()
        call.context.cancel()
        self._on_cut()


def reading(messages: Iterator[bytes], call: Call) -> Iterator[bytes]:
    """The call's messages; while it waits for the next one, the watchdog may cut an idle peer.

    The time it waits is added to :attr:`Call.read_s`; an upload holding its
    turn has each message checked (:meth:`Progress.check`) before the
    service sees it.
    """
    while True:
        start = time.monotonic()
        call.reading_since = start
        try:
            message = next(messages)
        except StopIteration:
            return
        finally:
            call.reading_since = None
            call.read_s += time.monotonic() - start
        if call.upload is not None:
            call.upload.check(message, call)
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
"""How long a turn granted by ``Admit`` waits for the upload that uses it before it goes to the next client
(at most: the server shortens it to ``federation.body_timeout_s``)."""


def turn_wait_s(max_wait_s: float) -> float:
    """How long a call waits for a turn to upload: less than a client's own deadline, ``max_wait_s`` (``federation.timeout_s``).

    A tenth of it less, at least a second less, and at least half of it, so
    that a call waiting for a turn ends with its reason before the client
    that made it gives up on it (600 s: 540 s; 10 s: 9 s; 4 s: 3 s).
    """
    return max(0.5 * max_wait_s, min(0.9 * max_wait_s, max_wait_s - 1.0))


class UploadTurns:
    """At most ``limit`` uploads read at once, fairly shared among the peers that wait; the others wait at most ``wait_s``.

    A turn is taken either by the upload itself or, before a gRPC upload
    opens, by an ``Admit`` call: the turn is then reserved for ``lease_s``
    under a slot name the upload presents in its metadata. An upload on the
    data plane sends nothing until the server's go, which comes when its
    handler has a turn; a gRPC upload opened without a turn waits with its
    first bytes held in the server's HTTP/2 receive window.

    Who gets a free turn: of the waiting uploads whose peer may take one
    more, the one whose peer holds fewest turns, first come first served
    among equals. A client id (per-client tokens) holds at most
    ``per_client`` turns. A host (a shared token, or none: its clients are
    indistinguishable) holds at most ``max(1, limit - 1)`` once uploads have
    come from more than one host, so one host cannot hold every turn while
    another waits; a federation whose clients all run on one host (the
    local launcher) may use every turn.
    """

    def __init__(self, limit: int, per_client: int = 1, lease_s: float = ADMIT_LEASE_S, wait_s: float = math.inf) -> None:
        self.limit = limit
        self.per_client = per_client
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.host_cap = max(1, limit - 1)
        self._cond = threading.Condition()
        self.reading: dict[object, int] = {}  # turns taken per peer key: uploads being read and reserved slots
        self._queue: list[tuple[object, object, float | None]] = []  # (ticket, key, the key's cap; None: a host's)
        self._slots: dict[str, tuple[str, float]] = {}  # reserved slot -> (key, when the reservation lapses)
        self._host: object = None  # the first host that asked for a turn
        self.hosts = 0  # hosts that asked for a turn: 0, 1, or 2 for more than one

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

    def _cap(self, cap: float | None) -> float:
        if cap is not None:
            return cap
        return self.host_cap if self.hosts > 1 else self.limit

    def _may_go(self, ticket: object) -> bool:
        """Whether ``ticket`` is the waiting upload that takes the next free turn (see the class)."""
        self._lapse()
        if sum(self.reading.values()) >= self.limit:
            return False
        best: tuple[int, object] | None = None
        for t, key, cap in self._queue:
            held = self.reading.get(key, 0)
            if held < self._cap(cap) and (best is None or held < best[0]):
                best = (held, t)
        return best is not None and best[1] is ticket

    def enter(self, key: str, caller: Caller, slot: str | None = None) -> None:
        """Wait for a turn until ``wait_s`` passes or the call is cancelled or cut (its deadline); raises ``RefusedError`` then.

        ``slot``: a turn this key reserved with :meth:`reserve`; the upload
        takes it without waiting (a lapsed or unknown slot: it waits).
        """
        with self._cond:
            if slot is not None and self._slots.get(slot, ("", 0.0))[0] == key:
                del self._slots[slot]  # the reserved turn, already counted, is this upload's
                return
        ticket = object()
        cap = self.per_client if caller.client is not None else None
        until = time.monotonic() + self.wait_s
        with self._cond:
            if cap is None and key != self._host:
                if self._host is None:
                    self._host, self.hosts = key, 1
                else:
                    self.hosts = 2
            self._queue.append((ticket, key, cap))
            try:
                while not self._may_go(ticket):
                    now = time.monotonic()
                    if caller.cancelled.is_set() or now >= caller.deadline:
                        raise RefusedError(f"waited for a turn to upload (at most {self.limit} at once) until the call ended", "exhausted")
                    if now >= until:
                        raise RefusedError(
                            f"waited {self.wait_s:g} s for a turn to upload (at most {self.limit} at once, all taken); retry later",
                            "exhausted",
                        )
                    self._cond.wait(min(0.25, max(0.01, until - now)))
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
            self._lapse()
            return sum(self.reading.values()), len(self._queue)
