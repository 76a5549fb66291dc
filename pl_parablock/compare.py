"""``python -m pl_parablock.compare RECIPES_OR_FOLDERS... [key=value ...]``: one table for several methods.

Every recipe given (a folder stands for its ``*.yaml`` files, e.g. all of
``recipes/math/``) runs as a federation of its own, one after another, with
the same overrides (so the same model, data, clients, rounds and link when
the recipes agree on them otherwise), as process federations (``--inprocess``:
clients as threads of one process; ``--simulate``: in the simulator, on its
simulated clock); each run's output goes to
``OUTPUT_DIR/<recipe>/`` (``OUTPUT_DIR`` from ``output_dir=``, default
``runs/compare``). Then one table: markdown on screen, ``OUTPUT_DIR/compare.json``
(``{"rows": [...]}``, one row per recipe) and ``OUTPUT_DIR/comparison.png``
(loss versus wall-clock and versus round, every run on shared axes).

``--seeds 0,1,2,3,4`` runs every recipe once per seed (``seed=`` of each
run; outputs in ``OUTPUT_DIR/<recipe>/seed<k>/``) and reports, per recipe,
the mean and the sample standard deviation over the seeds of the eval
loss, the perplexity, the exact match (``null`` where a run has none) and
the wall time (simulated with ``--simulate``): ``compare.json`` holds
``{"seeds": [...], "rows": [...], "per_seed": [...]}``, a row per recipe
with ``seeds``, ``mean`` and ``std`` (each a mapping of those metrics), and
the per-seed rows (the table's columns and ``seed``); ``comparison.png``
draws the mean loss per round with a ± 1 std band and the final eval loss
and wall time with error bars.

Example::

    python -m pl_parablock.compare recipes/math/ model.path=/models/Llama-3.2-1B \\
        data.path=/data/gsm8k/train.jsonl eval.path=/data/gsm8k/test.jsonl output_dir=runs/math-table
    python -m pl_parablock.compare recipes/sim/ --simulate --seeds 0,1,2,3,4,5,6,7 output_dir=runs/sim-seeds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from pl_parablock.errors import ConfigError, ParaBlockError
from pl_parablock.recipe.load import load_recipe

__all__ = ["COLUMNS", "SEED_METRICS", "collect_recipes", "main", "parse_seeds", "row_of", "seed_row"]

COLUMNS = (
    "recipe",
    "mode",
    "eval_loss",
    "perplexity",
    "exact_match",
    "wall_s",
    "clock",
    "bytes_up",
    "bytes_down",
    "peak_rss_mb",
    "trainable_params",
)

SEED_METRICS = ("eval_loss", "perplexity", "exact_match", "wall_s")
"""The columns ``--seeds`` reports as mean and standard deviation over the seeds."""


def collect_recipes(items: Sequence[str]) -> list[str]:
    """The recipe files named, folders expanded to their ``*.yaml`` files (sorted).

    Raises:
        ConfigError: a path that does not exist, a folder without recipes, or nothing given.
    """
    out: list[str] = []
    problems = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.endswith((".yaml", ".yml")))
            if not found:
                problems.append(f"folder `{item}` holds no .yaml recipe")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            problems.append(f"recipe `{item}` not found; give recipe files or folders of them")
    if not items:
        problems.append("give at least one recipe file or folder, e.g. recipes/math/")
    if problems:
        raise ConfigError(problems)
    return out


def _names(paths: Sequence[str]) -> list[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}-{s}" for p, s in zip(paths, stems)]


def row_of(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One table row from a run's report.json."""
    final = report.get("final", {})
    totals = report.get("totals", {})
    clients = report.get("clients", [])
    rss = [c.get("peak_rss_mb") for c in clients if isinstance(c.get("peak_rss_mb"), (int, float))]
    return {
        "recipe": name,
        "mode": report.get("mode"),
        "eval_loss": final.get("eval_loss"),
        "perplexity": final.get("perplexity"),
        "exact_match": final.get("exact_match"),
        "wall_s": report.get("wall_s"),
        "clock": "simulated" if (report.get("clock") or {}).get("simulated") else "measured",
        "bytes_up": totals.get("bytes_up"),
        "bytes_down": totals.get("bytes_down"),
        "peak_rss_mb": max(rss) if rss else None,
        "trainable_params": final.get("trainable_params"),
    }


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated integers, each once (``0,1,2``).

    Raises:
        ParaBlockError: anything else, in one line naming the flag.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ParaBlockError(f"`--seeds` is {text!r}; give distinct non-negative integers separated by commas, e.g. --seeds 0,1,2,3,4")
    return seeds


def seed_row(name: str, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One recipe's row over its seeds: ``seeds``, and per metric of :data:`SEED_METRICS` its ``mean`` and ``std``.

    ``std`` is the sample standard deviation (``n − 1``; ``null`` with one
    seed); a metric some run lacks (no exact match) is ``null`` in both.
    """
    from pl_parablock.report import mean_std

    first = rows[0]
    out: dict[str, Any] = {"recipe": name, "mode": first.get("mode"), "clock": first.get("clock"), "seeds": list(seeds)}
    out["mean"], out["std"] = {}, {}
    for m in SEED_METRICS:
        values = [float(v) for r in rows if isinstance(v := r.get(m), (int, float)) and not isinstance(v, bool)]
        out["mean"][m], out["std"][m] = mean_std(values) if len(values) == len(rows) else (None, None)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (bytes in MB)."""
    head = ["recipe", "mode", "eval loss", "perplexity", "exact match", "wall s", "clock", "MB up", "MB down", "peak RSS MB", "trainable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mb = [r[k] / 1e6 if isinstance(r[k], (int, float)) else None for k in ("bytes_up", "bytes_down")]
        cells = [r["recipe"], r["mode"], r["eval_loss"], r["perplexity"], r["exact_match"], r["wall_s"], r["clock"], *mb]
        cells += [r["peak_rss_mb"], r["trainable_params"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def format_seed_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`seed_row` as a markdown table: mean ± standard deviation over the seeds."""
    head = ["recipe", "mode", "seeds", "eval loss", "perplexity", "exact match", "wall s", "clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stats = []
        for m in SEED_METRICS:
            mean, std = r["mean"][m], r["std"][m]
            stats.append(_cell(mean) if std is None else f"{_cell(mean)} ± {_cell(std)}")
        lines.append("| " + " | ".join([str(r["recipe"]), _cell(r["mode"]), str(len(r["seeds"])), *stats, _cell(r["clock"])]) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pl_parablock.compare",
        description="Run several recipes with the same overrides and compare them in one table.",
    )
    p.add_argument("items", nargs="+", help="recipe files or folders of them, then key=value overrides for all of them")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--inprocess", action="store_true", help="run each federation in one process (clients as threads)")
    how.add_argument("--simulate", action="store_true", help="run each recipe in the simulator (virtual clients, simulated clock)")
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        help="run every recipe once per seed (e.g. 0,1,2,3,4) and report the mean and standard deviation over the seeds",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # recipes, overrides and flags in any order
    overrides = [a for a in args.items if "=" in a and not os.path.exists(a)]
    items = [a for a in args.items if a not in overrides]
    out_dir = "runs/compare"
    rest = []
    for o in overrides:
        if o.startswith("output_dir="):
            out_dir = o.split("=", 1)[1]
        else:
            rest.append(o)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        if seeds is not None and any(o.split("=", 1)[0].strip() == "seed" for o in rest):
            raise ParaBlockError("`seed=` and `--seeds` both set the seed; keep one")
        paths = collect_recipes(items)
        names = _names(paths)
        problems = []
        for path in paths:  # every recipe is checked before any runs
            try:
                for seed in seeds if seeds is not None else [None]:
                    load_recipe(path, rest + ([f"seed={seed}"] if seed is not None else []))
            except ConfigError as exc:
                problems.append(f"{path}: {exc}")
        if problems:
            raise ConfigError(problems)
        os.makedirs(out_dir, exist_ok=True)
        rows, runs, per_seed, groups = [], [], [], []
        for path, name in zip(paths, names):
            reports = []
            for seed in seeds if seeds is not None else [None]:
                tag = name if seed is None else f"{name}-seed{seed}"
                run_dir = os.path.join(out_dir, name) if seed is None else os.path.join(out_dir, name, f"seed{seed}")
                report = _run(args, path, [*rest, *([f"seed={seed}"] if seed is not None else [])], run_dir, tag, out_dir)
                row = row_of(name, report)
                if seed is None:
                    rows.append(row)
                    runs.append((f"{name}: {report.get('mode')}", report))
                else:
                    per_seed.append({**row, "seed": seed})
                    reports.append(report)
            if seeds is not None:
                rows.append(seed_row(name, per_seed[-len(seeds) :], seeds))
                groups.append((f"{name}: {reports[0].get('mode')}", reports))
        table: dict[str, Any] = {"rows": rows} if seeds is None else {"seeds": seeds, "rows": rows, "per_seed": per_seed}
        with open(os.path.join(out_dir, "compare.json"), "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
        from pl_parablock.report import plot_comparison, plot_seed_comparison

        target = os.path.join(out_dir, "comparison.png")
        picture = plot_comparison(runs, target) if seeds is None else plot_seed_comparison(groups, target)
        print()
        print(format_table(rows) if seeds is None else format_seed_table(rows))
        print(f"\n  table     {os.path.abspath(os.path.join(out_dir, 'compare.json'))}\n  picture   {os.path.abspath(picture)}")
        return 0
    except ParaBlockError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        _close_fork_server()


_FORK: Any = None  # the simulations' fork server, started on the first --simulate run; False: none can be had
_RUNS = 0


def _simulations_fork_server() -> Any:
    """The fork server the simulations of this command are forked from (``None`` where fork is unsafe or it failed).

    A run forked from it is a process of its own, as one started with ``python -m pl_parablock.simulate``
    (the same ``main`` and arguments; the simulator sets its threads itself), without paying the imports again.
    """
    global _FORK
    if _FORK is None:
        from pl_parablock import forkserver

        _FORK = False
        if forkserver.available():
            fork = forkserver.ForkServer(None, preload=("pl_parablock.simulate",))
            if fork.wait_ready():
                _FORK = fork
            else:
                fork.close()
    return _FORK or None


def _close_fork_server() -> None:
    global _FORK
    if _FORK:
        _FORK.close()
    _FORK = None


def _run(args: argparse.Namespace, path: str, overrides: list[str], run_dir: str, tag: str, out_dir: str) -> dict[str, Any]:
    """Run one recipe (a process federation, ``--inprocess`` or ``--simulate``) into ``run_dir``; its report."""
    entry = "pl_parablock.simulate" if args.simulate else "pl_parablock.fit"
    cmd = [sys.executable, "-m", entry, path, *overrides, f"output_dir={run_dir}"]
    if args.inprocess:
        cmd.append("--inprocess")
    print(f"  running {tag}: {' '.join(cmd[1:])}", flush=True)
    log_path = os.path.join(out_dir, f"{tag}.log")
    fork = _simulations_fork_server() if args.simulate else None
    if fork is not None:  # a fresh process per run, forked from one that imported torch & co. once
        global _RUNS
        _RUNS += 1
        returncode = fork.spawn(_RUNS, cmd[3:], log_path, module=entry).wait()
    else:
        with open(log_path, "w", encoding="utf-8") as log:
            returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if returncode != 0:
        raise ParaBlockError(f"recipe {path} failed (exit {returncode}); its output is in {log_path}")
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        report: dict[str, Any] = json.load(f)
    return report


if __name__ == "__main__":
    sys.exit(main())
