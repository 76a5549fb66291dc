"""The rules on upload turns, one at a time (issue 20, part 1): message sizes, progress, the wait, fair shares per host.

The attacks themselves, beside an honest federation over gRPC, are in
``tests/integration/test_attacks_turns.py``.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
import torch

from pl_parablock.errors import ConfigError
from pl_parablock.recipe.build import DEFAULT_MIN_UPLOAD_MBPS, min_upload_mbps
from pl_parablock.recipe.load import load_recipe
from pl_parablock.server.guards import MIN_MESSAGE_BYTES, Call, CallGuard, Progress, UploadTurns, reading, turn_wait_s
from pl_parablock.server.service import Caller
from pl_parablock.server.validation import RefusedError, StreamRefused
from pl_parablock.wire.framing import encode


class _Context:
    def cancel(self) -> None:
        pass


def call_of(method: str = "Push") -> Call:
    return Call(method, "ipv4:10.0.0.1", Caller(None, "ipv4:10.0.0.1:5"), _Context(), math.inf)  # type: ignore[arg-type]


def uploaded(messages: list[bytes]) -> Call:
    """Read ``messages`` as an upload holding its turn; returns its call (raises what the checks raise)."""
    call = call_of()
    call.upload = Progress(MIN_MESSAGE_BYTES)
    for _ in reading(iter(messages), call):
        pass
    return call


# ------------------------------------------------------------------------------------------------ message sizes


@pytest.mark.parametrize("chunk_kb", [1, 3, 1024])
@pytest.mark.parametrize("elems", [0, 1, 255, 256, 257, 768, 5000])
def test_no_honest_upload_has_a_message_the_floor_refuses(chunk_kb, elems):
    """Whatever the block's size and ``federation.chunk_kb`` (at least 1 KiB), as the clients' framing cuts it."""
    tensors = {"a": torch.ones(elems), "b": torch.zeros(3, dtype=torch.bfloat16)}
    messages = [bytes(m) for m in encode({"client_id": 0}, tensors, chunk_bytes=chunk_kb * 1024, zero_copy=True)]
    call = uploaded(messages)
    body = sum(len(m) for m in messages[1:-1])
    assert call.upload is not None and call.upload.body_bytes >= body - chunk_kb * 1024, "every full chunk counts"


def test_an_empty_message_is_refused_at_once():
    with pytest.raises(StreamRefused, match="message 2 is empty") as err:
        uploaded([b"{}", b""])
    assert err.value.code == "invalid" and "\n" not in str(err.value)


def test_small_messages_only_at_the_end():
    header, big, small = b"{}", b"x" * MIN_MESSAGE_BYTES, b"x" * 10
    uploaded([header, big, small, small])  # the body's last, then the trailer
    uploaded([header, big, big, small])
    with pytest.raises(StreamRefused, match=f"fewer than {MIN_MESSAGE_BYTES} bytes"):
        uploaded([header, small, small, small])  # a third
    with pytest.raises(StreamRefused, match=f"fewer than {MIN_MESSAGE_BYTES} bytes"):
        uploaded([header, small, big])  # a body message after a short one


def test_only_body_messages_over_the_floor_count_as_progress():
    call = uploaded([b"x" * 5000, b"y" * MIN_MESSAGE_BYTES, b"z" * 7])  # the header is no progress, nor a short message
    assert call.upload is not None and call.upload.body_bytes == MIN_MESSAGE_BYTES


def test_a_call_that_is_not_an_upload_is_not_checked():
    call = call_of("Join")
    assert list(reading(iter([b"{}", b""]), call)) == [b"{}", b""]


# ------------------------------------------------------------------------------------------------ progress


def guard(**kw: Any) -> CallGuard:
    kw = {"per_peer": 8, "idle_timeout_s": 60.0, "call_timeout_s": 600.0, "on_cut": lambda: None, **kw}
    return CallGuard(**kw)


def test_an_upload_that_sends_no_body_is_stalled_after_body_timeout_s():
    g = guard(body_timeout_s=5.0, min_upload_bps=0.0)
    call = call_of()
    g.uploading(call)
    call.reading_since = 100.0
    assert g.stalled(call, 104.0) is None
    assert "federation.body_timeout_s" in (g.stalled(call, 106.0) or "")
    call.reading_since = None
    assert call.waited_s(200.0) == 0.0, "the server's own work is not the peer's time"


def test_the_rate_floor_never_cuts_an_upload_at_the_floor_and_cuts_one_under_it():
    """Chunks of 64 KiB at exactly the floor (and a tenth of it): the credit of one chunk in flight keeps it going."""
    chunk, floor = 64 << 10, 10_000.0
    g = guard(body_timeout_s=1e9, min_upload_bps=floor, chunk_bytes=chunk, grace_s=2.0)
    for rate, cut in ((floor, False), (floor * 0.5, True)):
        call = call_of()
        g.uploading(call)
        assert call.upload is not None
        call.upload.check(b"{}", call)  # the header
        why = None
        for i in range(1, 40):  # the server waits for each chunk chunk / rate seconds
            t = i * chunk / rate
            for f in (0.1, 0.5, 0.99):  # while it waits for chunk i
                call.reading_since = call.read_s
                why = why or g.stalled(call, call.read_s + f * chunk / rate)
            call.read_s = t
            call.upload.check(b"x" * chunk, call)
        assert (why is not None) == cut, (rate, why)
        assert why is None or "federation.min_upload_mbps" in why


# ------------------------------------------------------------------------------------------------ turns


def enter(turns: UploadTurns, host: str) -> None:
    turns.enter(host, Caller(None, f"{host}:1"))


def test_a_federation_on_one_host_uses_every_turn():
    """The local launcher's clients share 127.0.0.1 (and a token, or none): never capped below max_uploads."""
    turns = UploadTurns(3, wait_s=0.3)
    for _ in range(3):
        enter(turns, "ipv4:127.0.0.1")
    assert turns.counts() == (3, 0) and turns.hosts == 1


def test_once_two_hosts_upload_none_holds_every_turn():
    turns = UploadTurns(3, wait_s=0.5)
    enter(turns, "ipv4:10.0.0.1")
    turns.leave("ipv4:10.0.0.1")
    enter(turns, "ipv4:10.0.0.2")
    enter(turns, "ipv4:10.0.0.2")
    assert turns.hosts == 2 and turns.host_cap == 2
    with pytest.raises(RefusedError, match=r"waited 0\.5 s for a turn to upload") as err:
        enter(turns, "ipv4:10.0.0.2")  # its third, though one turn is free: the other host's
    assert err.value.code == "exhausted"
    enter(turns, "ipv4:10.0.0.1")
    assert turns.counts() == (3, 0)
    assert UploadTurns(1).host_cap == 1, "a single turn still goes to someone"


def test_a_free_turn_goes_to_the_waiting_host_holding_fewest():
    turns = UploadTurns(3, wait_s=10.0)
    for host in ("ipv4:10.0.0.1", "ipv4:10.0.0.2", "ipv4:10.0.0.3"):
        enter(turns, host)  # three hosts, a turn each: every turn taken
    order: list[str] = []

    def wait(host: str) -> None:
        try:
            enter(turns, host)
            order.append(host)
        except RefusedError:
            order.append(f"{host} refused")

    first = threading.Thread(target=wait, args=("ipv4:10.0.0.1",))  # waiting first, but holds one already
    first.start()
    time.sleep(0.3)
    fewest = threading.Thread(target=wait, args=("ipv4:10.0.0.4",))  # holds none
    fewest.start()
    time.sleep(0.3)
    turns.leave("ipv4:10.0.0.2")
    fewest.join(5.0)
    assert order == ["ipv4:10.0.0.4"]
    turns.leave("ipv4:10.0.0.3")
    first.join(5.0)
    assert order == ["ipv4:10.0.0.4", "ipv4:10.0.0.1"]


def test_a_wait_for_a_turn_ends_before_the_clients_deadline():
    for max_wait_s in (1.0, 4.0, 10.0, 600.0):
        assert 0 < turn_wait_s(max_wait_s) < max_wait_s
    assert turn_wait_s(600.0) == 540.0


def test_a_reserved_turn_lapses_even_when_nobody_waits():
    turns = UploadTurns(1, lease_s=0.2)
    turns.reserve("ipv4:10.0.0.1", Caller(None, "x"))
    assert turns.counts() == (1, 0)
    time.sleep(0.3)
    assert turns.counts() == (0, 0)


# ------------------------------------------------------------------------------------------------ recipe


def test_the_rate_floor_is_a_tenth_of_the_slowest_declared_uplink():
    assert min_upload_mbps(load_recipe(None)) == DEFAULT_MIN_UPLOAD_MBPS == 0.1
    assert min_upload_mbps(load_recipe(None, ["link.uplink_mbps=16"])) == pytest.approx(1.6)
    profile = ["federation.clients=3", "simulation.profile.uplink_mbps=[50, 8, null]"]
    assert min_upload_mbps(load_recipe(None, ["link.uplink_mbps=16", *profile])) == pytest.approx(0.8)
    assert min_upload_mbps(load_recipe(None, ["link.uplink_mbps=16", "federation.min_upload_mbps=0"])) == 0.0


def test_the_new_keys_exit_2_with_one_line_naming_the_key(capsys):
    from pl_parablock.fit import main

    assert load_recipe(None).federation.body_timeout_s == 30.0
    for override, key in (
        ("federation.body_timeout_s=0", "federation.body_timeout_s"),
        ("federation.body_timeout_s=nan", "federation.body_timeout_s"),
        ("federation.min_upload_mbps=-1", "federation.min_upload_mbps"),
        ("link.uplink_mbps=0.1", "federation.body_timeout_s"),  # a 1 MiB chunk takes 84 s on it: honest uploads would be cut
    ):
        with pytest.raises(ConfigError) as err:
            load_recipe(None, [override])
        assert len(err.value.problems) == 1 and key in err.value.problems[0], err.value.problems
        assert main([override, "--inprocess"]) == 2, override
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "Traceback" not in lines[0], lines
    assert load_recipe(None, ["link.uplink_mbps=0.1", "federation.chunk_kb=64"]).federation.chunk_kb == 64
