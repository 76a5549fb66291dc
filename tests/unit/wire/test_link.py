from __future__ import annotations

import pytest

from pl_parablock.wire.link import Link


def test_no_emulation_passes_through():
    link = Link()
    assert not link.emulated
    assert list(link.pace_up([b"a", b"b"])) == [b"a", b"b"]
    assert "no link emulation" in link.describe()


def test_pacing_holds_the_rate_and_latency():
    clock = FakeClock()
    link = Link(uplink_mbps=8.0, latency_ms=50)  # 1 MB/s
    chunks = [b"x" * 50_000] * 4  # 200 kB -> 0.2 s + 0.05 s
    assert handed_on_at(link, chunks, clock)[-1] == pytest.approx(0.25)
    assert link.seconds(200_000, 8.0) == pytest.approx(0.25)
    assert "emulated link" in link.describe()


def test_invalid_links():
    with pytest.raises(ValueError):
        Link(uplink_mbps=0)
    with pytest.raises(ValueError):
        Link(latency_ms=-1)


def test_waiting_for_the_first_chunk_is_not_transfer_time():
    clock = FakeClock()

    def slow_server():
        clock.sleep(0.3)  # the server is still aggregating
        yield from [b"x" * 50_000] * 2

    times = handed_on_at(Link(downlink_mbps=8.0), slow_server(), clock, down=True)  # 100 kB take 0.1 s
    assert times == [pytest.approx(0.35), pytest.approx(0.4)], "the wait is neither swallowed nor counted as transfer"


class FakeClock:
    """A clock that moves only when something sleeps (no real waiting)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def handed_on_at(link: Link, chunks, clock: FakeClock, down: bool = False) -> list[float]:
    """When (fake clock, from the start) each chunk was handed on."""
    t0 = clock.now
    pace = link.pace_down if down else link.pace_up
    return [round(clock.now - t0, 9) for _ in pace(chunks, sleep=clock.sleep, clock=clock)]


def test_a_chunk_is_handed_on_only_once_the_link_delivered_all_of_it():
    clock = FakeClock()
    link = Link(uplink_mbps=8.0)  # 1 MB/s
    # a block smaller than a chunk takes its time on the link too (it used to pass at once)
    assert handed_on_at(link, [b"x" * 50_000], clock) == [pytest.approx(0.05)]
    clock = FakeClock()
    assert handed_on_at(link, [b"x" * 100_000, b"x" * 50_000, b"x" * 10], clock) == [
        pytest.approx(0.1),
        pytest.approx(0.15),
        pytest.approx(0.15001),
    ]


def test_the_latency_is_paid_once_while_the_source_keeps_up():
    clock = FakeClock()
    link = Link(downlink_mbps=8.0, latency_ms=20)
    times = handed_on_at(link, [b"x" * 10_000] * 5, clock, down=True)
    assert times == [pytest.approx(0.02 + 0.01 * (k + 1)) for k in range(5)]
    clock = FakeClock()
    assert handed_on_at(Link(latency_ms=30), [b"a", b"b", b"c"], clock) == [pytest.approx(0.03)] * 3


def test_a_stalled_source_leaves_the_link_idle_and_earns_no_credit():
    clock = FakeClock()

    def source():
        clock.sleep(0.5)  # the server is still aggregating: not transfer time
        yield b"x" * 10_000
        clock.sleep(0.2)  # a stall mid-stream
        yield from [b"x" * 10_000] * 2

    times = handed_on_at(Link(downlink_mbps=8.0, latency_ms=10), source(), clock, down=True)
    first = 0.5 + 0.01 + 0.01
    # after the stall the link starts again when the chunk came, and the next chunk waits its own turn
    assert times == [pytest.approx(first), pytest.approx(first + 0.2 + 0.01), pytest.approx(first + 0.2 + 0.02)]


def test_up_and_down_are_paced_independently_full_duplex():
    """An upload and a download at once each take their own time, as on a full-duplex link (no shared clock or lock)."""
    import threading
    import time

    link = Link(uplink_mbps=4.0, downlink_mbps=4.0)  # 0.5 MB/s each way: 100 kB take 0.2 s
    chunks = [b"x" * 20_000] * 5
    took = {}

    def move(direction: str) -> None:
        t0 = time.perf_counter()
        for _ in (link.pace_up if direction == "up" else link.pace_down)(chunks):
            pass
        took[direction] = time.perf_counter() - t0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=move, args=(d,)) for d in ("up", "down")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    both = time.perf_counter() - t0
    assert took["up"] >= 0.19 and took["down"] >= 0.19
    assert both < 0.35, f"an upload and a download at once took {both:.2f} s: the directions share the link"
