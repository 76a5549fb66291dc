"""Staleness: sync and parablock at k = 1, 2, 3 on links where communication is 1, 2 and 4 x computation, and what k costs in loss.

    python benchmarks/staleness.py [--quick | --smoke] [--clients 2] [--rounds N] [--ratios 1,2,4] [--seeds N] [--output DIR]

``federation.staleness: k`` (DESIGN §1.1 "Staleness k") lets a client run
``k`` rounds ahead of the last aggregate it applied; with ``k >= 2`` its
transmitter is full duplex (round ``t + 1`` uploads while round ``t`` waits
for the server and downloads). In steady state a round then lasts
``max(compute, upload, download)`` instead of ``max(compute, upload +
server wait + download)`` (``k = 1``) or ``compute + upload + server wait +
download`` (sync).

1. Time (real process federations, as ``overlap.py``: the launcher's
   ``main`` with the gRPC server in this process and one process per client,
   on loopback through the emulated link). A calibration (a short ``sync``
   run without emulation) measures a round's compute and bytes. For each
   comm/compute ratio the link keeps the quickstart's shape (the downlink
   twice the uplink's rate, 20 ms latency, 2 ms where the budget is too
   small for 20) with the rates set so that a round's upload + download
   (with the latency and what loopback costs alone) takes ``ratio x
   compute``. At each ratio ``sync`` and ``parablock`` at ``k = 1, 2, 3`` run
   on that link, the order reversed from one ratio to the next (sync, 1, 2, 3;
   then 3, 2, 1, sync; ...), so that a machine whose speed drifts does not
   always favour the same setting. Per row: ``staleness`` (0 for sync),
   ``comm_over_compute`` (what the sync run of the ratio measured: its
   median upload + server wait + download over its compute per round),
   ``round_s`` (median time between consecutive round starts of a client,
   the first two rounds left out), ``ideal_round_s`` (every bound from the
   sync run of the same ratio, never from the run it judges: ``max(compute,
   upload, download)`` for ``k >= 2``, ``max(compute, upload + server wait +
   download)`` for ``k = 1``, ``compute + upload + server wait + download``
   for sync; medians per client-round), ``efficiency`` (``ideal_round_s /
   round_s``) and ``speedup_vs_sync`` (sync's ``round_s`` over the row's).
   Besides: each run's own medians of compute, upload, server wait and
   download, ``round_vs_k1`` and ``window_bound_s`` (``comm / k``: a client
   must have applied round ``t`` before round ``t + k + 1`` begins, so ``k``
   rounds cannot be shorter than one round trip; it exceeds
   ``ideal_round_s`` only when the server's wait is long).
2. Loss (the simulator, :func:`pl_parablock.simulation.driver.run_simulation`:
   the same recipe, every driver bitwise equal): the final eval loss of the
   global model with ``k = 1, 2, 3`` divided by sync's, seed by seed, over
   ``--seeds`` seeds (mean and std). With the process runs' 4 blocks no block
   comes round again inside a window of ``k <= 3`` rounds, so the rebase is a
   plain replacement and damping (``federation.stale_mix``) changes nothing;
   damping is therefore measured with 2 blocks (two layers each), where
   ``k >= 2`` trains a block again before its aggregate arrives: sync, ``k =
   2, 3`` undamped and with ``stale_mix`` 0.5. ``--quick`` trains a narrower
   model (64 wide, records of 64 tokens) for 24 rounds here, the full form
   the timed runs' model for 48.
3. Memory: the block copies a client holds at its peak, counted by driving
   the core (:class:`~pl_parablock.core.client.ClientCore`) through the
   plan with each aggregate applied as late as the rule allows: one transfer
   buffer per round in flight (its upload until sent, then its downloaded
   aggregate until applied; at most ``k + 1`` while the training thread
   waits at a round boundary) plus the hand-off copies the core keeps for
   the rebase. A count, not an RSS reading: a block (0.74 MB here) is lost
   in a client process's RSS noise.

The last output line is JSON: ``{"rows": [...], "loss": [...], "memory":
[...], ...}``; ``rows`` as above, ``loss`` as ``{staleness, damping,
stale_mix, blocks, seeds, mean, std}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's package, not an installed one
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # and its client processes'

from _common import SMALL_LLAMA, finish, machine, median, say  # noqa: E402
from overlap import SMOKE_MODEL, calibrate, client_rounds, comm_of, compute_per_round, launch, recipe_text, summarize  # noqa: E402

LATENCY_MS = 20.0  # the quickstart's link: 16 Mbit/s up, 32 down, 20 ms
DOWN_OVER_UP = 2.0
KS = (1, 2, 3)
DAMPING = 0.5
PHASES = ("compute_s", "upload_s", "server_wait_s", "download_s")


def link_for(ratio: float, cal: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's link shape, its rates set so that a round's upload + download take ``ratio`` x compute."""
    target = ratio * cal["compute_s"]
    latency = LATENCY_MS
    budget = target - cal["comm_s_unemulated"] - 2 * latency / 1000
    if budget <= 0.4 * target:
        latency = 2.0
        budget = target - cal["comm_s_unemulated"] - 2 * latency / 1000
    budget = max(budget, 0.2 * target)  # the loopback alone is almost as slow as the target: a fast link
    up = 8 * (cal["bytes_up"] + cal["bytes_down"] / DOWN_OVER_UP) / budget / 1e6
    return {
        "uplink_mbps": round(up, 2),
        "downlink_mbps": round(up * DOWN_OVER_UP, 2),
        "latency_ms": latency,
        "target_comm_s": round(target, 4),
    }


def phases(report: dict[str, Any], skip: int = 2) -> dict[str, float]:
    """Medians per client-round (the first ``skip`` rounds left out) of compute, upload, server wait, download and their comm."""
    recs = [rec for recs in client_rounds(report).values() for t, rec in enumerate(recs) if t >= skip]
    out = {k: median(float(r.get(k) or 0.0) for r in recs) for k in PHASES}
    out["comm_s"] = median(comm_of(r) for r in recs)
    return out


def settings(ratio_index: int) -> list[int]:
    """The runs of one ratio, 0 for sync: in order at even ratios, reversed at odd ones."""
    order = [0, *KS]
    return order if ratio_index % 2 == 0 else order[::-1]


def run_ratio(
    recipe: str, root: str, ratio: float, index: int, cal: dict[str, Any], rounds: int, inprocess: bool, tag: str = ""
) -> dict[str, Any]:
    """Sync and k = 1, 2, 3 on the link of ``ratio``; every bound from the sync run."""
    link = link_for(ratio, cal)
    overrides = [f"federation.rounds={rounds}"] + [f"link.{k}={link[k]}" for k in ("uplink_mbps", "downlink_mbps", "latency_ms")]
    runs: dict[int, dict[str, Any]] = {}
    order = settings(index)
    for k in order:
        name = "sync" if k == 0 else f"k{k}"
        say(f"  ratio {ratio:g}: {name}, {rounds} rounds, link up {link['uplink_mbps']:g} / down {link['downlink_mbps']:g} Mbit/s ...")
        extra = ["mode=sync"] if k == 0 else ["mode=parablock", f"federation.staleness={k}"]
        report = launch(recipe, os.path.join(root, f"ratio{ratio:g}{tag}-{name}"), [*extra, *overrides], inprocess)
        s = summarize(report)
        loss = report["final"].get("eval_loss", s["final_loss"])
        runs[k] = {**s, **{p: round(v, 4) for p, v in phases(report).items()}, "final_loss": loss}
        if k == 0:
            runs[k]["compute_per_round_s"] = compute_per_round(report, len(report["federation"]["blocks"]), 2)
        link["description"] = report["link"]["description"]
    sync = runs[0]
    compute, up, wait, down = (sync[p] for p in PHASES)
    comm = sync["comm_s"]
    measured = comm / sync["compute_per_round_s"]
    rows = []
    for k in (0, *KS):
        r = runs[k]
        if k == 0:
            ideal = compute + comm
        elif k == 1:
            ideal = max(compute, up + wait + down)
        else:
            ideal = max(compute, up, down)
        row = {
            "staleness": k,
            "comm_over_compute": round(measured, 3),
            "round_s": r["round_s"],
            "ideal_round_s": round(ideal, 4),
            "efficiency": round(ideal / r["round_s"], 3),
            "speedup_vs_sync": round(sync["round_s"] / r["round_s"], 3),
            "target_ratio": ratio,
            "round_vs_k1": round(r["round_s"] / runs[1]["round_s"], 3),
            "window_bound_s": round(comm / k, 4) if k else None,
            "run": {p: r[p] for p in (*PHASES, "comm_s", "wall_s", "blocked_s", "final_loss")},
        }
        rows.append(row)
        say(
            f"    {'sync' if k == 0 else f'k = {k}'}: round {r['round_s']:.3f} s, ideal {ideal:.3f} s (efficiency "
            f"{row['efficiency']:.2f}), x{row['speedup_vs_sync']:.2f} vs sync, {row['round_vs_k1']:.2f} of k = 1's round"
        )
    return {"ratio": ratio, "measured_ratio": round(measured, 3), "order": ["sync" if k == 0 else f"k{k}" for k in order],
            "link": link, "sync_compute_per_round_s": round(sync["compute_per_round_s"], 4), "rows": rows}  # fmt: skip


# ------------------------------------------------------------------------------------------------ loss


def loss_configs() -> list[tuple[int, int, float]]:
    """``(layers_per_block, k, stale_mix)``: k = 0 is sync."""
    four = [(1, k, 1.0) for k in (0, *KS)]
    two = [(2, k, mix) for k in (0, *KS) if k != 1 for mix in ((1.0, DAMPING) if k else (1.0,))]
    return four + two


def loss_runs(recipe: str, root: str, rounds: int, seeds: int, num_layers: int, eval_samples: int) -> list[dict[str, Any]]:
    """Final eval loss over sync's, seed by seed, per (blocks, k, damping): the simulator."""
    from pl_parablock.recipe.load import load_recipe
    from pl_parablock.simulation.driver import run_simulation

    losses: dict[tuple[int, int, float], list[float]] = {}
    for seed in range(seeds):
        for lpb, k, mix in loss_configs():
            mode = ["mode=sync"] if k == 0 else ["mode=parablock", f"federation.staleness={k}", f"federation.stale_mix={mix}"]
            out = os.path.join(root, f"sim-seed{seed}-lpb{lpb}-k{k}-mix{mix:g}")
            r = load_recipe(recipe, [*mode, f"seed={seed}", f"federation.rounds={rounds}", f"blocks.layers_per_block={lpb}",
                                     f"eval.max_samples={eval_samples}", f"output_dir={out}"])  # fmt: skip
            result = run_simulation(r)
            losses.setdefault((lpb, k, mix), []).append(float(result.final["eval_loss"]))
            shutil.rmtree(out, ignore_errors=True)
        say(f"  loss: seed {seed + 1}/{seeds} done")
    rows = []
    for (lpb, k, mix), values in losses.items():
        sync = losses[(lpb, 0, 1.0)]
        rel = [v / s for v, s in zip(values, sync, strict=True)]
        rows.append(
            {
                "staleness": k,
                "damping": mix != 1.0,
                "stale_mix": mix,
                "blocks": num_layers // lpb,
                "seeds": len(rel),
                "mean": round(statistics.fmean(rel), 4),
                "std": round(statistics.stdev(rel), 4) if len(rel) > 1 else 0.0,
                "eval_loss_mean": round(statistics.fmean(values), 4),
            }
        )
        r = rows[-1]
        say(f"    {r['blocks']} blocks, k = {k}{f', stale_mix {mix:g}' if mix != 1.0 else ''}: loss x{r['mean']:.4f} ± {r['std']:.4f}")
    return rows


# ------------------------------------------------------------------------------------------------ memory


def blocks_held(k: int, num_blocks: int, rounds: int) -> dict[str, Any]:
    """Peak block copies of one client (see the module), driving the core with each aggregate applied as late as allowed."""
    import torch

    from pl_parablock.core.client import ClientCore
    from pl_parablock.core.plan import make_plan

    mode = "sync" if k == 0 else "parablock"
    plan = make_plan(mode, num_blocks=num_blocks, rounds=rounds, seed=0, clients=1, staleness=max(k, 1))
    live = [{f"b{b}": torch.zeros(1)} for b in range(num_blocks)]
    core = ClientCore(plan, 0, live)
    peak_buffers = peak_kept = peak = 0

    def kept() -> int:
        copies = {id(t) for entry in core.inflight.values() for held in entry.values() if held is not None for t in held.values()}
        if core.open is not None and core.open.start is not None:
            copies |= {id(t) for t in core.open.start.values()}
        return len(copies)

    updates: dict[int, Any] = {}
    for _ in range(rounds):
        for r in core.awaiting():
            u = updates.pop(r)
            core.apply(r, r, {n: v.clone() for n, v in u.tensors.items()})  # one client: the aggregate is its own update
        start = core.begin()
        live[start.block][f"b{start.block}"].add_(1.0)
        updates[start.round] = core.end(samples=1, tokens=1, shard=1, weighting="samples")
        # the boundary: the hand-off just made, every round in flight holding one transfer buffer, the core's copies
        buffers, copies = len(core.inflight), kept()
        peak_buffers, peak_kept, peak = max(peak_buffers, buffers), max(peak_kept, copies), max(peak, buffers + copies)
    return {"staleness": k, "blocks": num_blocks, "transfer_buffers": peak_buffers, "kept_copies": peak_kept, "peak_blocks": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="one run per setting and ratio, 16 rounds, 5 seeds of a small model's loss")
    form.add_argument("--smoke", action="store_true", help="a tiny model, few rounds, clients as threads, ratio 2 only (for tests)")
    p.add_argument("--clients", type=int, default=2, help="clients (default 2)")
    p.add_argument("--rounds", type=int, help="rounds per timed run (default: 16 quick, 32 full, 6 smoke)")
    p.add_argument("--ratios", help="comma-separated comm/compute ratios (default 1,2,4; smoke 2)")
    p.add_argument("--seeds", type=int, help="seeds of the loss comparison (default: 5 quick, 8 full, 2 smoke)")
    p.add_argument("--inprocess", action="store_true", help="clients as threads of one process (default: one process each)")
    p.add_argument("--retries", type=int, help="redo a ratio (recalibrated from its sync run) whose comm/compute missed by over 25%% "
                   "(default: 1 full, 0 quick and smoke)")  # fmt: skip
    p.add_argument("--output", help="directory for the runs' reports and pictures (default: a temporary one, removed)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = machine()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    model = SMOKE_MODEL if args.smoke else SMALL_LLAMA
    rounds = args.rounds or (6 if args.smoke else 16 if args.quick else 32)
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else [2.0] if args.smoke else [1.0, 2.0, 4.0]
    seeds = args.seeds or (2 if args.smoke else 5 if args.quick else 8)
    retries = args.retries if args.retries is not None else (1 if form_name == "full" else 0)
    inprocess = args.inprocess or args.smoke
    local_steps, max_length = (2, 64) if args.smoke else (4, 128)
    # the loss comparison: the timed runs' recipe; --quick a narrower model (64 wide) on shorter records (64 tokens), so that
    # 5 seeds fit in a few minutes
    loss_model = SMOKE_MODEL if args.smoke else {**model, "hidden_size": 64, "intermediate_size": 176} if args.quick else model
    loss_rounds = 4 if args.smoke else 24 if args.quick else 48
    eval_samples = 8 if args.smoke else 64
    root = args.output or tempfile.mkdtemp(prefix="pl_parablock-staleness-")
    os.makedirs(root, exist_ok=True)
    recipe = os.path.join(root, "recipe.yaml")
    with open(recipe, "w", encoding="utf-8") as fh:
        fh.write(recipe_text(model, args.clients, local_steps, max_length))
    loss_recipe = os.path.join(root, "loss-recipe.yaml")
    with open(loss_recipe, "w", encoding="utf-8") as fh:
        fh.write(recipe_text(loss_model, args.clients, local_steps, 64 if args.quick else max_length))
    num_layers = int(model["num_hidden_layers"])
    try:
        say(f"staleness: {args.clients} clients, {rounds} rounds, ratios {ratios}; calibrating (sync, no emulation) ...")
        cal = calibrate(recipe, os.path.join(root, "calibration"), num_layers, inprocess, sweeps=2 if (args.smoke or args.quick) else 3)
        say(f"  compute {cal['compute_s']:.3f} s/round, {cal['bytes_up'] / 1e6:.2f} MB up and down per round")
        sweep, missed = [], []
        for i, ratio in enumerate(ratios):
            res = run_ratio(recipe, root, ratio, i, cal, rounds, inprocess)
            tries = 0
            while abs(res["measured_ratio"] / ratio - 1) > 0.25 and tries < retries:
                tries += 1
                say(f"  measured comm/compute {res['measured_ratio']:.2f} instead of {ratio:g}: recalibrating from the sync run, again")
                missed.append({"ratio": ratio, "measured_ratio": res["measured_ratio"]})
                cal = {**cal, "compute_s": res["sync_compute_per_round_s"], "recalibrated": tries}
                res = run_ratio(recipe, root, ratio, i, cal, rounds, inprocess, tag=f"-retry{tries}")
            sweep.append(res)
        say(f"loss: the simulator, {seeds} seeds x {len(loss_configs())} settings, {loss_rounds} rounds ...")
        loss = loss_runs(loss_recipe, root, loss_rounds, seeds, int(loss_model["num_hidden_layers"]), eval_samples)
    finally:
        if args.output is None:
            shutil.rmtree(root, ignore_errors=True)
    memory = [blocks_held(k, m, 24) for m in (num_layers, num_layers // 2) for k in (0, *KS)]
    rows = [row for s in sweep for row in s["rows"]]
    result: dict[str, Any] = {
        "benchmark": "staleness",
        "form": form_name,
        "machine": info,
        "clients": args.clients,
        "rounds": rounds,
        "local_steps": local_steps,
        "model": {k: model[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        "processes": not inprocess,
        "calibration": cal,
        "ratios": [{k: v for k, v in s.items() if k != "rows"} for s in sweep],
        "missed_ratio_attempts": missed,
        "loss_setup": {
            "model": {k: loss_model[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
            "rounds": loss_rounds,
            "eval_samples": eval_samples,
            "clients": args.clients,
        },
        "memory": memory,
        "targets": {
            "at comm/compute 2": "k = 2: efficiency >= 0.9 and round_s <= 0.8 x k = 1's",
            "loss": "k = 2 within 3 % of sync (mean over seeds), k = 1 within 2 %",
        },
        "output": root if args.output else None,
        "rows": rows,
        "loss": loss,
    }
    finish(result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
