"""The simulator's profile (fixed, list, CSV, seeded distribution) and its event clock, against times worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pl_parablock.errors import ConfigError
from pl_parablock.recipe.load import load_recipe
from pl_parablock.recipe.profile import ClientProfile, profile_problems, resolve_profiles
from pl_parablock.recipe.schema import ProfileSection
from pl_parablock.simulation.clock import SimClock, shared_transfers

LINK = SimpleNamespace(uplink_mbps=16.0, downlink_mbps=None, latency_ms=20.0)
MB = 1_000_000


# ------------------------------------------------------------------ profile


def test_a_profile_key_is_a_number_a_list_a_distribution_or_the_link_section():
    section = ProfileSection(compute_factor=[1.0, 2.0, 4.0], uplink_mbps=8, latency_ms=None)
    profiles = resolve_profiles(section, 3, LINK)
    assert [p.compute_factor for p in profiles] == [1.0, 2.0, 4.0]
    assert {p.uplink_mbps for p in profiles} == {8.0}
    assert {p.downlink_mbps for p in profiles} == {None}  # the link section's: unlimited
    assert {p.latency_ms for p in profiles} == {20.0}


def test_a_lognormal_profile_is_seeded_and_centred_on_its_median():
    section = ProfileSection(downlink_mbps={"distribution": "lognormal", "median": 50.0, "spread": 0.5})
    a = [p.downlink_mbps for p in resolve_profiles(section, 2001, LINK, seed=3)]
    b = [p.downlink_mbps for p in resolve_profiles(section, 2001, LINK, seed=3)]
    c = [p.downlink_mbps for p in resolve_profiles(section, 2001, LINK, seed=4)]
    assert a == b and a != c
    assert all(v is not None and v > 0 for v in a)
    assert sorted(v for v in a if v is not None)[1000] == pytest.approx(50.0, rel=0.1)


def test_a_profile_csv_gives_one_row_per_client_and_wins_over_the_keys(tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("client,compute_factor,uplink_mbps,latency_ms\n0,1.5,10,5\n1,3,,50\n")
    profiles = resolve_profiles(ProfileSection(compute_factor=9.0, csv=str(path)), 2, LINK)
    assert profiles == [ClientProfile(1.5, 10.0, None, 5.0), ClientProfile(3.0, None, None, 50.0)]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["federation.clients_per_round=5"], "`federation.clients_per_round` is 5"),
        (["simulation.profile.compute_factor=0"], "`simulation.profile.compute_factor` is 0"),
        (["simulation.profile.uplink_mbps=[10, -1, 3]"], "`simulation.profile.uplink_mbps[1]` is -1"),
        (["simulation.profile.downlink_mbps=[10, 3]"], "`simulation.profile.downlink_mbps` lists 2 values for 3 clients"),
        (["simulation.profile.latency_ms={distribution: normal, median: 1}"], "`simulation.profile.latency_ms.distribution`"),
        (["simulation.bandwidth_mbps=0"], "`simulation.bandwidth_mbps` is 0"),
    ],
)
def test_a_bad_profile_is_one_message_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["federation.clients=3", *overrides])
    assert key in str(err.value)


def test_a_profile_csv_whose_rows_do_not_match_the_clients_names_the_key(tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("compute_factor\n1\n2\n")
    problems = profile_problems(ProfileSection(csv=str(path)), 3)
    assert len(problems) == 1 and "`simulation.profile.csv`" in problems[0] and "2 rows for 3 clients" in problems[0]
    path.write_text("compute_factor,uplink_mbps\n1,5\n2,0\n3,5\n")
    (problem,) = profile_problems(ProfileSection(csv=str(path)), 3)
    assert "uplink_mbps" in problem and ":3" in problem and "must be > 0" in problem


# ------------------------------------------------------------------ clock


def _clock(n: int, staleness: int, **kw) -> SimClock:
    # 1 MB at 8 Mbit/s up (1 s), 16 Mbit/s down (0.5 s), no latency
    return SimClock([ClientProfile(1.0, 8.0, 16.0, 0.0)] * n, staleness=staleness, **kw)


def test_sync_waits_for_the_download_before_the_next_round():
    clock = _clock(2, staleness=0)
    for t in range(3):
        clock.upload(t, {0: 2.0, 1: 1.0}, {0: MB, 1: MB})
        clock.deliver(t, 0.25, MB)
    wall = clock.finish()
    # a round: the slower compute (2) + upload (1) + aggregation (0.25) + download (0.5)
    assert wall == pytest.approx(3 * 3.75)
    r1 = clock.records[1][1]
    assert r1["started_at"] == pytest.approx(3.75) and r1["server_wait_s"] == pytest.approx(1.25)
    assert r1["blocked_s"] == pytest.approx(r1["arrived_at"] - r1["ended_at"])
    assert [r["closed_at"] for r in clock.rounds] == pytest.approx([3.0, 6.75, 10.5])


def test_parablock_starts_the_next_round_at_once_and_round_t_plus_2_after_round_ts_aggregate():
    clock = _clock(1, staleness=1)
    for t in range(4):
        clock.upload(t, {0: 1.0}, {0: MB})
        clock.deliver(t, 0.0, MB)
    wall = clock.finish()
    recs = clock.records[0]
    # compute 1 s, communication 1.5 s: the transmitter is the bottleneck
    assert [r["started_at"] for r in recs] == pytest.approx([0.0, 1.0, 2.5, 4.0])
    assert [r["sent_at"] for r in recs] == pytest.approx([1.0, 2.5, 4.0, 5.5])
    assert [r["arrived_at"] for r in recs] == pytest.approx([2.5, 4.0, 5.5, 7.0])
    assert wall == pytest.approx(7.0)
    # round 0's aggregate is needed once round 1's compute ended (t=2): blocked 0.5 s
    assert recs[0]["blocked_s"] == pytest.approx(0.5)


def test_a_round_closes_at_its_timeout_once_the_quorum_arrived_and_the_rest_are_late():
    clock = _clock(3, staleness=0, round_timeout_s=2.0, min_clients=2)
    close = clock.upload(0, {0: 1.0, 1: 1.5, 2: 10.0}, {0: MB, 1: MB, 2: MB})
    assert close.closed_at == pytest.approx(4.0) and close.on_time == [0, 1] and close.late == [2]
    clock.deliver(0, 0.0, MB)
    assert clock.records[2][0]["late"] is True
    assert clock.records[2][0]["server_wait_s"] == pytest.approx(0.0)  # it takes the aggregate without its update


def test_a_shared_server_bandwidth_is_split_fairly():
    # two 1 MB uploads through 8 Mbit/s at the server: each gets 4, both take 2 s
    assert shared_transfers([(0.0, MB, 8.0, 0.0), (0.0, MB, 8.0, 0.0)], 8.0) == pytest.approx([2.0, 2.0])
    # one capped at 2 Mbit/s leaves 6 to the other, which ends first
    done = shared_transfers([(0.0, MB, 2.0, 0.0), (0.0, MB, None, 0.0)], 8.0)
    assert done[1] == pytest.approx(8 / 6) and done[0] == pytest.approx(8 / 6 + (8 - 2 * 8 / 6) / 2)
    assert shared_transfers([(1.0, MB, 8.0, 0.5)], None) == [2.5]
    assert math.isclose(shared_transfers([(0.0, 0, 8.0, 0.1)], 8.0)[0], 0.1)


def test_with_a_shared_server_link_the_clients_not_sampled_download_through_it_too():
    clock = SimClock([ClientProfile(1.0, 8.0, 8.0, 0.0)] * 3, staleness=0, bandwidth_mbps=8.0)
    close = clock.upload(0, {0: 1.0}, {0: MB})
    assert close.closed_at == pytest.approx(2.0)
    clock.deliver(0, 0.0, MB)
    # three 1 MB downloads share 8 Mbit/s: 3 s each
    assert clock.records[0][0]["arrived_at"] == pytest.approx(5.0)
    assert clock.skipped_downloads == 2 and clock.skipped_bytes_down == 2 * MB
    assert clock.finish() == pytest.approx(5.0)


def run_clock(staleness: int, rounds: int = 12) -> SimClock:
    """One client, compute 0.1 s, an 8 Mbit/s link both ways (1 MB up and down: 1 s each), no latency."""
    clock = SimClock([ClientProfile(1.0, 8.0, 8.0, 0.0)], staleness=staleness)
    for t in range(rounds):
        clock.upload(t, {0: 0.1}, {0: MB})
        clock.deliver(t, 0.0, MB)
    clock.finish()
    return clock


def test_with_staleness_2_the_transmitter_is_full_duplex():
    """k = 1: upload and download of a round one after the other (2 s a round); k >= 2: both ways at once (1 s a round)."""

    def period(clock: SimClock) -> float:
        starts = [r["started_at"] for r in clock.records[0]]
        return (starts[-1] - starts[4]) / (len(starts) - 5)

    half, full, deeper = run_clock(1), run_clock(2), run_clock(3)
    assert period(half) == pytest.approx(2.0)
    assert period(full) == pytest.approx(1.0)
    assert period(deeper) == pytest.approx(1.0)
    rec = full.records[0][6]
    nxt = full.records[0][7]
    assert nxt["sent_at"] < rec["arrived_at"], "round t + 1 uploads while round t downloads"
    assert rec["upload_s"] == pytest.approx(1.0) and rec["download_s"] == pytest.approx(1.0)
