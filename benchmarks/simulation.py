"""Simulation: the simulated clock against a real federation, and virtual clients at scale.

    python benchmarks/simulation.py [--quick | --smoke] [--output DIR]

1. ``clock``: the quickstart recipe (2 clients, ``train.threads=1``, its
   emulated link: up 16, down 32 Mbit/s, 20 ms) runs as a real process
   federation (``python -m pl_parablock.fit``: a gRPC server and one process
   per client) and in the simulator, for ``sync`` and ``parablock``.
   ``measured_s`` is the real run's training span (``train_wall_s``: first
   round start to the last aggregate applied), ``simulated_s`` the simulated
   clock's. The simulator measures a client's compute on one shared model in
   one process, one client at a time; the real clients compute side by side
   on the machine's cores (shared with whatever else runs), each slower by
   a factor that the simulator cannot know. That factor is what the
   profile's ``compute_factor`` is for: ``compute_factor`` = (a real
   client's mean compute per round) / (the simulator's), and the
   simulator's measured rounds are re-timed with it (the same
   :class:`~pl_parablock.simulation.clock.SimClock`). So ``ratio =
   simulated_s / measured_s`` checks the clock's event model (transfers,
   waits, overlap, round closes) given the compute speed; the target is
   within 10 %. Also reported: ``ratio_factor_1`` (no calibration) and
   ``ratio_cross`` (the factor taken from the other mode's pair of runs,
   on a machine whose load changes from run to run).
2. ``scale``: 1000 virtual clients, 10 sampled per round, the quickstart
   model (``parablock``, each run a fresh process): ``throughput_ratio`` =
   the simulator's training tokens per second in its round loop (training,
   switching clients, aggregating) over a single plain client's (the same
   model, block activation per round, a plain PyTorch loop over the very batches the simulator trained, in its order,
   in the same process right after it), target >= 0.9; ``rss_ratio`` = peak RSS
   at 1000 virtual clients over 100 (same clients per round), target <= 1.1.

3. ``workers`` (``simulation.workers``, not in ``--smoke``): the quickstart
   recipe (``parablock``) with 1 and 2 worker processes on the same cores
   (W = 1 with ``train.threads`` = 2, W = 2 with 1 thread each), and W = 1
   with one thread, the runs alternated (W1x2, W2x1, W1x1, twice):
   ``workers_speedup`` = rounds per second of the round loop with 2 workers
   over 1 (ideal 2.0, target >= 1.5); ``threads_speedup`` = what the second
   thread gives W = 1, so that ``workers_speedup_ceiling`` = 2 / it is what
   perfect workers (no overhead, every round evenly dealt) would reach, and
   ``workers_speedup_one_thread`` = W = 2 over W = 1 with one thread (ideal
   2.0); ``clients_moved_per_round`` and ``client_bytes_moved_per_round``: the
   clients that moved between workers to balance the rounds;
   ``peak_rss_mb_per_worker`` with 1000 clients, 10 per round, against one
   worker's (``peak_rss_ratio``, target <= 1.1); ``rss_slope_kb_per_round``:
   each worker's resident memory sampled at every round's start, the
   least-squares slope after the first fifth (the warm-up), over 200 rounds;
   ``rss_slope_kb_per_round_every_client_seen``: the same with a tenth of the
   clients, every one of which has trained (and keeps its state) early on.

The last output line is JSON (keys ``clock``: a list of ``{mode, measured_s,
simulated_s, ratio, compute_factor, ...}``, ``throughput_ratio``, ``rss_ratio``,
``workers_speedup``, ``workers_speedup_ceiling``, ``peak_rss_mb_per_worker``,
``rss_slope_kb_per_round``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package, not an installed one

from _common import REPO, finish, last_json, machine, proc_status_kb, say

QUICKSTART = os.path.join(REPO, "recipes", "quickstart.yaml")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


def _overrides(mode: str, rounds: int, out: str) -> list[str]:
    return [
        f"mode={mode}",
        "federation.clients=2",
        f"federation.rounds={rounds}",
        "train.threads=1",
        "eval.max_samples=16",
        f"output_dir={out}",
    ]


def _client_rounds(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for r in report["rounds"] for c in r["client_records"]]


def _mean_compute(report: dict[str, Any]) -> float:
    recs = _client_rounds(report)
    return sum(float(c["compute_s"]) for c in recs) / max(len(recs), 1)


def _retime(report: dict[str, Any], factor: float) -> float:
    """The simulated wall-clock of a simulator run's measured rounds with every client's compute factor set to ``factor``."""
    from pl_parablock.recipe.load import load_recipe
    from pl_parablock.recipe.profile import resolve_profiles
    from pl_parablock.simulation.clock import SimClock

    recipe = load_recipe(os.path.join(report["output_dir"], "recipe.yaml"))
    f = recipe.federation
    profiles = resolve_profiles(recipe.simulation.profile, f.clients, recipe.link, recipe.seed)
    base = [p.compute_factor for p in profiles]
    profiles = [type(p)(factor * p.compute_factor, p.uplink_mbps, p.downlink_mbps, p.latency_ms) for p in profiles]
    clock = SimClock(
        profiles,
        staleness=1 if recipe.mode == "parablock" else 0,
        round_timeout_s=f.round_timeout_s,
        min_clients=f.min_clients,
        bandwidth_mbps=recipe.simulation.bandwidth_mbps,
    )
    for rnd in report["rounds"]:
        recs = rnd["client_records"]
        clock.upload(
            rnd["round"],
            {c["client_id"]: c["compute_s"] / base[c["client_id"]] for c in recs},
            {c["client_id"]: c["bytes_up"] for c in recs},
        )
        clock.deliver(rnd["round"], rnd["aggregation_s"], max(c["bytes_down"] for c in recs))
    return clock.finish()


def clock_check(rounds: int, root: str) -> list[dict[str, Any]]:
    from pl_parablock.recipe.load import load_recipe
    from pl_parablock.simulate import simulate

    runs: dict[str, dict[str, Any]] = {}
    for mode in ("sync", "parablock"):
        out = os.path.join(root, f"real-{mode}")
        say(f"clock: real federation, {mode}, {rounds} rounds")
        cmd = [sys.executable, "-m", "pl_parablock.fit", QUICKSTART, *_overrides(mode, rounds, out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"the real {mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
            real = json.load(fh)
        say(f"clock: simulator, {mode}")
        sim = simulate(load_recipe(QUICKSTART, _overrides(mode, rounds, os.path.join(root, f"sim-{mode}"))))
        runs[mode] = {"real": real, "sim": sim}
    out = []
    for mode, other in (("sync", "parablock"), ("parablock", "sync")):
        measured = float(runs[mode]["real"]["train_wall_s"])
        factor = _mean_compute(runs[mode]["real"]) / _mean_compute(runs[mode]["sim"])
        cross = _mean_compute(runs[other]["real"]) / _mean_compute(runs[other]["sim"])
        simulated = _retime(runs[mode]["sim"], factor)
        simulated_cross = _retime(runs[mode]["sim"], cross)
        out.append(
            {
                "mode": mode,
                "measured_s": round(measured, 3),
                "simulated_s": round(simulated, 3),
                "ratio": round(simulated / measured, 3),
                "compute_factor": round(factor, 3),
                "simulated_s_factor_1": round(float(runs[mode]["sim"]["wall_s"]), 3),
                "ratio_factor_1": round(float(runs[mode]["sim"]["wall_s"]) / measured, 3),
                "compute_factor_cross": round(cross, 3),
                "ratio_cross": round(simulated_cross / measured, 3),
                "real_compute_per_round_s": round(_mean_compute(runs[mode]["real"]), 3),
                "sim_compute_per_round_s": round(_mean_compute(runs[mode]["sim"]), 3),
            }
        )
        say(
            f"clock {mode}: measured {measured:.2f} s, simulated {simulated:.2f} s (compute factor {factor:.2f}; "
            f"with the factor of the {other} runs: ratio {simulated_cross / measured:.3f})"
        )
    return out


# ------------------------------------------------------------------------------------------------ scale


def _recipe(clients: int, per_round: int, rounds: int, out: str) -> Any:
    from pl_parablock.recipe.load import load_recipe

    return load_recipe(
        QUICKSTART,
        [
            "mode=parablock",
            f"federation.clients={clients}",
            f"federation.clients_per_round={per_round}",
            f"federation.rounds={rounds}",
            "train.threads=1",
            "eval.max_samples=8",
            f"output_dir={out}",
        ],
    )


def _child_sim(clients: int, per_round: int, rounds: int, out: str, plain: bool) -> dict[str, Any]:
    from pl_parablock.simulation.driver import run_simulation

    recipe = _recipe(clients, per_round, rounds, out)
    result = run_simulation(recipe)
    peak = proc_status_kb("VmHWM")["VmHWM"]  # before the plain client runs in this process
    run = {
        "clients": clients,
        "per_round": per_round,
        "rounds": rounds,
        "loop_s": result.loop_s,
        "tokens": result.tokens,
        "steps": result.steps,
        "tokens_per_s": result.tokens / result.loop_s,
        "peak_rss_mb": peak / 1024,
        "clients_in_memory_peak": result.peak_clients_in_memory,
    }
    if plain:
        run["plain"] = _plain_client(recipe)
    return run


def _plain_client(recipe: Any) -> dict[str, Any]:
    """A single plain client on the same steps: the simulator's batches, in its order, on one model, no switching.

    A fresh model; per round its block is activated once and the round's
    ``clients_per_round x K`` batches (the sampled clients' own, drawn as the
    simulator drew them) train it in a plain PyTorch loop: no core, no
    copies of blocks, no aggregation.
    """
    import warnings

    from pl_parablock.core.blocks import freeze_to_blocks, partition_model
    from pl_parablock.core.client import RoundStart, activate
    from pl_parablock.core.plan import make_plan
    from pl_parablock.model.build import build_model
    from pl_parablock.model.module import ParaBlockModule
    from pl_parablock.simulation.virtual import ClientShards, VirtualClient

    f, b, tr = recipe.federation, recipe.blocks, recipe.train
    model, tok = build_model(recipe.model, recipe.seed)
    module = ParaBlockModule(model, tok, lr=tr.lr)
    partition = partition_model(module, layers_per_block=b.layers_per_block, embeddings=b.embeddings, head=b.head)
    blocks = freeze_to_blocks(module, partition)
    optimizer = module.configure_optimizers()
    module.train()
    plan = make_plan(
        recipe.mode, num_blocks=len(partition), rounds=f.rounds, seed=recipe.seed, clients=f.clients, clients_per_round=f.clients_per_round
    )
    shards = ClientShards(recipe, tok)
    cursors = [VirtualClient(i) for i in range(f.clients)]
    batches = []
    for t in range(plan.rounds):
        for i in plan.participants[t] if plan.participants else range(f.clients):
            it = cursors[i].batches(shards.examples(i), shards.batch_size, shards.seed, shards.pad)
            batches.append((t, [next(it) for _ in range(tr.local_steps)]))
    tokens = 0
    t0 = time.perf_counter()
    current = -1
    for t, round_batches in batches:
        if t != current:
            activate(blocks, RoundStart(t, plan.schedule[t], True), [optimizer])
            current = t
        for step, batch in enumerate(round_batches):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = module.training_step(batch, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tokens += int((batch["labels"] != -100).sum())
    loop_s = time.perf_counter() - t0
    return {"loop_s": loop_s, "tokens": tokens, "tokens_per_s": tokens / loop_s}


def _run_child(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return last_json(done.stdout)


def scale(rounds: int, root: str, clients: int = 1000, small: int = 100, per_round: int = 10) -> dict[str, Any]:
    say(f"scale: simulator, {clients} virtual clients, {per_round} per round, {rounds} rounds; then a plain client on the same steps")
    big = _run_child(["sim", str(clients), str(per_round), str(rounds), os.path.join(root, f"scale-{clients}"), "plain"])
    say(f"scale: simulator, {small} virtual clients")
    little = _run_child(["sim", str(small), str(per_round), str(rounds), os.path.join(root, f"scale-{small}"), "-"])
    plain = big.pop("plain")
    return {
        "throughput_ratio": round(big["tokens_per_s"] / plain["tokens_per_s"], 3),
        "rss_ratio": round(big["peak_rss_mb"] / little["peak_rss_mb"], 3),
        "runs": {f"sim_{clients}": big, f"sim_{small}": little, "plain": plain},
    }


# ------------------------------------------------------------------------------------------------ workers


def _child_workers(workers: int, threads: int, clients: int, per_round: int, rounds: int, out: str) -> dict[str, Any]:
    from pl_parablock.recipe.load import load_recipe
    from pl_parablock.simulate import simulate_many

    recipe = load_recipe(
        QUICKSTART,
        [
            "mode=parablock",
            f"federation.clients={clients}",
            f"federation.clients_per_round={per_round}",
            f"federation.rounds={rounds}",
            f"train.threads={threads}",
            f"simulation.workers={workers}",
            "eval.max_samples=8",
            f"output_dir={out}",
        ],
    )
    report = simulate_many([recipe])[0]
    sim = report["simulation"]
    return {
        "workers": workers,
        "threads": threads,
        "rounds": rounds,
        "loop_s": report["clock"]["loop_s"],
        "rounds_per_s": rounds / report["clock"]["loop_s"],
        "peak_rss_mb": sim["peak_rss_mb"],
        "rss_mb_per_round": sim["rss_mb_per_round"],
        "globals_sha256": report["federation"]["globals_sha256"],
        "clients_seen": len(report["clients"]),  # the clients that trained at least once (each keeps its state)
        "clients_moved": sim.get("clients_moved", 0),
        "client_bytes_moved": sim.get("client_bytes_moved", 0),
    }


def _slope_kb(samples: list[float]) -> float:
    """Least-squares slope of ``samples`` (MiB, one per round) after the first fifth, in KiB per round."""
    ys = samples[len(samples) // 5 :]
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return 1024 * sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(n))


def workers_check(rounds: int, slope_rounds: int, root: str, clients: int = 1000, per_round: int = 10) -> dict[str, Any]:
    runs = []
    configs = ((1, 2), (2, 1), (1, 1))  # W = 1 and W = 2 on the same two cores; W = 1 on one core: what one thread does
    for k in range(2):  # alternated, so that a change of the machine's load falls on every configuration
        for w, threads in configs:
            say(f"workers: W={w} x {threads} thread(s), {clients} clients, {per_round} per round, {rounds} rounds (run {k + 1})")
            out = os.path.join(root, f"workers-{w}x{threads}-{k}")
            runs.append(_run_child(["workers", str(w), str(threads), str(clients), str(per_round), str(rounds), out]))

    def rate(w: int, threads: int) -> float:
        return sum(r["rounds_per_s"] for r in runs if (r["workers"], r["threads"]) == (w, threads))

    one = [r for r in runs if (r["workers"], r["threads"]) == (1, 2)]
    two = [r for r in runs if r["workers"] == 2]
    say(f"workers: W=2 x 1 thread, {slope_rounds} rounds (memory over time)")
    long = _run_child(["workers", "2", "1", str(clients), str(per_round), str(slope_rounds), os.path.join(root, "workers-long")])
    per_worker = [list(col) for col in zip(*long["rss_mb_per_round"])]
    # the same with clients // 10 clients, every one of which has trained (and holds its state) after a few rounds
    few = clients // 10
    say(f"workers: W=2 x 1 thread, {few} clients, {slope_rounds} rounds (memory over time, every client seen)")
    seen = _run_child(["workers", "2", "1", str(few), str(per_round), str(slope_rounds), os.path.join(root, "workers-long-few")])
    per_worker_seen = [list(col) for col in zip(*seen["rss_mb_per_round"])]
    threads_speedup = rate(1, 2) / rate(1, 1)
    return {
        "workers_speedup": round(rate(2, 1) / rate(1, 2), 3),
        "workers_speedup_ideal": 2.0,
        # what two threads give one worker; W = 2 can beat W = 1 x 2 threads by at most 2 / that (perfect workers)
        "threads_speedup": round(threads_speedup, 3),
        "workers_speedup_ceiling": round(2.0 / threads_speedup, 3),
        # W = 2 (one thread each) over W = 1 with one thread: the workers' parallel efficiency is half of it (ideal 1.0)
        "workers_speedup_one_thread": round(rate(2, 1) / rate(1, 1), 3),
        "peak_rss_mb_per_worker": [round(x, 1) for x in two[-1]["peak_rss_mb"]],
        "peak_rss_mb_one_worker": round(one[-1]["peak_rss_mb"][0], 1),
        "peak_rss_ratio": round(max(two[-1]["peak_rss_mb"]) / one[-1]["peak_rss_mb"][0], 3),
        "rss_slope_kb_per_round": [round(_slope_kb(col), 2) for col in per_worker],
        "rss_mb_long_run": [[round(col[0], 1), round(col[-1], 1)] for col in per_worker],
        "clients_seen_long_run": [long["clients_seen"], clients],
        "rss_slope_kb_per_round_every_client_seen": [round(_slope_kb(col), 2) for col in per_worker_seen],
        "rss_mb_long_run_every_client_seen": [[round(col[0], 1), round(col[-1], 1)] for col in per_worker_seen],
        "clients_moved_per_round": round(long["clients_moved"] / slope_rounds, 3),
        "client_bytes_moved_per_round": round(long["client_bytes_moved"] / slope_rounds),
        "workers_runs": [{k: v for k, v in r.items() if k != "rss_mb_per_round"} for r in runs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="about a minute and a half on 2 cores: few rounds")
    form.add_argument("--smoke", action="store_true", help="seconds: the smallest form (tests)")
    p.add_argument("--output", help="where the runs go (default: a temporary directory)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--only-workers", action="store_true", help="only the workers part (simulation.workers)")
    args = p.parse_args()
    if args.child:
        _kind, *rest = args.child
        if _kind == "workers":
            print(json.dumps(_child_workers(*(int(x) for x in rest[:5]), rest[5])), flush=True)
            return
        result = _child_sim(int(rest[0]), int(rest[1]), int(rest[2]), rest[3], plain=rest[4] == "plain")
        print(json.dumps(result), flush=True)
        return
    started = time.perf_counter()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    clock_rounds, scale_rounds = {"smoke": (2, 1), "quick": (4, 4), "full": (12, 8)}[form_name]
    root = args.output or tempfile.mkdtemp(prefix="pl_parablock-simulation-")
    result: dict[str, Any] = {"benchmark": "simulation", "form": form_name, "machine": machine()}
    if args.only_workers:
        result.update(workers_check(*{"smoke": (2, 5), "quick": (10, 60), "full": (30, 200)}[form_name], root))
    elif args.smoke:
        result.update(scale(scale_rounds, root, clients=50, small=10, per_round=2))
        result["clock"] = clock_check(clock_rounds, root)
    else:
        result.update(scale(scale_rounds, root))
        result["clock"] = clock_check(clock_rounds, root)
        result.update(workers_check(*{"quick": (10, 60), "full": (30, 200)}[form_name], root))
    finish(result, started)


if __name__ == "__main__":
    main()
