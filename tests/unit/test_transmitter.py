from __future__ import annotations

import threading

import pytest
import torch

from pl_parablock.errors import TransmitterError
from pl_parablock.federation.transport import Pulled, Pushed, Transport
from pl_parablock.transmitter import Handoff, Transmitter


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
