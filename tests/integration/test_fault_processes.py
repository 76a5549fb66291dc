"""Crashes of real processes on loopback: a client killed and restarted, the server killed and restarted.

These run in ``parablock``, where a crash can land with two rounds in flight
(the harder case); ``sync`` ran them too until the suite needed the time
(each takes 25-30 s of process start-up and crash recovery). Both modes meet
dropped, corrupted and delayed transfers in ``test_faults_modes.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = """
seed: 0
mode: sync
model:
  config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
           num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}
train: {local_steps: 2, lr: 3.0e-3, batch_size: 4, max_length: 64, threads: 1}
data: {num_samples: 120}
eval: {max_samples: 8, max_new_tokens: 4}
link: {latency_ms: 150}   # rounds of >= 0.3 s, so a crash lands mid-run
"""
LIMIT = 180


class Proc:
    """A pl_parablock.fit process whose output goes to a file we can watch."""

    def __init__(self, out: Path, name: str, *args: str) -> None:
        self.log = out / f"{name}.out"
        self._fh = open(self.log, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(
            [sys.executable, "-m", "pl_parablock.fit", *args], stdout=self._fh, stderr=subprocess.STDOUT, env=env, text=True
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = LIMIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not seen in {self.log}:\n{self.text()[-3000:]}")

    def wait(self, timeout: float = LIMIT) -> int:
        return self.p.wait(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        self.kill()
        self._fh.close()


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["parablock"])
def test_a_killed_client_is_dropped_then_restarted_and_catches_up(tmp_path, procs, mode):
    """Clients 2 and 3 are killed at round 3; client 2 restarts from its checkpoint and catches up, client 3 is gone for good.

    The server waits only for clients that took part in the last rounds: it
    exits soon after the live ones leave, not ``federation.timeout_s`` (60 s
    here) later, and its report names client 3 as never reported.
    """
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    common = [str(recipe), f"mode={mode}", f"output_dir={out}", "federation.clients=4", "federation.rounds=10", "federation.min_clients=2"]
    common += ["federation.round_timeout_s=1.5", "federation.timeout_s=60", "train.checkpoint_every=1"]
    common += ["federation.compression.codec=int8"]  # with error feedback: the restarted client resumes its upload residuals
    server = Proc(tmp_path, "server", *common, "--role", "server")
    procs.append(server)
    address = server.wait_for(r"listening on (\S+)").group(1)

    def client(i: int, name: str) -> Proc:
        p = Proc(tmp_path, name, *common, "--role", "client", "--client-id", str(i), "--server", address)
        procs.append(p)
        return p

    clients = [client(i, f"client{i}") for i in range(4)]
    server.wait_for(r"round   3/10")
    clients[2].kill()
    clients[3].kill()  # for good
    assert (out / "checkpoints" / "client_2.ckpt").exists()
    server.wait_for(r"round   6/10 .*2/4 clients")
    restarted = client(2, "client2-restarted")
    for p in [clients[0], clients[1], restarted]:
        assert p.wait() == 0, p.text()[-3000:]
    assert server.wait(timeout=30) == 0, "the server waited for the killed client:\n" + server.text()[-3000:]
    assert "client 3's report" not in server.text()

    report = json.loads((out / "report.json").read_text())
    assert report["federation"]["never_reported"] == [3] and report["federation"]["dropped"] == [3]
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(10))
    dropped = [r for r in rounds if r["arrived"] == 2]
    assert dropped and all("timeout" in r["close_reason"] for r in dropped)
    # no update applied twice: a round counts each client at most once, and only clients expected in it
    assert all(len(set(r["clients"])) == r["arrived"] <= 4 for r in rounds)
    events = report["client_reports"]["2"]["events"] if "client_reports" in report else None
    if events is None:
        events = json.loads((out / "clients" / "client_2.json").read_text())["events"]
    kinds = [e["event"] for e in events]
    assert "restored" in kinds and "synced" in kinds
    restored = next(e for e in events if e["event"] == "restored")
    assert restored.get("upload_residual_blocks", 0) >= 1, "the checkpoint carried what int8 dropped before the crash"
    synced = next(e for e in events if e["event"] == "synced")
    assert synced["to_round"] > synced["from_round"]


@pytest.mark.parametrize("mode", ["parablock"])
def test_a_killed_server_restarts_from_its_checkpoint_and_clients_reconnect(tmp_path, procs, mode):
    """In parablock the server dies with two rounds in flight (a client hands off round t+1 before t is aggregated)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    listen = f"127.0.0.1:{free_port()}"
    common = [
        str(recipe),
        f"mode={mode}",
        f"output_dir={out}",
        "federation.clients=2",
        "federation.rounds=8",
        "federation.checkpoint_every=1",
    ]
    common += ["federation.timeout_s=60"]
    server = Proc(tmp_path, "server", *common, "--role", "server", "--listen", listen)
    procs.append(server)
    server.wait_for(r"listening on")
    clients = []
    for i in range(2):
        clients.append(Proc(tmp_path, f"client{i}", *common, "--role", "client", "--client-id", str(i), "--server", listen))
        procs.append(clients[-1])
    server.wait_for(r"round   3/8")
    server.kill()
    again = Proc(tmp_path, "server-again", *common, "--role", "server", "--listen", listen)
    procs.append(again)
    resumed = int(again.wait_for(r"resuming the federation at round (\d+)/8").group(1))
    assert resumed >= 4
    for c in clients:
        assert c.wait() == 0, c.text()[-3000:]
    assert again.wait() == 0, again.text()[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == list(range(8)), "every round closed exactly once"
    assert all(r["arrived"] == 2 for r in report["rounds"])
    for i in range(2):
        events = json.loads((out / "clients" / f"client_{i}.json").read_text())["events"]
        assert any(e["event"] == "synced" for e in events), events
