"""``benchmarks/startup.py --checkpoint``: the start-up of a real-size checkpoint vs the same model built from its config.

The model has SmolLM-135M's shape (Llama: hidden 576, 30 layers, 9 heads / 3
KV heads, intermediate 1536, vocabulary 49152; 134.5M parameters, 538 MB in
float32), built from a config with the project's offline tokenizer and
saved with ``save_pretrained`` to a temporary folder (nothing is downloaded).
Two short federations run through the real launcher (2 clients, 2 rounds, 1
local step, batch 1, 32 tokens, blocks of 10 layers, embeddings and head
frozen): ``model.path`` pointing at the checkpoint, and ``model.config``
with the same shape.

Per variant: ``launch_to_round1_s`` and the phases of the client that set
the federation's initial state (its log's timestamps, seconds since the
launch): ``imported`` (its first log line: imports and reading its data),
``model_ready`` (the model built or loaded, the Trainer set up: the line
that lists the blocks), ``joined`` (the fingerprint hashed, the join, the
initial state uploaded to the server, the gather), ``round1`` (round 1's
start). ``in_process`` times the pieces alone in this process: building or
loading the model, hashing it for its fingerprint, and a server in this
process taking its initial state (``server_takes_state_s``: the blocks
framed, received, checked and installed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import time
from typing import Any

from _common import say
from startup import launch

SMOLLM_135M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
RECIPE = """
seed: 0
model: {MODEL}
blocks: {{layers_per_block: 10, embeddings: false, head: false}}
train: {{local_steps: 1, batch_size: 1, max_length: 32, lr: 1.0e-4}}
federation: {{clients: 2, rounds: 2, timeout_s: 600}}
data: {{num_samples: 64}}
eval: {{max_samples: 4, max_new_tokens: 2}}
"""


def _save_checkpoint(folder: str) -> dict[str, Any]:
    from pl_parablock.model.build import build_model
    from pl_parablock.recipe.schema import ModelSection

    t0 = time.perf_counter()
    model, tokenizer = build_model(ModelSection(config=dict(SMOLLM_135M)), 0)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = time.perf_counter() - t0
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*")))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round(size / 1e6, 1),
        "build_from_config_s": round(built, 2),
        "save_s": round(saved, 2),
    }


def _in_process(folder: str) -> dict[str, float]:
    """Build, load and fingerprint the model alone, in this process."""
    from pl_parablock.client.session import model_fingerprint
    from pl_parablock.core.blocks import partition_model
    from pl_parablock.model.build import build_model
    from pl_parablock.recipe.schema import ModelSection

    out = {}
    t0 = time.perf_counter()
    build_model(ModelSection(config=dict(SMOLLM_135M)), 0)
    out["build_from_config_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    model, _ = build_model(ModelSection(config=None, path=folder), 0)
    out["load_checkpoint_s"] = round(time.perf_counter() - t0, 2)
    partition = partition_model(model, layers_per_block=10)
    t0 = time.perf_counter()
    fingerprint = model_fingerprint(model, partition, "parablock")
    out["fingerprint_hash_s"] = round(time.perf_counter() - t0, 2)
    out["server_takes_state_s"] = _server_takes_state(model, partition, fingerprint)
    return out


def _server_takes_state(model: Any, partition: Any, fingerprint: dict[str, Any]) -> float:
    """The initial state of every block sent to a server in this process until it holds it (framing, checks, install)."""
    from pl_parablock.client.inprocess import InProcessTransport
    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.service import FederationService

    params = dict(model.named_parameters())
    state = {n: params[n].detach() for n in partition.param_names}
    aggregator = Aggregator(clients=2, rounds=2)
    transport = InProcessTransport(FederationService(aggregator))
    assert transport.join(0, fingerprint, 60)["need_state"]
    t0 = time.perf_counter()
    transport.upload_state(0, state, 600)
    took = time.perf_counter() - t0
    assert aggregator.versions() == [-1] * len(partition)
    aggregator.shutdown()
    return round(took, 2)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _phases(log: str, launched: float) -> dict[str, float]:
    marks = {"imported": r"training records", "model_ready": r"blocks over", "joined": r"joined via", "round1_end": r"round 1/"}
    out: dict[str, float] = {}
    with open(log, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = _STAMP.match(line)
            if not m:
                continue
            at = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for name, pattern in marks.items():
                if name not in out and re.search(pattern, line):
                    out[name] = round(at - launched, 2)
    return out


def checkpoint(args: argparse.Namespace, work: str) -> dict[str, Any]:
    folder = os.path.join(work, "smollm-135m-shape")
    made = _save_checkpoint(folder)
    say(json.dumps({"checkpoint": made}))
    variants: dict[str, Any] = {}
    for name, model in (("checkpoint", json.dumps({"config": None, "path": folder})), ("config", json.dumps({"config": SMOLLM_135M}))):
        recipe = os.path.join(work, f"{name}.yaml")
        with open(recipe, "w", encoding="utf-8") as fh:
            fh.write(RECIPE.format(MODEL=model))
        runs = []
        for i in range(args.runs):
            out = os.path.join(work, f"{name}{i}")
            launched = time.time()
            run = launch(recipe, [], fork_server=True, output_dir=out)
            with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
                initializer = min(json.load(fh)["federation"]["joined"])
            logs = {int(p.rsplit("_", 1)[1][:-4]): _phases(p, launched) for p in glob.glob(os.path.join(out, "logs", "client_*.log"))}
            run["client_phases"] = {str(k): v for k, v in sorted(logs.items())}
            run["initializer"] = initializer
            runs.append(run)
            say(json.dumps({name: run}))
        variants[name] = runs
    return {"benchmark": "startup-checkpoint", "checkpoint": made, "in_process": _in_process(folder), "variants": variants}
