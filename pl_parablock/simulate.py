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

__all__ = ["main", "simulate"]

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


def simulate(recipe: Recipe, *, progress: bool = False) -> dict[str, Any]:
    """Run ``recipe`` in the simulator; write ``report.json``, the pictures and ``model/``; return the report."""
    from pl_parablock.client.runner import quiet_third_party
    from pl_parablock.recipe.build import client_threads
    from pl_parablock.report import build_report, write_pictures, write_report
    from pl_parablock.simulation.driver import run_simulation

    quiet_third_party()
    f = recipe.federation
    recipe.train.threads = client_threads(recipe)  # what `fit` gives each local client: the same model, bitwise
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

    result = run_simulation(recipe, progress=show if progress else None)
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
    # clients not sampled for a round still download its aggregate (as real ones do); the totals count them
    report["totals"]["bytes_down"] += result.skipped_bytes_down
    try:
        report["pictures"] = write_pictures(report, recipe.output_dir)
    except Exception as exc:  # the pictures must not cost the run its report
        log.warning("could not draw the run's pictures: %r", exc)
        _say(f"warning: no pictures ({type(exc).__name__}: {exc}); report.json is complete")
    report["report_path"] = write_report(report, recipe.output_dir)
    return report


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
