"""Emulated network link for experiments on one machine.

A client may declare ``uplink_mbps``, ``downlink_mbps`` and ``latency_ms``;
its transport then paces the bytes it sends and receives to that rate and
adds the one-way latency once per transfer. This is an emulation (loopback
is much faster) and every report labels it so.

The link is full duplex, as real ones are: each transfer is paced by itself
(:meth:`Link.pace_up` and :meth:`Link.pace_down` share no lock or clock), so
an upload and a download at once each take their own time. Transfers in one
direction do not share the rate either; the client's transmitter moves one
at a time per direction (:mod:`pl_parablock.client.transmitter`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Link"]


@dataclass(frozen=True)
class Link:
    """Rates in Mbit/s (``None``: no limit) and one-way latency in ms."""

    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, not {v!r}")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, not {self.latency_ms!r}")

    @classmethod
    def from_section(cls, section: Any) -> Link:
        """The link of a recipe's ``link`` section (anything with the three fields)."""
        return cls(section.uplink_mbps, section.downlink_mbps, section.latency_ms)

    @property
    def emulated(self) -> bool:
        return self.uplink_mbps is not None or self.downlink_mbps is not None or self.latency_ms > 0

    def describe(self) -> str:
        if not self.emulated:
            return "no link emulation (real network speed)"

        def rate(v: float | None) -> str:
            return "unlimited" if v is None else f"{v:g} Mbit/s"

        return f"emulated link: up {rate(self.uplink_mbps)}, down {rate(self.downlink_mbps)}, latency {self.latency_ms:g} ms"

    def seconds(self, nbytes: int, mbps: float | None) -> float:
        """Time the link takes for ``nbytes`` one way, latency included."""
        t = self.latency_ms / 1000.0
        if mbps is not None:
            t += nbytes * 8 / (mbps * 1e6)
        return t

    def pace_up(
        self, chunks: Iterable[bytes], sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic
    ) -> Iterator[bytes]:
        """``chunks`` as the uplink delivers them (``sleep`` and ``clock``: injectable for tests)."""
        return _pace(chunks, self.uplink_mbps, self.latency_ms, sleep, clock)

    def pace_down(
        self, chunks: Iterable[bytes], sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic
    ) -> Iterator[bytes]:
        """``chunks`` as the downlink delivers them (``sleep`` and ``clock``: injectable for tests)."""
        return _pace(chunks, self.downlink_mbps, self.latency_ms, sleep, clock)


def _pace(
    chunks: Iterable[bytes],
    mbps: float | None,
    latency_ms: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> Iterator[bytes]:
    """Hand on each chunk once the link would have delivered all of it.

    The link sends a chunk when it has one and is free, at ``mbps``; its
    last byte arrives ``latency_ms`` after it was sent, and only then is the
    chunk handed on (a block smaller than a chunk takes its full time, not
    none). Chunks follow each other on the link back to back, so the latency
    is paid once per transfer while the source keeps up. Time the source
    makes the link wait (a server still aggregating before its first chunk,
    or a stall mid-stream) is idle link time: it is not counted as transfer
    and earns no credit, so the chunks after a stall still go at the rate.
    """
    if mbps is None and latency_ms <= 0:
        yield from chunks
        return
    latency = latency_ms / 1000.0
    free: float | None = None  # when the link has sent everything it was given so far
    for chunk in chunks:
        got = clock()
        # a chunk the source had ready when the link went free starts then; a later one starts when it came.
        # (``got`` lags the previous hand-on, which came ``latency`` after its chunk was sent)
        start = got if free is None else max(free, got - latency)
        free = start + (len(chunk) * 8 / (mbps * 1e6) if mbps is not None else 0.0)
        wait = free + latency - clock()
        if wait > 0:
            sleep(wait)
        yield chunk
