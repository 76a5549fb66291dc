"""Real processes on loopback: the launcher's server + client processes, and separate roles."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

RECIPE = """
seed: 0
model:
  config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
           num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}
train: {local_steps: 2, lr: 3.0e-3, batch_size: 4, max_length: 64, threads: 1}
federation: {clients: 2, rounds: 4, timeout_s: 60}
data: {num_samples: 64}
eval: {max_samples: 8, max_new_tokens: 4}
"""
TIMEOUT = 240


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pl_parablock.fit", *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, **kw)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_launcher_runs_server_and_client_processes_over_grpc(recipe, tmp_path):
    out = tmp_path / "run"
    done = cli(str(recipe), f"output_dir={out}", "eval.evaluator=process")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round   4/4" in done.stdout and "comm hidden" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "parablock" and len(report["rounds"]) == 4 and len(report["clients"]) == 2
    assert all(r["arrived"] == 2 for r in report["rounds"])
    assert report["final"]["eval_loss"] is not None
    assert report["evaluator"]["reported"], "the launcher's evaluator process evaluated and saved the model"
    assert (out / "logs" / "evaluator.log").exists() and (out / "evaluator.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = tokenizer("### Instruction:\nhi\n### Response:\n", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(model(input_ids=ids).logits).all()
    for i in range(2):
        assert (out / "logs" / f"client_{i}.log").exists()
        client = json.loads((out / "clients" / f"client_{i}.json").read_text())
        assert client["client_id"] == i
        # the fast start: each client is a process forked from the fork server, which imported torch & co. for it
        assert client["process_start"] == {"forked": True, "preloaded": ["torch", "lightning", "transformers"]}, client["process_start"]


def test_separate_server_and_client_roles(recipe, tmp_path):
    out = tmp_path / "roles"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "pl_parablock.fit", str(recipe), f"output_dir={out}", "mode=sync", "--role", "server"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.match(r"listening on (127\.0\.0\.1:\d+)", line)
        assert match, line
        address = match.group(1)
        for i in range(2):
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pl_parablock.fit",
                        str(recipe),
                        f"output_dir={out}",
                        "mode=sync",
                        "--role",
                        "client",
                        "--client-id",
                        str(i),
                        "--server",
                        address,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                )
            )
        for c in clients:
            c.wait(TIMEOUT)
            assert c.returncode == 0, c.stdout.read() if c.stdout else ""
        rest, _ = server.communicate(timeout=60)
        assert server.returncode == 0, rest
        assert "eval loss" in rest
    finally:
        for p in [*clients, server]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            if p.stdout:
                p.stdout.close()
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "sync" and len(report["rounds"]) == 4
    assert report["final"]["model_dir"].endswith("model")
    # a client started on its own imports what it needs itself
    assert json.loads((out / "clients" / "client_0.json").read_text())["process_start"] == {"forked": False, "preloaded": []}


def test_bad_recipe_exits_2_with_one_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  local_stepz: 3\nfederation:\n  clients: 0\n")
    done = cli(str(bad))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "train.local_stepz" in done.stderr
    assert done.stderr.startswith("error: invalid recipe")


def test_an_unknown_codec_exits_2_naming_the_key(capsys):
    from pl_parablock.fit import main

    assert main(["federation.compression.codec=zstd"]) == 2
    err = capsys.readouterr().err
    assert "federation.compression.codec" in err and "zstd" in err and "Traceback" not in err


def test_unreachable_server_exits_2(recipe, tmp_path):
    t0 = time.monotonic()
    done = cli(
        str(recipe),
        f"output_dir={tmp_path / 'x'}",
        "federation.timeout_s=3",
        "--role",
        "client",
        "--client-id",
        "0",
        "--server",
        "127.0.0.1:9",
    )
    assert done.returncode == 2, done.stderr
    assert "cannot reach the federation server at 127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 60


def test_a_corrupt_client_checkpoint_exits_2_naming_it(recipe, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "client_0.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    done = cli(
        str(recipe), f"output_dir={out}", "train.checkpoint_every=1", "--role", "client", "--client-id", "0", "--server", "127.0.0.1:9"
    )
    assert done.returncode == 2, done.stderr
    assert "cannot resume from" in done.stderr and "client_0.ckpt" in done.stderr and "Traceback" not in done.stderr


def test_a_client_with_another_model_is_refused_and_exits_2(recipe, tmp_path):
    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.grpc_server import FederationServer
    from pl_parablock.server.service import FederationService

    agg = Aggregator(clients=2, rounds=2, mode="parablock")
    server = FederationServer(FederationService(agg))
    address = server.start()
    try:
        first = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pl_parablock.fit",
                str(recipe),
                f"output_dir={tmp_path / 'a'}",
                "--role",
                "client",
                "--client-id",
                "0",
                "--server",
                address,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while agg.partition is None and time.monotonic() < deadline:
            time.sleep(0.2)
        done = cli(str(recipe), f"output_dir={tmp_path / 'b'}", "seed=7", "--role", "client", "--client-id", "1", "--server", address)
        assert done.returncode == 2
        assert "does not match this federation" in done.stderr and "initial weights differ" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        first.kill()
        first.wait(10)
        server.stop()
