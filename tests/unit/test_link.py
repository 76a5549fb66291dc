from __future__ import annotations

import time

import pytest

from pl_parablock.federation.link import Link


def test_no_emulation_passes_through():
    link = Link()
    assert not link.emulated
    assert list(link.pace_up([b"a", b"b"])) == [b"a", b"b"]
    assert "no link emulation" in link.describe()


def test_pacing_holds_the_rate_and_latency():
    link = Link(uplink_mbps=8.0, latency_ms=50)  # 1 MB/s
    chunks = [b"x" * 50_000] * 4  # 200 kB -> 0.2 s + 0.05 s
    t0 = time.monotonic()
    assert sum(len(c) for c in link.pace_up(chunks)) == 200_000
    elapsed = time.monotonic() - t0
    assert 0.24 <= elapsed < 1.0
    assert link.seconds(200_000, 8.0) == pytest.approx(0.25)
    assert "emulated link" in link.describe()


def test_invalid_links():
    with pytest.raises(ValueError):
        Link(uplink_mbps=0)
    with pytest.raises(ValueError):
        Link(latency_ms=-1)


def test_waiting_for_the_first_chunk_is_not_transfer_time():
    def slow_server():
        time.sleep(0.3)  # the server is still aggregating
        yield from [b"x" * 50_000] * 2

    link = Link(downlink_mbps=8.0)  # 100 kB take 0.1 s
    t0 = time.monotonic()
    first = None
    for _ in link.pace_down(slow_server()):
        first = first or time.monotonic()
    end = time.monotonic()
    assert end - first >= 0.045, "the second chunk still waits its turn on the link"
    assert end - t0 >= 0.35, "the wait is not swallowed by the pacing"
