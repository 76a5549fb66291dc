"""Every driver runs the same algorithm: the real federation ends bitwise equal to the sequential reference.

The reference (:mod:`pl_parablock.reference`) drives the algorithm core over
all clients in one process, without transmitter, transport or Lightning. The
federation under test runs the real Lightning callback, transmitter threads,
service and aggregator: in one process (clients as threads over the
in-process transport) and as separate gRPC processes. Three clients on
different data shards, ``M = 4`` blocks or ``M = 1``, ascending and random
schedules, full and partial participation. Both must end with the same
server global and the same parameters on every client, bitwise.

Wrong variants tried on the drivers (each made a test here fail, then was restored):

* the strategy not dropping the optimizer state at the start of a round
  (``activate`` given no optimizers): every case;
* the strategy weighting every update by ``samples`` whatever the recipe
  says: ``sync-4-random-shard`` and ``parablock-1-random-sampled`` (tokens).

A driver cannot apply an aggregate late or early, or apply another version
than the round's: the core refuses (``AlgorithmError``). A server pull that
returned the block's current value instead of the round's version was *not*
caught here (in these runs no later round of the block closes before every
client pulled); GlobalState's holding rule is pinned in
tests/unit/core/test_algorithm.py.

The core's own rules (late application, rebase terms, the rebase's ``e``,
weights) are pinned against DESIGN's algorithm in tests/unit/core/test_algorithm.py;
a rule broken in the core breaks the reference and the federation alike, so
it is caught there, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pl_parablock.core.tensors import digest
from pl_parablock.fit import federate_in_process
from pl_parablock.reference import run_reference
from tests.helpers import tiny_recipe

CASES = {
    "sync-4-ascending": ["mode=sync"],
    "parablock-4-ascending": ["mode=parablock"],
    "parablock-4-random-sampled": ["mode=parablock", "blocks.schedule=random", "federation.clients_per_round=2"],
    "sync-4-random-shard": [
        "mode=sync",
        "blocks.schedule=random",
        "federation.weighting=shard",
        "data.partition.kind=dirichlet",
        "data.partition.alpha=0.5",
    ],
    "parablock-1": ["mode=parablock", "blocks.patterns=[.*]"],
    "sync-1-sampled": ["mode=sync", "blocks.patterns=[.*]", "federation.clients_per_round=2"],
    "sync-4-staggered": ["mode=sync", "blocks.assignment=staggered"],
    "parablock-2-staggered": ["mode=parablock", "blocks.assignment=staggered", "blocks.layers_per_block=2"],
    "parablock-4-staggered-sampled": ["mode=parablock", "blocks.assignment=staggered", "federation.clients_per_round=2"],
    "cyclic-4-ascending": ["mode=cyclic"],
    "cyclic-4-random": ["mode=cyclic", "blocks.schedule=random"],
    "parablock-4-adam": ["mode=parablock", "federation.server_optimizer.name=adam", "federation.server_optimizer.lr=0.01"],
    "sync-4-momentum-sampled": ["mode=sync", "federation.server_optimizer.name=momentum", "federation.clients_per_round=2"],
    "parablock-4-int8": ["mode=parablock", "federation.compression.codec=int8"],
    "sync-1-int4-sampled": ["mode=sync", "blocks.patterns=[.*]", "federation.compression.codec=int4", "federation.clients_per_round=2"],
    "parablock-1-int4-sampled": [
        "mode=parablock",
        "blocks.patterns=[.*]",
        "federation.compression.codec=int4",
        "federation.clients_per_round=2",
    ],
    "sync-4-topk-staggered": [
        "mode=sync",
        "blocks.assignment=staggered",
        "federation.compression.codec=topk",
        "federation.compression.fraction=0.05",
    ],
    "cyclic-4-fp8": ["mode=cyclic", "federation.compression.codec=fp8"],
    # staleness k (DESIGN §1.1): M = 4 and M = 2 (a block comes round again inside the window), sampled, damped
    "parablock-4-k2": ["mode=parablock", "federation.staleness=2"],
    "parablock-2-k2-sampled": ["mode=parablock", "blocks.layers_per_block=2", "federation.staleness=2", "federation.clients_per_round=2"],
    "parablock-2-k3-random": ["mode=parablock", "blocks.layers_per_block=2", "federation.staleness=3", "blocks.schedule=random"],
    # a slow emulated link: the full-duplex transmitter uploads rounds ahead while others still wait, so with sampling a
    # later round can be complete before an earlier one (the server closes them in order)
    "parablock-2-k2-sampled-slow-link": [
        "mode=parablock",
        "blocks.layers_per_block=2",
        "federation.staleness=2",
        "federation.clients_per_round=2",
        "link.uplink_mbps=2",
        "link.downlink_mbps=4",
        "link.latency_ms=5",
    ],
    "parablock-4-k3-staggered-damped": [
        "mode=parablock",
        "federation.staleness=3",
        "blocks.assignment=staggered",
        "federation.stale_mix=0.5",
    ],
    "parablock-1-random-sampled": [
        "mode=parablock",
        "blocks.patterns=[.*]",
        "federation.clients_per_round=2",
        "federation.weighting=tokens",
    ],
}


def recipe_for(tmp_path, overrides):
    return tiny_recipe(tmp_path, *overrides)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"{what}: {len(diff)} of {len(a)} tensors differ, e.g. {diff[:2]}"


@pytest.mark.parametrize("case", list(CASES))
def test_in_process_federation_equals_the_reference_bitwise(case, tmp_path):
    recipe = recipe_for(tmp_path, CASES[case])
    reference = run_reference(recipe)
    agg, runs, _ = federate_in_process(recipe)

    assert_same(agg.global_state(), reference.globals, "server global")
    for run in runs:
        assert_same(dict(run.module.named_parameters()), reference.clients[run.client_id], f"client {run.client_id}")
    # every client ends holding the global model, and the run trained
    for run in runs:
        assert run.strategy.final_metrics["blocks_sha256"] == digest(reference.globals)
    # the server's arrivals per round are the reference's
    server_rounds = agg.report()["rounds"]
    assert [r["clients"] for r in server_rounds] == [r["clients"] for r in reference.rounds]
    if "staggered" in case:  # several blocks move each round, each over the clients that trained it
        assert all(len(r["blocks"]) == min(len(r["clients"]), len(agg.partition)) for r in server_rounds)


def test_reference_moves_the_model(tmp_path):
    """Not a vacuous oracle: the reference trains, and clients that differ in data end apart before the last aggregate."""
    from pl_parablock.model.build import build_model

    recipe = recipe_for(tmp_path, ["mode=sync", "federation.rounds=2"])
    reference = run_reference(recipe)
    model, _ = build_model(recipe.model, recipe.seed)
    start = dict(model.named_parameters())
    changed = [n for n, v in reference.globals.items() if not torch.equal(v, start[n.removeprefix("model.")].detach())]
    assert changed


@pytest.mark.parametrize("case", ["parablock-4-random-sampled", "sync-1-int4-sampled"])
def test_grpc_process_federation_equals_the_reference_bitwise(case, tmp_path):
    recipe = recipe_for(tmp_path, CASES[case])
    reference = run_reference(recipe)
    path = tmp_path / "recipe.yaml"
    out = tmp_path / "grpc"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pl_parablock.fit", str(path), *CASES[case], f"output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    expected = digest(reference.globals)
    assert report["federation"]["globals_sha256"] == expected
    assert [c["blocks_sha256"] for c in report["clients"]] == [expected] * 3
    assert [r["clients"] for r in report["rounds"]] == [r["clients"] for r in reference.rounds]
    # the saved model is the server's global
    from transformers import AutoModelForCausalLM

    saved = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    names = {n: n.removeprefix("model.") for n in reference.globals}  # the LightningModule holds the HF model as `model`
    assert_same(reference.globals, {n: saved[m] for n, m in names.items()}, "saved model")


def test_a_client_starting_late_still_starts_at_round_0(tmp_path):
    """The server asks updates to retry until every client joined once (federation.gather_s), so participation stays the plan's.

    Wrong variant tried: ``federation.gather_s=0`` (no wait): the late client
    adopts round 0's aggregate early and the global differs from the reference.
    """
    import threading
    import time

    from pl_parablock.client.inprocess import InProcessTransport
    from pl_parablock.client.runner import prepare_client
    from pl_parablock.fit import _aggregator
    from pl_parablock.recipe.build import client_token, server_token
    from pl_parablock.server.service import FederationService

    recipe = recipe_for(tmp_path, CASES["parablock-4-random-sampled"])
    reference = run_reference(recipe)
    agg = _aggregator(recipe, progress=False)
    service = FederationService(agg, token=server_token(recipe))
    runs = [prepare_client(recipe, i, InProcessTransport(service, token=client_token(recipe, i))) for i in range(3)]
    late = next(i for i in range(3) if i not in agg.participants[0])  # not sampled in round 0: nothing would wait for it
    errors: list[BaseException] = []

    def fit(run, delay: float) -> None:
        time.sleep(delay)
        try:
            run.fit()
        except BaseException as exc:
            errors.append(exc)
            agg.shutdown()

    threads = [threading.Thread(target=fit, args=(r, 3.0 if r.client_id == late else 0.0)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert_same(agg.global_state(), reference.globals, "server global")
    assert not [e for r in runs for e in r.strategy.events if e["event"] == "synced"], "no client had to catch up"
