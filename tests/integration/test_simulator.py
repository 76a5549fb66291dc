"""The simulator drives the same core as the federation: the same global model, bitwise; and it stays lean at 1000 clients.

The simulator (:mod:`pl_parablock.simulation`) runs virtual clients on one
shared model: a client not sampled holds no core and no tensor until it is
sampled again, when its core is rebuilt in the state skipping would have
left. The reference (:mod:`pl_parablock.reference`) gives every client its
own model and core and drives every round of every client; the process
federation is pinned to the reference in test_reference.py. Here the
simulator's global must equal both, bitwise, on full participation and
sampling, several blocks and one, kept optimizer state, LoRA, clipping and
packing, every codec with error feedback both ways, staggered and cyclic;
and, against the in-process federation, what only the server runs (robust
aggregation, ``clip_norm``, ``max_update_norm``).

Wrong variants tried on the simulator (each made a test here fail, then was restored):

* a rebuilt client adopting the current global of every block (not, in
  ``parablock``, the previous version of the block round ``t − 1`` changed);
* the shared block not restored to the global after a client trained;
* the kept optimizer state not loaded back for the client that owns it;
* a client's data position not kept between its rounds;
* the round's updates added in another order than the clients' ids;
* a materialized client's core given fresh upload residuals, or a retired
  client dropping its residuals (the int8/int4/topk sampled cases and
  cyclic fp8 with M = 2 fail; full participation never retires a client);
* the server's broadcast residual dropped after every round (every case
  with a lossy download fails);
* a client forming g + D on the current global instead of the version it
  holds (the parablock int8, int4-download k = 2 and topk cases fail);
* the values replaced in the last k rounds kept by count, not by round (the
  staggered cases fail: a staggered round replaces several blocks);
* against the in-process federation: robust rules summed as a weighted
  mean (median of 3, trimmed mean fail), no clipping, a clipped value
  update scaled as a value instead of as its delta, no norm bound (the
  clip cases and the norm-bound test fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pl_parablock.core.tensors import digest
from pl_parablock.fit import federate_in_process
from pl_parablock.reference import run_reference
from pl_parablock.simulate import main as simulate_main
from pl_parablock.simulation.driver import run_simulation
from tests.helpers import tiny_recipe
from tests.integration.test_reference import CASES as REFERENCE_CASES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    "parablock-4-random-sampled": REFERENCE_CASES["parablock-4-random-sampled"],
    "parablock-2-sampled-one": ["mode=parablock", "blocks.layers_per_block=2", "federation.clients=5", "federation.clients_per_round=1"],
    "parablock-1-random-sampled-tokens": [
        "mode=parablock",
        "blocks.patterns=[.*]",
        "federation.clients_per_round=2",
        "federation.weighting=tokens",
    ],
    "fedavg-ffa-lora-sampled": ["mode=fedavg", "model.peft.method=ffa_lora", "federation.clients_per_round=2"],
    "parablock-kept-optimizer-state-sampled": ["mode=parablock", "train.keep_optimizer_state=true", "federation.clients_per_round=2"],
    "parablock-lora-sampled": ["mode=parablock", "model.peft.method=lora", "federation.clients_per_round=2"],
    "cyclic-4-random": REFERENCE_CASES["cyclic-4-random"],
    "parablock-2-k2-sampled": REFERENCE_CASES["parablock-2-k2-sampled"],
    "parablock-2-k3-damped": ["mode=parablock", "blocks.layers_per_block=2", "federation.staleness=3", "federation.stale_mix=0.5"],
    "parablock-4-adam-sampled": ["mode=parablock", "federation.server_optimizer.name=adam", "federation.clients_per_round=2"],
    # every codec with error feedback (DESIGN §1.1 "The global is exact"): the clients' upload residuals, kept by each
    # virtual client across its retirement, and the server's broadcast residual, each client forming g + D
    "parablock-4-int8-ef-sampled": ["mode=parablock", "federation.compression.codec=int8", "federation.clients_per_round=2"],
    "parablock-4-int8-up-only-sampled": [
        "mode=parablock",
        "federation.compression.codec=int8",
        "federation.compression.download=none",
        "federation.clients_per_round=2",
    ],
    "parablock-4-int8-server-lr-sampled": [
        "mode=parablock",
        "federation.compression.codec=int8",
        "federation.server_lr=0.5",
        "federation.clients_per_round=2",
    ],
    "sync-1-int4-sampled": REFERENCE_CASES["sync-1-int4-sampled"],
    "parablock-1-int4-sampled": REFERENCE_CASES["parablock-1-int4-sampled"],
    "parablock-4-int4-down-k2-sampled": [
        "mode=parablock",
        "federation.compression.codec=int8",
        "federation.compression.download=int4",
        "federation.staleness=2",
        "federation.clients_per_round=2",
    ],
    "sync-4-topk-staggered": REFERENCE_CASES["sync-4-topk-staggered"],
    "parablock-4-topk-staggered-sampled": [
        "mode=parablock",
        "blocks.assignment=staggered",
        "federation.compression.codec=topk",
        "federation.compression.fraction=0.05",
        "federation.clients_per_round=2",
    ],
    # M = 2: a client's block comes round again two turns later, so its residual of that block is used again
    "cyclic-2-fp8": ["mode=cyclic", "blocks.layers_per_block=2", "federation.compression.codec=fp8"],
    "cyclic-4-ascending": REFERENCE_CASES["cyclic-4-ascending"],
    "sync-4-staggered": REFERENCE_CASES["sync-4-staggered"],
    "parablock-2-staggered": REFERENCE_CASES["parablock-2-staggered"],
    "parablock-4-k3-staggered-damped-sampled": [
        "mode=parablock",
        "federation.staleness=3",
        "blocks.assignment=staggered",
        "federation.stale_mix=0.5",
        "federation.clients_per_round=2",
    ],
    "sync-all-dirichlet-shard-clip-packing": [
        "mode=sync",
        "blocks.schedule=random",
        "federation.weighting=shard",
        "data.partition.kind=dirichlet",
        "data.partition.alpha=0.5",
        "train.gradient_clip_val=0.5",
        "train.packing=true",
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_simulators_global_equals_the_references_bitwise(case, tmp_path):
    recipe = tiny_recipe(tmp_path, *CASES[case])
    reference = run_reference(recipe)
    sim = run_simulation(recipe)

    assert digest(sim.globals) == digest(reference.globals)
    assert [r["clients"] for r in sim.server["rounds"]] == [r["clients"] for r in reference.rounds]
    # lean: a core only for a client with a round in flight
    f = recipe.federation  # a client stays in memory while a round it trained is in its window (k rounds)
    assert sim.peak_clients_in_memory <= min(f.clients, (f.clients_per_round or f.clients) * f.staleness)


def test_a_natural_partition_reads_each_clients_own_file(tmp_path):
    from tests.helpers import ALPACA_ROWS, write_jsonl

    paths = [
        write_jsonl(
            tmp_path / f"client{i}.jsonl",
            [dict(r, instruction=f"{r['instruction']} ({i}-{k})") for k in range(4 + 3 * i) for r in ALPACA_ROWS],
        )
        for i in range(3)
    ]
    natural = ["data.format=alpaca", "data.partition.kind=natural", f"data.client_paths=[{','.join(paths)}]", "federation.weighting=shard"]
    recipe = tiny_recipe(tmp_path, "mode=parablock", "federation.clients_per_round=2", *natural)
    assert digest(run_simulation(recipe).globals) == digest(run_reference(recipe).globals)


FEDERATION_CASES = {
    "parablock-4-random-sampled": CASES["parablock-4-random-sampled"],
    # uploads as bfloat16 deltas (the reference sends them unrounded, the federation and the simulator round them)
    "parablock-bf16-wire-sampled": ["mode=parablock", "federation.wire_dtype=bfloat16", "federation.clients_per_round=2"],
    "parablock-4-int8-ef-sampled": CASES["parablock-4-int8-ef-sampled"],
    "parablock-1-int4-sampled": CASES["parablock-1-int4-sampled"],
    # what only the server runs (the reference does not): robust rules over the kept deltas, clipping, a norm bound
    "parablock-4-median-sampled": [
        "mode=parablock",
        "federation.aggregation=median",
        "federation.clients=5",
        "federation.clients_per_round=3",
    ],
    "sync-4-trimmed-mean-int8": [
        "mode=sync",
        "federation.clients=4",
        "federation.aggregation=trimmed_mean",
        "federation.trim_fraction=0.25",
        "federation.compression.codec=int8",
    ],
    "parablock-4-clip-bounded-sampled": [
        "mode=parablock",
        "federation.clip_norm=0.05",
        "federation.max_update_norm=100",
        "federation.clients_per_round=2",
    ],
    "sync-1-clip-int4-sampled": [
        "mode=sync",
        "blocks.patterns=[.*]",
        "federation.clip_norm=0.05",
        "federation.compression.codec=int4",
        "federation.clients_per_round=2",
    ],
}


@pytest.mark.parametrize("case", list(FEDERATION_CASES))
def test_the_simulators_global_equals_the_in_process_federations_bitwise(case, tmp_path):
    recipe = tiny_recipe(tmp_path, *FEDERATION_CASES[case])
    agg, _, _ = federate_in_process(recipe)
    sim = run_simulation(recipe)
    real = agg.report()
    assert sim.server["globals_sha256"] == real["globals_sha256"]
    assert [r["clients"] for r in sim.server["rounds"]] == [r["clients"] for r in real["rounds"]]
    assert [r["blocks"] for r in sim.server["rounds"]] == [r["blocks"] for r in real["rounds"]]
    assert [r["clipped"] for r in sim.server["rounds"]] == [r["clipped"] for r in real["rounds"]]
    if "clip" in case:  # not vacuous: the bound clips
        assert any(r["clipped"] for r in real["rounds"])


def test_an_update_past_the_norm_bound_stops_the_simulation_as_it_stops_the_real_client(tmp_path):
    """The server refuses it; the real client's transmitter raises, and the simulator stops with the server's reason."""
    from pl_parablock.errors import FederationError

    bound = ["mode=sync", "federation.max_update_norm=1e-6", "federation.rounds=2"]
    reason = r"the server rejected the update of round 0: update norm .* exceeds the bound 1e-06"
    with pytest.raises(FederationError, match="client 0: " + reason):
        run_simulation(tiny_recipe(tmp_path, *bound))
    with pytest.raises(FederationError, match=reason):
        federate_in_process(tiny_recipe(tmp_path, *bound, output="fed"))


def test_the_simulate_command_ends_on_the_grpc_federations_model_and_reports_like_fit(tmp_path, capsys):
    """One small case end to end: ``python -m pl_parablock.fit`` (gRPC processes) and ``python -m pl_parablock.simulate``."""
    from pl_parablock.report import main as report_main

    overrides = ["mode=sync", "federation.clients=2", "federation.clients_per_round=1", "federation.rounds=3"]
    tiny_recipe(tmp_path, *overrides)  # writes tmp_path/recipe.yaml
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    recipe = str(tmp_path / "recipe.yaml")
    fit = subprocess.Popen(
        [sys.executable, "-m", "pl_parablock.fit", recipe, *overrides, f"output_dir={tmp_path / 'fit'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert simulate_main([recipe, *overrides, f"output_dir={tmp_path / 'simulate'}", "--quiet"]) == 0
        summary = capsys.readouterr().out
        out, _ = fit.communicate(timeout=300)
    finally:
        if fit.poll() is None:
            fit.kill()
            fit.wait()
    assert fit.returncode == 0, out[-3000:]
    real = json.loads((tmp_path / "fit" / "report.json").read_text())
    sim = json.loads((tmp_path / "simulate" / "report.json").read_text())
    assert sim["federation"]["globals_sha256"] == real["federation"]["globals_sha256"]
    assert [r["clients"] for r in sim["rounds"]] == [r["clients"] for r in real["rounds"]]
    # the same report, its clock labelled simulated; the same model output
    assert sim["clock"]["simulated"] is True and "clock" not in real
    for key in ("mode", "wall_s", "train_wall_s", "rounds", "clients", "final", "totals", "link", "federation"):
        assert key in sim, key
    assert sim["final"]["loss"] is not None and sim["final"]["eval_loss"] is not None
    assert "(simulated clock)" in summary
    from transformers import AutoModelForCausalLM

    a = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "fit" / "model").named_parameters())
    b = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "simulate" / "model").named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "simulate" / "timeline.png").is_file()
    # `python -m pl_parablock.report SIM REAL` compares them
    assert report_main([str(tmp_path / "simulate"), str(tmp_path / "fit"), "-o", str(tmp_path / "c.png")]) == 0
    table = capsys.readouterr().out
    clock_row = next(line for line in table.splitlines() if line.strip().startswith("clock"))
    assert "simulated" in clock_row and "measured" in clock_row


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["federation.clients_per_round=4"], "federation.clients_per_round"),
        (["simulation.profile.compute_factor=-1"], "simulation.profile.compute_factor"),
        (["simulation.profile.uplink_mbps=[1, 0, 1]"], "simulation.profile.uplink_mbps[1]"),
        (["train.precision=bf16-mixed"], "train.precision"),
    ],
)
def test_bad_input_is_one_message_naming_the_key_and_exit_2(overrides, key, tmp_path, capsys):
    tiny_recipe(tmp_path)
    rc = simulate_main([str(tmp_path / "recipe.yaml"), *overrides, f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and key in err and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_profile_csv_that_does_not_match_the_clients_exits_2(tmp_path, capsys):
    csv = tmp_path / "links.csv"
    csv.write_text("compute_factor,uplink_mbps\n1,10\n2,20\n")
    tiny_recipe(tmp_path)
    rc = simulate_main([str(tmp_path / "recipe.yaml"), f"simulation.profile.csv={csv}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "`simulation.profile.csv`" in err and "2 rows for 3 clients" in err


def test_a_straggler_past_the_round_timeout_is_late_and_left_out(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        "mode=sync",
        "federation.rounds=3",
        "federation.round_timeout_s=0.5",
        "federation.min_clients=2",
        "simulation.profile.compute_factor=[1, 1, 1000]",
        "simulation.aggregation_s=0.01",
    )
    sim = run_simulation(recipe)
    rounds = sim.server["rounds"]
    assert [r["clients"] for r in rounds] == [[0, 1]] * 3
    assert [r["late"] for r in rounds] == [1, 1, 1]
    assert all("timeout" in r["close_reason"] for r in rounds)
    late = [rec for rec in sim.server["client_reports"]["2"]["rounds"]]
    assert len(late) == 3 and all(rec.get("late") for rec in late)


def test_a_thousand_virtual_clients_run_lean(tmp_path):
    """1000 clients, 5 per round, a few rounds: quick, and only the sampled clients ever hold a core or a block."""
    recipe = tiny_recipe(
        tmp_path,
        "mode=parablock",
        "federation.clients=1000",
        "federation.clients_per_round=5",
        "federation.rounds=3",
        "train.local_steps=1",
        "data.num_samples=2000",
        "simulation.profile.uplink_mbps={distribution: lognormal, median: 20, spread: 1}",
        "simulation.profile.downlink_mbps={distribution: lognormal, median: 50, spread: 1}",
        "simulation.profile.compute_factor={distribution: lognormal, median: 1, spread: 0.5}",
    )
    start = time.perf_counter()
    sim = run_simulation(recipe)
    took = time.perf_counter() - start
    assert took < 60, f"1000 virtual clients took {took:.1f} s"
    assert sim.peak_clients_in_memory <= 5
    assert len(sim.server["rounds"]) == 3 and all(r["arrived"] == 5 for r in sim.server["rounds"])
    assert sim.wall_s > 0 and sim.steps == 15
    assert os.path.isfile(os.path.join(recipe.output_dir, "model", "config.json"))


SIM_RECIPES = sorted(os.listdir(os.path.join(ROOT, "recipes", "sim")))


@pytest.mark.parametrize("name", [n for n in SIM_RECIPES if n.endswith(".yaml")])
def test_a_shipped_simulation_recipe_runs_small_and_on_a_local_checkpoint(name, tmp_path, fixture_files, capsys):
    """Its own 64 clients, 8 per round and heterogeneous links; two rounds of one step, here on the tiny local checkpoint."""
    path = os.path.join(ROOT, "recipes", "sim", name)
    small = ["federation.rounds=2", "train.local_steps=1", "train.max_length=64", "train.threads=1", "eval.max_samples=4"]
    checkpoint = ["model.config=null", f"model.path={fixture_files['model']}", "data.num_samples=512"]
    rc = simulate_main([path, *small, *checkpoint, f"output_dir={tmp_path / 'run'}", "--quiet"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["federation"]["clients"] == 64 and [r["expected"] for r in report["rounds"]] == [8, 8]
    assert report["clock"]["simulated"] is True and "lognormal" not in report["link"]["description"]
    assert report["final"]["model_format"] == "full" and report["final"]["eval_loss"] is not None
