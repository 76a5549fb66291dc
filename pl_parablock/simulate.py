"""``python -m pl_parablock.simulate``: a federation of virtual clients on one model, with a simulated clock.

Usage::

    python -m pl_parablock.simulate [RECIPE.yaml] [key=value ...] [--quiet]

The recipe is the one ``python -m pl_parablock.fit`` runs (same schema):
``federation.clients`` virtual clients (thousands fit: a client not
training holds only its data position, RNG and, in ``parablock``, the
unaggregated block it trained last, on the CPU), ``federation.clients_per_round``
of them sampled each round, all sharing one model instance on one device
(``train.accelerator``). The final global model is bitwise the one the
process federation of the same recipe ends with.

Wall-clock figures come from the simulated clock
(:mod:`pl_parablock.simulation.clock`): each client's measured compute time
times its ``simulation.profile.compute_factor``, its link (uplink, downlink,
latency) and the server's ``simulation.aggregation_s`` and
``simulation.bandwidth_mbps``. The run writes what ``fit`` writes:
``OUTPUT_DIR/report.json`` (its clock labelled ``simulated``), the summary
table, ``timeline.png`` and ``loss.png``, and the global model in
``OUTPUT_DIR/model``; ``python -m pl_parablock.report SIM_RUN REAL_RUN``
compares it with a real run.

Several processes, several machines: ``simulation.workers: W`` starts ``W``
worker processes on this machine (this one is rank 0; gloo on the CPU, NCCL
when each worker has a GPU of its own), each training its own share of the
clients (:mod:`pl_parablock.simulation.workers`); under ``torchrun``
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set) its processes are the
workers, on one machine or several::

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank R --master-addr A --master-port P -m pl_parablock.simulate RECIPE

The global is bitwise the one-process run's at equal ``train.threads``.

A bad recipe prints one message naming the key and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pl_parablock.errors import ParaBlockError
from pl_parablock.recipe.load import load_recipe, to_yaml
from pl_parablock.recipe.schema import Recipe
from pl_parablock.wire.link import Link

__all__ = ["main", "simulate", "simulate_many"]

log = logging.getLogger("pl_parablock")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pl_parablock.simulate",
        description="Simulate a federation: virtual clients sharing one model, and a simulated clock.",
        epilog="Example: python -m pl_parablock.simulate recipes/sim/instruct_parablock.yaml federation.clients=1000",
    )
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the built-in quickstart defaults)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. federation.clients_per_round=10")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _describe_links(recipe: Recipe) -> str:
    from pl_parablock.recipe.profile import resolve_profiles

    f = recipe.federation
    profiles = resolve_profiles(recipe.simulation.profile, f.clients, recipe.link, recipe.seed)

    def span(values: list[float | None], unit: str) -> str:
        if any(v is None for v in values):
            known = [v for v in values if v is not None]
            return "unlimited" + (f" to {max(known):.3g} {unit}" if known else "")
        nums = [float(v) for v in values if v is not None]
        lo, hi = min(nums), max(nums)
        return f"{lo:.3g} {unit}" if lo == hi else f"{lo:.3g}-{hi:.3g} {unit}"

    parts = [
        "compute x" + span([p.compute_factor for p in profiles], "").strip(),
        "up " + span([p.uplink_mbps for p in profiles], "Mbit/s"),
        "down " + span([p.downlink_mbps for p in profiles], "Mbit/s"),
        "latency " + span([p.latency_ms for p in profiles], "ms"),
    ]
    s = recipe.simulation
    if s.bandwidth_mbps is not None:
        parts.append(f"server {s.bandwidth_mbps:g} Mbit/s shared")
    parts.append("aggregation " + (f"{s.aggregation_s:g} s" if s.aggregation_s is not None else "as measured"))
    return "simulated clock: " + ", ".join(parts)


def simulate(recipe: Recipe, *, progress: bool = False, group: Any = None) -> dict[str, Any]:
    """Run ``recipe`` in the simulator; write ``report.json``, the pictures and ``model/``; return the report.

    With ``simulation.workers`` > 1, or under ``torchrun``, the run is
    spread over worker processes (:func:`simulate_many`). ``group``: this
    process's place among workers already joined; a worker other than
    rank 0 writes nothing and returns ``{}``.
    """
    from pl_parablock.client.runner import quiet_third_party
    from pl_parablock.recipe.build import client_threads
    from pl_parablock.report import build_report, write_pictures, write_report
    from pl_parablock.simulation.driver import run_simulation
    from pl_parablock.simulation.workers import launched_by_torchrun

    if group is None and (recipe.simulation.workers > 1 or launched_by_torchrun()):
        return simulate_many([recipe], progress=progress)[0]
    quiet_third_party()
    f = recipe.federation
    if group is None:
        recipe.train.threads = client_threads(recipe)  # what `fit` gives each local client: the same model, bitwise
    elif not group.is_root:
        run_simulation(recipe, group=group, device=group.train_device)
        return {}
    os.makedirs(recipe.output_dir, exist_ok=True)
    with open(os.path.join(recipe.output_dir, "recipe.yaml"), "w", encoding="utf-8") as fh:
        fh.write(to_yaml(recipe))
    clock_line = _describe_links(recipe)
    started = time.perf_counter()

    def show(rec: dict[str, Any]) -> None:
        loss = rec.get("loss")
        late = f" ({rec['late']} late)" if rec.get("late") else ""
        _say(
            f"  round {rec['round'] + 1:>3}/{f.rounds}  block {rec['block']:>2}  {rec['arrived']}/{rec['expected']} clients{late}  "
            + (f"loss {loss:.4f}  " if loss is not None else "")
            + f"simulated t={rec['closed_at']:8.1f} s  (real {time.perf_counter() - started:6.1f} s)"
        )

    if group is None:
        result = run_simulation(recipe, progress=show if progress else None)
    else:
        result = run_simulation(recipe, progress=show if progress else None, group=group, device=group.train_device)
    report = build_report(recipe, result.server, wall_s=result.wall_s, link=Link.from_section(recipe.link), output_dir=recipe.output_dir)
    report["wall_s"] = result.wall_s
    report["train_wall_s"] = result.wall_s
    report["final"].update({k: v for k, v in result.final.items() if k != "eval_curve"})
    report["eval_curve"] = result.final.get("eval_curve", [])
    report["model_dir"] = result.final.get("model_dir")
    report["link"].update(simulated=True, description=clock_line)
    report["clock"] = {
        "simulated": True,
        "description": clock_line,
        "real_s": result.real_s,
        "loop_s": result.loop_s,
        "tokens": result.tokens,
        "steps": result.steps,
        "threads": recipe.train.threads,
        "clients_in_memory_peak": result.peak_clients_in_memory,
        "downloads_not_sampled": result.skipped_downloads,
        "bytes_down_not_sampled": result.skipped_bytes_down,
    }
    report["simulation"] = {"workers": 1, **result.workers}
    # clients not sampled for a round still download its aggregate (as real ones do); the totals count them
    report["totals"]["bytes_down"] += result.skipped_bytes_down
    try:
        report["pictures"] = write_pictures(report, recipe.output_dir)
    except Exception as exc:  # the pictures must not cost the run its report
        log.warning("could not draw the run's pictures: %r", exc)
        _say(f"warning: no pictures ({type(exc).__name__}: {exc}); report.json is complete")
    report["report_path"] = write_report(report, recipe.output_dir)
    return report


def simulate_many(recipes: Sequence[Recipe], *, progress: bool = False, workers: int | None = None) -> list[dict[str, Any]]:
    """Run ``recipes`` one after another on one group of worker processes; the reports (rank 0's; ``{}`` elsewhere).

    Under ``torchrun`` the group is its processes (``init_method="env://"``);
    otherwise this process is rank 0 and starts ``workers`` − 1 others
    (default: the first recipe's ``simulation.workers``) on 127.0.0.1, and
    joins them at the end. Threads per worker: ``train.threads``, else the
    free cores shared by this machine's workers. Starting processes costs
    seconds; several recipes share one start.

    Raises:
        ParaBlockError: a recipe's, or a worker's, error (every worker stops with it).
    """
    from pl_parablock.simulation import workers as w

    first = recipes[0]
    timeout = first.simulation.worker_timeout_s
    if w.launched_by_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        for r in recipes:
            r.train.threads = r.train.threads or w.worker_threads(local_size)
        group = w.join_group(rank, size, first, local_rank=local_rank, local_size=local_size, init_method="env://", timeout_s=timeout)
        try:
            return [simulate(r, progress=progress and rank == 0, group=group) for r in recipes]
        finally:
            group.close()
    size = workers or first.simulation.workers
    for r in recipes:
        r.train.threads = r.train.threads or w.worker_threads(size)
    return w.spawn_group(size, timeout, recipes, _worker, lambda group: [simulate(r, progress=progress, group=group) for r in recipes])


def _worker(rank: int, size: int, port: int, recipes: Sequence[Recipe], timeout_s: float) -> None:
    """A worker started by :func:`simulate_many` (rank ≥ 1): join rank 0's group and run the recipes with it."""
    from pl_parablock.client.runner import quiet_third_party
    from pl_parablock.simulation import workers as w

    quiet_third_party()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        group = w.join_group(rank, size, recipes[0], local_rank=rank, local_size=size, port=port, timeout_s=timeout_s)
        try:
            for r in recipes:
                simulate(r, group=group)
        finally:
            group.close()
    except ParaBlockError as exc:
        print(f"worker {rank}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pl_parablock.report import format_summary

    recipe_path = args.recipe
    overrides = list(args.overrides)
    if recipe_path is not None and "=" in recipe_path and not os.path.exists(recipe_path):
        overrides.insert(0, recipe_path)
        recipe_path = None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        recipe = load_recipe(recipe_path, overrides)
        f = recipe.federation
        per_round = f.clients_per_round or f.clients
        from pl_parablock.simulation.workers import launched_by_torchrun

        if launched_by_torchrun() and os.environ["RANK"] != "0":  # another worker under torchrun: rank 0 speaks for the run
            simulate(recipe)
            return 0
        _say(
            f"pl_parablock simulator: mode={recipe.mode}, {f.clients} virtual clients, {per_round} per round, "
            f"{f.rounds} rounds, {recipe.train.local_steps} local steps per round (one shared model)"
        )
        _say(f"  {_describe_links(recipe)}")
        report = simulate(recipe, progress=not args.quiet)
    except ParaBlockError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    _say("")
    _say(format_summary(report, report.pop("report_path", None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
