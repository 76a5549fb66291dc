from __future__ import annotations

import threading
import time

import pytest
import torch

from pl_parablock.client.transmitter import Handoff, Transmitter
from pl_parablock.client.transport import Pulled, Pushed, Transport
from pl_parablock.errors import ServerRestarted, TransmitterError, TransportError
from tests.helpers import wait_until


class ScriptedTransport(Transport):
    """A transport whose push/pull answers are scripted, to drive the thread."""

    def __init__(self, fail_round=None, reject_round=None, gate=None):
        super().__init__()
        self.fail_round = fail_round
        self.reject_round = reject_round
        self.gate = gate
        self.pushed = []

    def _unary(self, method, request, timeout):
        raise NotImplementedError

    def _stream_unary(self, method, messages, timeout):
        raise NotImplementedError

    def _unary_stream(self, method, request, timeout):
        raise NotImplementedError

    def push(self, header, tensors, timeout):
        self.pushed.append(header["round"])
        if header["round"] == self.fail_round:
            raise ConnectionError("link down")
        accepted = header["round"] != self.reject_round
        return Pushed(accepted, "accepted" if accepted else "wrong shape", 0.0, 10, status="accepted" if accepted else "rejected")

    def pull(self, client_id, round_index, timeout):
        if self.gate is not None:
            self.gate.wait(5)
        return Pulled(round_index % 2, round_index, {"w": torch.tensor([float(round_index)])}, 0.0, 0.0, 10)


def handoff(r):
    return Handoff(r, r % 2, "value", -1, 1.0, {"w": torch.zeros(1)})


def test_hand_offs_go_in_order_and_arrive_in_the_mailbox():
    tx = Transmitter(ScriptedTransport(), 0, timeout_s=5)
    for r in range(4):
        tx.send(handoff(r))
    got = [tx.wait(r, timeout=5).tensors["w"].item() for r in range(4)]
    assert got == [0.0, 1.0, 2.0, 3.0]
    assert tx.transport.pushed == [0, 1, 2, 3]
    tx.close()
    assert not tx.alive


def test_poll_does_not_block():
    gate = threading.Event()
    tx = Transmitter(ScriptedTransport(gate=gate), 0, timeout_s=5)
    tx.send(handoff(0))
    assert tx.poll(0) is None
    gate.set()
    assert tx.wait(0, timeout=5).round == 0
    tx.close()


def test_errors_in_the_thread_reach_the_training_thread():
    tx = Transmitter(ScriptedTransport(fail_round=1), 3, timeout_s=5)
    tx.send(handoff(0))
    tx.send(handoff(1))
    assert tx.wait(0, timeout=5).round == 0
    with pytest.raises(TransmitterError, match="client 3: transmitter thread failed in round 1: ConnectionError: link down") as err:
        tx.wait(1, timeout=5)
    assert isinstance(err.value.__cause__, ConnectionError)
    with pytest.raises(TransmitterError):
        tx.send(handoff(2))
    tx.close()


def test_a_rejected_update_is_an_error_with_the_servers_reason():
    tx = Transmitter(ScriptedTransport(reject_round=0), 0, timeout_s=5)
    tx.send(handoff(0))
    with pytest.raises(TransmitterError, match="rejected the update of round 0: wrong shape"):
        tx.wait(0, timeout=5)
    tx.close()


def test_wait_times_out():
    gate = threading.Event()
    tx = Transmitter(ScriptedTransport(gate=gate), 0, timeout_s=5)
    tx.send(handoff(0))
    with pytest.raises(TransmitterError, match="did not arrive within 0.2 s"):
        tx.wait(0, timeout=0.2)
    gate.set()
    tx.close()


class FlakyTransport(ScriptedTransport):
    """Loses the connection a few times, answers late, or turns out to be another server."""

    def __init__(self, push_failures=0, pull_failures=0, status="accepted", instance="A"):
        super().__init__()
        self.push_failures = push_failures
        self.pull_failures = pull_failures
        self.status = status
        self.instance = instance

    def push(self, header, tensors, timeout):
        self.pushed.append(header["round"])
        if self.push_failures:
            self.push_failures -= 1
            raise TransportError("connection reset")
        return Pushed(self.status != "late", self.status, 0.0, 10, status=self.status, instance=self.instance)

    def pull(self, client_id, round_index, timeout):
        if self.pull_failures:
            self.pull_failures -= 1
            raise TransportError("connection reset")
        return Pulled(round_index % 2, round_index, {"w": torch.zeros(1)}, 0.0, 0.0, 10, self.instance)


def test_lost_connections_are_retried_and_an_acknowledged_push_is_not_repeated(monkeypatch):
    monkeypatch.setattr("pl_parablock.client.transmitter.BACKOFF_S", (0.01, 0.05))
    transport = FlakyTransport(push_failures=2, pull_failures=2)
    tx = Transmitter(transport, 0, timeout_s=10, instance="A")
    tx.send(handoff(0))
    arrival = tx.wait(0, timeout=10)
    assert arrival.retries == 4
    assert transport.pushed == [0, 0, 0], "two lost pushes, one acknowledged; pull failures do not resend it"
    tx.close()


def test_a_late_update_is_not_an_error():
    tx = Transmitter(FlakyTransport(status="late"), 0, timeout_s=5, instance="A")
    tx.send(handoff(0))
    assert tx.wait(0, timeout=5).late
    tx.close()


def test_another_server_instance_stops_the_thread_with_server_restarted():
    tx = Transmitter(FlakyTransport(instance="B"), 0, timeout_s=5, instance="A")
    tx.send(handoff(0))
    with pytest.raises(TransmitterError, match="restarted") as err:
        tx.wait(0, timeout=5)
    assert isinstance(err.value.__cause__, ServerRestarted)
    tx.close()


def test_fetch_only_rounds_do_not_push():
    transport = FlakyTransport()
    tx = Transmitter(transport, 0, timeout_s=5, instance="A")
    tx.send(Handoff(0, 0, "none", -1, 0.0, None))
    assert tx.wait(0, timeout=5).bytes_up == 0
    assert transport.pushed == []
    tx.close()


def test_retries_give_up_at_the_timeout(monkeypatch):
    monkeypatch.setattr("pl_parablock.client.transmitter.BACKOFF_S", (0.05, 0.05))
    tx = Transmitter(FlakyTransport(push_failures=1000), 0, timeout_s=0.5, instance="A")
    tx.send(handoff(0))
    with pytest.raises(TransmitterError, match="connection reset"):
        tx.wait(0, timeout=5)
    tx.close()


def test_an_uploaded_block_is_released_while_the_aggregate_is_awaited():
    gate = threading.Event()
    tx = Transmitter(ScriptedTransport(gate=gate), 0, timeout_s=5)
    job = handoff(0)
    tx.send(job)
    for _ in range(500):  # the push happens at once; the pull waits at the gate
        if job.tensors is None:
            break
        threading.Event().wait(0.01)
    assert tx.transport.pushed == [0]
    assert job.tensors is None, "the hand-off's tensors must be dropped once the server has them"
    assert tx.poll(0) is None, "released before the aggregate arrived"
    gate.set()
    assert tx.wait(0, timeout=5).tensors["w"].item() == 0.0
    tx.close()


class GatedTransport(ScriptedTransport):
    """Pulls wait at a gate per round; pushes and pulls are logged in the order they begin and end."""

    def __init__(self, fail_push=None, fail_pull=None):
        super().__init__()
        self.gates = {r: threading.Event() for r in range(8)}
        self.events = []
        self.fail_push = fail_push
        self.fail_pull = fail_pull
        self.lock = threading.Lock()

    def log(self, what):
        with self.lock:
            self.events.append(what)

    def push(self, header, tensors, timeout):
        self.log(("push", header["round"]))
        if header["round"] == self.fail_push:
            raise ValueError("upload broke")
        return Pushed(True, "accepted", 0.01, 10)

    def pull(self, client_id, round_index, timeout):
        self.log(("pull", round_index))
        assert self.gates[round_index].wait(5)
        if round_index == self.fail_pull:
            raise ValueError("download broke")
        self.log(("pulled", round_index))
        return Pulled(round_index % 2, round_index, {"w": torch.tensor([float(round_index)])}, 0.02, 0.03, 10)


@pytest.mark.parametrize("duplex", [False, True])
def test_full_duplex_uploads_the_next_round_while_the_aggregate_is_awaited(duplex):
    transport = GatedTransport()
    tx = Transmitter(transport, 0, timeout_s=5, duplex=duplex)
    for r in range(3):
        tx.send(handoff(r))
    assert wait_until(lambda: ("pull", 0) in transport.events, 5)
    if duplex:
        assert wait_until(lambda: ("push", 2) in transport.events, 5), "rounds 1 and 2 upload while round 0 awaits its aggregate"
        assert ("pull", 1) not in transport.events, "one download at a time, in round order"
    else:
        threading.Event().wait(0.1)
        assert transport.events == [("push", 0), ("pull", 0)], "half duplex: round 1 waits for round 0's download"
    assert tx.poll(0) is None
    for r in (2, 1, 0):  # whatever order the server answers in, the arrivals are posted in round order
        transport.gates[r].set()
    got = [tx.wait(r, timeout=5) for r in range(3)]
    assert [a.round for a in got] == [0, 1, 2]
    assert [e for e in transport.events if e[0] == "pulled"] == [("pulled", 0), ("pulled", 1), ("pulled", 2)]
    a = got[1]
    assert (a.upload_s, a.server_wait_s, a.download_s, a.bytes_up, a.bytes_down) == (0.01, 0.02, 0.03, 10, 10)
    assert a.sent_at <= a.arrived_at
    tx.close()
    assert not tx.alive


@pytest.mark.parametrize("where", ["upload", "download"])
def test_full_duplex_errors_of_either_thread_reach_the_training_thread(where):
    transport = GatedTransport(fail_push=1 if where == "upload" else None, fail_pull=1 if where == "download" else None)
    for g in transport.gates.values():
        g.set()
    tx = Transmitter(transport, 4, timeout_s=5, duplex=True)
    # the error reaches the training thread at its next call: a send (on a loaded machine round 1 may fail before
    # round 2 is handed off) or a wait
    with pytest.raises(TransmitterError, match=f"client 4: transmitter thread failed in round 1: ValueError: {where} broke") as err:
        for r in range(3):
            tx.send(handoff(r))
        for r in range(3):
            tx.wait(r, timeout=5)
    assert isinstance(err.value.__cause__, ValueError)
    assert ("push", 2) not in transport.events or where == "download", "no upload starts after the upload thread failed"
    assert ("pull", 2) not in transport.events, "no download starts after a failure"
    with pytest.raises(TransmitterError):
        tx.send(handoff(3))
    tx.close(cancel_pending=True)
    assert not tx.alive


def test_full_duplex_close_finishes_the_queued_rounds_and_cancel_drops_them():
    transport = GatedTransport()
    for g in transport.gates.values():
        g.set()
    tx = Transmitter(transport, 0, timeout_s=5, duplex=True)
    for r in range(3):
        tx.send(handoff(r))
    tx.close()
    assert not tx.alive and [e for e in transport.events if e[0] == "pulled"] == [("pulled", r) for r in range(3)]
    assert [e.round for e in (tx.poll(0), tx.poll(1), tx.poll(2))] == [0, 1, 2]
    transport = GatedTransport()
    tx = Transmitter(transport, 0, timeout_s=5, duplex=True)
    for r in range(3):
        tx.send(handoff(r))
    assert wait_until(lambda: ("pull", 0) in transport.events, 5)
    transport.gates[0].set()  # the download in progress ends; nothing after it starts
    tx.close(cancel_pending=True)
    assert not tx.alive
    assert ("pull", 1) not in transport.events and tx.poll(1) is None


def test_full_duplex_a_lost_connection_is_retried_in_its_own_direction(monkeypatch):
    monkeypatch.setattr("pl_parablock.client.transmitter.BACKOFF_S", (0.01, 0.05))
    transport = FlakyTransport(push_failures=1, pull_failures=2)
    tx = Transmitter(transport, 0, timeout_s=10, instance="A", duplex=True)
    tx.send(handoff(0))
    tx.send(handoff(1))
    assert tx.wait(0, timeout=10).retries == 3
    assert tx.wait(1, timeout=10).retries == 0
    assert transport.pushed == [0, 0, 1]
    tx.close()


def test_full_duplex_takes_max_not_sum_of_upload_and_download():
    """Uploads of 0.1 s and downloads of 0.1 s: 5 rounds take about 0.6 s in full duplex, 1.0 s in half."""

    class Timed(ScriptedTransport):
        def push(self, header, tensors, timeout):
            threading.Event().wait(0.1)
            return Pushed(True, "accepted", 0.1, 10)

        def pull(self, client_id, round_index, timeout):
            threading.Event().wait(0.1)
            return Pulled(round_index % 2, round_index, {"w": torch.zeros(1)}, 0.0, 0.1, 10)

    took = {}
    for duplex in (False, True):
        tx = Transmitter(Timed(), 0, timeout_s=5, duplex=duplex)
        t0 = time.perf_counter()
        for r in range(5):
            tx.send(handoff(r))
        tx.wait(4, timeout=10)
        took[duplex] = time.perf_counter() - t0
        tx.close()
    assert took[False] >= 0.95
    assert took[True] < 0.9, took
