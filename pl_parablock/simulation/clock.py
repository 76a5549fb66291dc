"""The simulated clock: when each push arrives, each round closes and each client can go on (pure).

An event simulation of the federation the simulator stands for, round by
round, from each client's measured compute time (times its profile's
``compute_factor``) and its link (:class:`~pl_parablock.recipe.profile.ClientProfile`):

* **compute** of round ``t`` on client ``i`` starts when the client is free
  and holds the aggregate the mode requires: round ``t − 1``'s in ``sync``
  and ``fedavg``, round ``t − 2``'s in ``parablock`` (round ``t`` starts at
  once after round ``t − 1``'s compute);
* the client's **transmitter** takes its hand-offs in order (as
  :class:`~pl_parablock.client.transmitter.Transmitter` does): it uploads round
  ``t``'s block when the compute ended and it finished the previous
  hand-off, waits for the aggregate, downloads it. With ``staleness`` >= 2 it
  is full duplex: round ``t``'s upload waits only for round ``t − 1``'s
  upload, and its download for the aggregate and round ``t − 1``'s download.
  A round the client is not sampled for only downloads the aggregate;
* a transfer takes the link's latency once, then the bytes at the client's
  rate (as the emulated link paces them); with ``bandwidth_mbps`` the
  server's bandwidth, each way, is shared max-min fairly by the transfers
  of a round: its sampled clients' uploads, and the downloads of its
  aggregate by every client (sampled or not). Transfers of different rounds
  do not share it with each other (an approximation: in ``parablock`` a
  round's uploads may overlap the previous round's late downloads);
* a **round closes** when its last sampled client's update arrived, or,
  with ``round_timeout_s``, at ``first arrival + round_timeout_s`` once
  ``min_clients`` arrived (the :class:`~pl_parablock.server.aggregator.Aggregator`'s
  rule); an update arriving after the close is late: the server drops it;
* the **aggregate** is ready ``aggregation_s`` after the close.

Times are seconds since the simulated start (0). The training loop's
blocked time is when a client waits for an aggregate it needs: in ``sync``
after its compute of round ``t``, in ``parablock`` after its compute of
round ``t + 1`` (or of ``t``, if it is not sampled for ``t + 1``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pl_parablock.recipe.profile import ClientProfile

__all__ = ["RoundClose", "SimClock", "shared_transfers"]


def shared_transfers(transfers: Sequence[tuple[float, float, float | None, float]], capacity_mbps: float | None) -> list[float]:
    """Finish times of transfers ``(start_s, nbytes, rate_mbps or None, latency_s)`` through a shared capacity.

    Each transfer waits its latency, then moves its bytes at its own rate;
    with ``capacity_mbps``, the transfers moving at the same time share it
    max-min fairly (water-filling: each gets the same share, except those
    capped lower by their own rate, whose leftover the others share).
    ``None`` rates and capacity are unlimited.
    """
    begins = np.array([s + lat for s, _, _, lat in transfers], dtype=np.float64)
    if capacity_mbps is None:
        return [float(b) + (n * 8 / (r * 1e6) if r else 0.0) for b, (_, n, r, _) in zip(begins, transfers)]
    capacity = capacity_mbps * 1e6
    bits = np.array([n * 8.0 for _, n, _, _ in transfers], dtype=np.float64)
    caps = np.array([r * 1e6 if r else math.inf for _, _, r, _ in transfers], dtype=np.float64)
    finish = np.where(bits <= 0, begins, np.nan)
    now = float(begins.min()) if len(begins) else 0.0
    while np.isnan(finish).any():
        pending = np.isnan(finish)
        active = np.flatnonzero(pending & (begins <= now))
        waiting = begins[pending & (begins > now)]
        if not len(active):
            now = float(waiting.min())
            continue
        rates = _water_fill(caps[active], capacity)
        step = float((bits[active] / rates).min())
        if len(waiting):
            step = min(step, float(waiting.min()) - now)
        now += step
        bits[active] -= rates * step
        finish[active[bits[active] <= 1e-6]] = now
    return [float(f) for f in finish]


def _water_fill(caps: np.ndarray, capacity: float) -> np.ndarray:
    """Max-min fair rates of flows capped at ``caps`` sharing ``capacity``."""
    order = np.argsort(caps)
    c = caps[order]
    k = len(c)
    below = np.concatenate(([0.0], np.cumsum(c[:-1])))  # what the j smallest caps take
    level = (capacity - below) / (k - np.arange(k))  # the equal share left if the j smallest are capped
    fits = np.flatnonzero(level <= c)
    share = level[fits[0]] if len(fits) else math.inf
    rates = np.empty(k)
    rates[order] = np.minimum(c, share)
    return rates


@dataclass
class RoundClose:
    """When round ``round`` closed, why, and whose updates arrived in time (the others are late)."""

    round: int
    closed_at: float
    reason: str
    on_time: list[int]
    late: list[int]
    first_arrival: float


@dataclass
class _Pending:
    participants: list[int]
    uploaded: dict[int, float]
    close: RoundClose
    records: dict[int, dict[str, Any]] = field(default_factory=dict)


class SimClock:
    """The wall-clock of a federation, advanced one round at a time as the simulator runs it.

    Call :meth:`upload` with the round's sampled clients and their measured
    compute times (it returns the round's close and the late clients), then
    :meth:`deliver` with the aggregation time; after the last round,
    :meth:`finish` gives the run's wall-clock and completes the records.

    Args:
        profiles: one per client.
        staleness: 0 (``sync``, ``fedavg``) or ``k`` (``parablock``, ``federation.staleness``).
        round_timeout_s: close a round this long after its first arrival once ``min_clients`` arrived; ``None``: wait for all.
        min_clients: the quorum at the timeout (default: every sampled client).
        bandwidth_mbps: the server's total bandwidth each way; ``None``: unlimited.
    """

    def __init__(
        self,
        profiles: Sequence[ClientProfile],
        *,
        staleness: int,
        round_timeout_s: float | None = None,
        min_clients: int | None = None,
        bandwidth_mbps: float | None = None,
    ) -> None:
        self.profiles = list(profiles)
        self.staleness = staleness
        self.round_timeout_s = round_timeout_s
        self.min_clients = min_clients
        self.bandwidth_mbps = bandwidth_mbps
        n = len(self.profiles)
        self._tx_free = [0.0] * n  # when the client's transmitter (full duplex: its download direction) is free
        self.duplex = staleness >= 2
        self._up_free = [0.0] * n  # full duplex: when its upload direction is free
        self._compute_free = [0.0] * n
        self._done = [-1] * n  # the last round whose hand-off this client's transmitter finished
        self._arrivals: list[dict[int, float]] = [{} for _ in range(n)]
        self._avail: list[float] = []  # when each round's aggregate was ready at the server
        self._down_bytes: list[int] = []
        self._pending: _Pending | None = None
        self.records: dict[int, list[dict[str, Any]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.skipped_downloads = 0  # aggregates downloaded for rounds a client was not sampled for
        self.skipped_bytes_down = 0

    # ------------------------------------------------------------ per client

    def _download_s(self, client: int, nbytes: int) -> float:
        p = self.profiles[client]
        return p.latency_ms / 1000.0 + (nbytes * 8 / (p.downlink_mbps * 1e6) if p.downlink_mbps else 0.0)

    def _advance(self, client: int, upto: int) -> None:
        """Run the client's transmitter through round ``upto``: the rounds it skipped only download the aggregate."""
        arrivals = self._arrivals[client]
        for q in range(self._done[client] + 1, upto + 1):
            start = max(self._tx_free[client], self._avail[q])
            arrivals[q] = self._tx_free[client] = start + self._download_s(client, self._down_bytes[q])
            self._done[client] = q
            self.skipped_downloads += 1
            self.skipped_bytes_down += self._down_bytes[q]
        for q in [q for q in arrivals if q < upto - 1 - self.staleness]:  # the oldest a round may still wait for
            del arrivals[q]

    def _arrival(self, client: int, round_index: int) -> float:
        return 0.0 if round_index < 0 else self._arrivals[client][round_index]

    # ------------------------------------------------------------ rounds

    def upload(self, round_index: int, compute_s: Mapping[int, float], bytes_up: Mapping[int, int]) -> RoundClose:
        """Round ``round_index``'s sampled clients (the keys of ``compute_s``, measured seconds) compute and upload."""
        t = round_index
        if len(self._avail) != t or self._pending is not None:
            raise ValueError(f"round {t} is out of turn (next: {len(self._avail)})")
        participants = sorted(compute_s)
        transfers = []
        records: dict[int, dict[str, Any]] = {}
        for i in participants:
            self._advance(i, t - 1)
            p = self.profiles[i]
            start = max(self._compute_free[i], self._arrival(i, t - 1 - self.staleness))
            took = compute_s[i] * p.compute_factor
            end = self._compute_free[i] = start + took
            sent = max(end, self._up_free[i] if self.duplex else self._tx_free[i])
            transfers.append((sent, float(bytes_up[i]), p.uplink_mbps, p.latency_ms / 1000.0))
            records[i] = {
                "round": t,
                "started_at": start,
                "ended_at": end,
                "compute_s": took,
                "sent_at": sent,
                "bytes_up": int(bytes_up[i]),
            }
        uploaded = dict(zip(participants, shared_transfers(transfers, self.bandwidth_mbps)))
        for i, at in uploaded.items():
            self._up_free[i] = at
        close = self._close(t, uploaded)
        self._pending = _Pending(participants, uploaded, close, records)
        return close

    def _close(self, t: int, uploaded: Mapping[int, float]) -> RoundClose:
        times = sorted(uploaded.values())
        if not times:
            return RoundClose(t, self._avail[-1] if self._avail else 0.0, "no client sampled", [], [], 0.0)
        last, first = times[-1], times[0]
        closed, reason = last, "all sampled clients arrived"
        if self.round_timeout_s is not None:
            quorum = min(self.min_clients or len(times), len(times))
            at_timeout = max(first + self.round_timeout_s, times[quorum - 1])
            if at_timeout < last:
                closed = at_timeout
                reason = f"timeout after {self.round_timeout_s:g} s with {sum(1 for x in times if x <= closed)} of {len(times)} clients"
        on_time = sorted(i for i, a in uploaded.items() if a <= closed)
        late = sorted(i for i, a in uploaded.items() if a > closed)
        return RoundClose(t, closed, reason, on_time, late, first)

    def deliver(self, round_index: int, aggregation_s: float, bytes_down: int) -> None:
        """Round ``round_index``'s aggregate is formed (``aggregation_s``) and its sampled clients download it."""
        pending = self._pending
        if pending is None or pending.close.round != round_index:
            raise ValueError(f"round {round_index} was not uploaded")
        self._pending = None
        avail = pending.close.closed_at + aggregation_s
        self._avail.append(avail)
        self._down_bytes.append(int(bytes_down))
        # half duplex the transmitter was free once the upload ended; full duplex the download waits for the one before
        starts = {i: max(avail, pending.uploaded[i], self._tx_free[i]) for i in pending.participants}
        others: list[int] = []
        if self.bandwidth_mbps is not None:  # the clients not sampled download through the same server link
            sampled = set(pending.participants)
            others = [i for i in range(len(self.profiles)) if i not in sampled]
            for i in others:
                self._advance(i, round_index - 1)
                starts[i] = max(avail, self._tx_free[i])
        transfers = [(starts[i], float(bytes_down), self.profiles[i].downlink_mbps, self.profiles[i].latency_ms / 1000.0) for i in starts]
        arrivals = dict(zip(starts, shared_transfers(transfers, self.bandwidth_mbps)))
        for i in others:
            self._arrivals[i][round_index] = self._tx_free[i] = arrivals[i]
            self._done[i] = round_index
            self.skipped_downloads += 1
            self.skipped_bytes_down += int(bytes_down)
        for i in pending.participants:
            arrived = arrivals[i]
            rec = pending.records[i]
            rec.update(
                upload_s=pending.uploaded[i] - rec["sent_at"],
                server_wait_s=starts[i] - pending.uploaded[i],
                download_s=arrived - starts[i],
                arrived_at=arrived,
                bytes_down=int(bytes_down),
            )
            if i in pending.close.late:
                rec["late"] = True
            self._arrivals[i][round_index] = self._tx_free[i] = arrived
            self._done[i] = round_index
            self.records.setdefault(i, []).append(rec)
        self.rounds.append(
            {"round": round_index, "closed_at": pending.close.closed_at, "aggregated_at": avail, "close_reason": pending.close.reason}
        )

    def finish(self) -> float:
        """The run's simulated wall-clock (every client holds the last aggregate); fills ``applied_at`` and ``blocked_s``."""
        last = len(self._avail) - 1
        end = 0.0
        for i in range(len(self.profiles)):
            self._advance(i, last)
            end = max(end, self._tx_free[i], self._up_free[i], self._compute_free[i])
        for recs in self.records.values():
            recs.sort(key=lambda r: r["round"])
            for k, rec in enumerate(recs):
                need = rec["ended_at"]
                # pipelined: the aggregate is needed when the client ends round + staleness (rounds it trains in a row)
                for j in range(1, self.staleness + 1):
                    nxt = recs[k + j] if k + j < len(recs) else None
                    if nxt is None or nxt["round"] != rec["round"] + j:
                        break
                    need = nxt["ended_at"]
                rec["applied_at"] = max(rec["arrived_at"], need)
                rec["blocked_s"] = rec["applied_at"] - need
        return end
