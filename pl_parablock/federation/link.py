"""Emulated network link for experiments on one machine.

A client may declare ``uplink_mbps``, ``downlink_mbps`` and ``latency_ms``;
its transport then paces the bytes it sends and receives to that rate and
adds the one-way latency once per transfer. This is an emulation (loopback
is much faster) and every report labels it so.
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

    def pace_up(self, chunks: Iterable[bytes], sleep: Callable[[float], None] = time.sleep) -> Iterator[bytes]:
        return _pace(chunks, self.uplink_mbps, self.latency_ms, sleep)

    def pace_down(self, chunks: Iterable[bytes], sleep: Callable[[float], None] = time.sleep) -> Iterator[bytes]:
        return _pace(chunks, self.downlink_mbps, self.latency_ms, sleep)


def _pace(chunks: Iterable[bytes], mbps: float | None, latency_ms: float, sleep: Callable[[float], None]) -> Iterator[bytes]:
    """Hand on each chunk no sooner than the link would have carried it.

    The clock starts when the first chunk is there, so time spent waiting
    for the other side (a server still aggregating) is not counted as
    transfer: the latency is added once, then bytes go at the rate.
    """
    if mbps is None and latency_ms <= 0:
        yield from chunks
        return
    start: float | None = None
    sent = 0
    for chunk in chunks:
        if start is None:
            if latency_ms > 0:
                sleep(latency_ms / 1000.0)
            start = time.monotonic()
        yield chunk
        sent += len(chunk)
        if mbps is not None:
            wait = start + sent * 8 / (mbps * 1e6) - time.monotonic()
            if wait > 0:
                sleep(wait)
