"""Whole federations through the launcher's entry point, in one process (clients as threads)."""

from __future__ import annotations

import json

import pytest

from pl_parablock.fit import main

RECIPE = """
seed: 0
model:
  config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4,
           num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}
blocks: {embeddings: true, head: true}
train: {local_steps: 4, lr: 3.0e-3, batch_size: 8, max_length: 64, threads: 1}
federation: {clients: 2, rounds: 24}
data: {num_samples: 400}
eval: {max_samples: 32, max_new_tokens: 8}
"""


def run(tmp_path, name: str, *overrides: str) -> dict:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / name
    assert main([str(recipe), f"output_dir={out}", *overrides, "--inprocess"]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    return {mode: run(tmp, mode, f"mode={mode}") for mode in ("sync", "parablock")}


def test_report_has_the_design_fields(pair):
    report = pair["parablock"]
    for key in ("mode", "wall_s", "rounds", "clients", "final", "totals", "link"):
        assert key in report
    assert report["mode"] == "parablock" and len(report["rounds"]) == 24
    rec = report["rounds"][3]
    assert (rec["expected"], rec["arrived"], rec["rejected"], rec["late"]) == (2, 2, 0, 0)
    assert "aggregation_s" in rec
    for c in rec["client_records"]:
        for field in ("compute_s", "upload_s", "server_wait_s", "download_s", "blocked_s", "bytes_up", "bytes_down", "loss"):
            assert field in c, field
        assert c["bytes_up"] > 0 and c["bytes_down"] > 0
    final = report["final"]
    assert final["loss"] is not None and final["eval_loss"] is not None and "exact_match" in final
    assert 0.0 <= final["exact_match"] <= 1.0
    assert report["link"]["emulated"] is False


def test_every_run_gets_its_pictures(pair):
    for report in pair.values():
        assert set(report["pictures"]) == {"timeline", "loss"}
        for path in report["pictures"].values():
            with open(path, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 0 < report["train_wall_s"] <= report["wall_s"]


def test_parablock_learns_and_ends_near_sync(pair):
    for report in pair.values():
        losses = [r["loss"] for r in report["rounds"]]
        assert losses[-1] < 0.8 * losses[0], "the loss must go down"
    sync, para = pair["sync"]["final"], pair["parablock"]["final"]
    # one-round staleness costs a little on the same rounds: within 10% (train) and 5% (eval)
    assert abs(para["loss"] - sync["loss"]) <= 0.10 * sync["loss"]
    assert abs(para["eval_loss"] - sync["eval_loss"]) <= 0.05 * sync["eval_loss"]
    assert para["loss"] != sync["loss"], "with several clients staleness makes parablock differ from sync"


def _exchanges_overlapping_the_next_compute(report: dict) -> dict[int, list[int]]:
    """Per client, the rounds ``t`` whose exchange (upload sent .. aggregate arrived) overlaps round ``t + 1``'s compute.

    Read from the clients' own timestamps (one clock per process), as an order of events: no duration is compared.
    """
    by_client: dict[int, dict[int, dict]] = {}
    for rnd in report["rounds"]:
        for c in rnd["client_records"]:
            by_client.setdefault(int(c["client_id"]), {})[int(rnd["round"])] = c
    out = {}
    for cid, recs in by_client.items():
        out[cid] = [
            t
            for t, rec in sorted(recs.items())
            if t + 1 in recs
            and rec["sent_at"] < recs[t + 1]["ended_at"]  # round t's upload began before round t+1's compute ended
            and recs[t + 1]["started_at"] < rec["arrived_at"]  # and round t+1's compute began before round t's aggregate came
        ]
    return out


def test_parablock_hides_communication_on_a_slow_link(tmp_path):
    """On a slow link parablock computes round t+1 while round t's update travels; sync never does.

    Asserted on the order of each client's recorded events, not on wall-clock ratios (a loaded
    machine stretches compute and communication unevenly): the emulated latency (2 x 100 ms per
    exchange) puts a floor under every exchange, so in parablock the next round's compute starts
    while an exchange is still under way; in sync every round starts after the previous round's
    aggregate arrived, by construction.
    """
    link = ["blocks.embeddings=false", "blocks.head=false", "train.local_steps=8", "federation.rounds=12"]
    link += ["link.latency_ms=100", "eval.max_samples=8"]
    sync = run(tmp_path, "sync", "mode=sync", *link)
    para = run(tmp_path, "para", "mode=parablock", *link)
    for report in (sync, para):
        assert report["link"]["emulated"] and "emulated" in report["link"]["description"]
        assert report["totals"]["comm_s"] > 0
        assert all(c["arrived_at"] <= c["applied_at"] for r in report["rounds"] for c in r["client_records"])
    assert not any(_exchanges_overlapping_the_next_compute(sync).values()), "sync waits for each aggregate before the next round"
    for rnd, nxt in zip(sync["rounds"], sync["rounds"][1:]):
        starts = {int(c["client_id"]): c["started_at"] for c in nxt["client_records"]}
        assert all(c["applied_at"] <= starts[int(c["client_id"])] for c in rnd["client_records"]), "sync applies round t, then begins t + 1"
    overlapping = _exchanges_overlapping_the_next_compute(para)
    assert len(overlapping) == 2 and all(overlapping.values()), f"no exchange overlapped the next round's compute: {overlapping}"


def test_fedavg_trains_every_parameter_each_round(tmp_path):
    report = run(tmp_path, "fedavg", "mode=fedavg", "federation.rounds=3")
    assert report["federation"]["blocks"] == ["all"]
    assert [r["block"] for r in report["rounds"]] == [0, 0, 0]


def test_bfloat16_on_the_wire_halves_the_bytes(tmp_path):
    full = run(tmp_path, "fp32", "federation.rounds=3", "eval.max_samples=8")
    half = run(tmp_path, "bf16", "federation.rounds=3", "eval.max_samples=8", "federation.wire_dtype=bfloat16")
    ratio = half["totals"]["bytes_up"] / full["totals"]["bytes_up"]
    assert 0.45 < ratio < 0.6, ratio
    assert all(c["kind"] == "delta" for r in half["rounds"] for c in r["client_records"])
    assert half["final"]["loss"] < half["rounds"][0]["loss"]
