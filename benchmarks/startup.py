"""Start-up: how long ``python -m pl_parablock.fit`` takes from the launch to round 1, and where the time goes.

    python benchmarks/startup.py [--runs 3] [--rounds N] [--output DIR]      # the quickstart, fork server vs none
    python benchmarks/startup.py --checkpoint [--runs 1] [--output DIR]      # a ~135M-parameter checkpoint vs its config

**Quickstart** (``recipes/quickstart.yaml``, its 36 rounds unless ``--rounds``):
each run launches the real command as a user does and reads its outputs.
The runs alternate between the launcher's fork server (the default) and
``PL_PARABLOCK_FORKSERVER=0`` (every client a ``python -m pl_parablock.fit
--role client`` process of its own, as before the fork server), so that a
machine whose load drifts does not favour one. Per run:
``round1_started_at`` (report.json: round 1's start on the clients, seconds
since the server's start, the earliest client), ``launch_to_round1_s`` (the
same moment, seconds since the command was launched: the clients' own
reports hold it in wall-clock time), ``wall_s`` (report.json) and
``process_s`` (the command's whole life, the final evaluation and save
included), and the final ``globals_sha256`` (the same with and without the
fork server: the federation ends bitwise where it did). ``median`` per
variant over the runs.

**Checkpoint** (``--checkpoint``): see :mod:`_startup_checkpoint`.

The last line is one JSON object. Figures depend on the machine and its
load (``machine.loadavg_*``); compare variants of the same call only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import REPO, finish, median, say

QUICKSTART = os.path.join(REPO, "recipes", "quickstart.yaml")


def launch(recipe: str, overrides: list[str], *, fork_server: bool, output_dir: str) -> dict[str, Any]:
    """Run ``python -m pl_parablock.fit recipe`` as a user does; its start-up figures from its outputs."""
    env = {**os.environ, "PL_PARABLOCK_FORKSERVER": "1" if fork_server else "0", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "pl_parablock.fit", recipe, *overrides, f"output_dir={output_dir}"]
    launched = time.time()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    process_s = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(os.path.join(output_dir, "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    first = report["rounds"][0]["client_records"]
    starts = []
    forked = []
    for path in sorted(glob.glob(os.path.join(output_dir, "clients", "client_*.json"))):
        with open(path, encoding="utf-8") as fh:
            client = json.load(fh)
        starts.append(min(float(r["started_at"]) for r in client["rounds"]))
        forked.append(bool(client.get("process_start", {}).get("forked")))
    return {
        "fork_server": fork_server,
        "clients_forked": sum(forked),
        "round1_started_at": round(min(float(c["started_at"]) for c in first), 3),
        "launch_to_round1_s": round(min(starts) - launched, 3),
        "round1_closed_at": round(float(report["rounds"][0]["closed_at"]), 3),
        "wall_s": round(float(report["wall_s"]), 3),
        "process_s": round(process_s, 3),
        "globals_sha256": report["federation"]["globals_sha256"],
        "eval_loss": report["final"].get("eval_loss"),
    }


def quickstart(args: argparse.Namespace, work: str) -> dict[str, Any]:
    overrides = [f"federation.rounds={args.rounds}"] if args.rounds else []
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        for fork_server in (True, False) if i % 2 == 0 else (False, True):
            out = os.path.join(work, f"run{i}-{'fork' if fork_server else 'spawn'}")
            runs.append(launch(QUICKSTART, overrides, fork_server=fork_server, output_dir=out))
            say(json.dumps(runs[-1]))
            shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for variant, flag in (("fork_server", True), ("own_processes", False)):
        mine = [r for r in runs if r["fork_server"] is flag]
        summary[variant] = {
            k: round(median(r[k] for r in mine), 3) for k in ("round1_started_at", "launch_to_round1_s", "wall_s", "process_s")
        }
    return {
        "benchmark": "startup",
        "recipe": os.path.relpath(QUICKSTART, REPO),
        "overrides": overrides,
        "median": summary,
        "bitwise_same": len({r["globals_sha256"] for r in runs}) == 1,
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per variant (default 3)")
    p.add_argument("--rounds", type=int, default=0, help="quickstart: federation.rounds (default: the recipe's)")
    p.add_argument("--checkpoint", action="store_true", help="the ~135M-parameter checkpoint vs its config instead")
    p.add_argument("--output", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()
    started = time.perf_counter()
    work = args.output or tempfile.mkdtemp(prefix="pl_parablock-startup-")
    try:
        if args.checkpoint:
            from _startup_checkpoint import checkpoint

            result = checkpoint(args, work)
        else:
            result = quickstart(args, work)
    finally:
        if not args.output:
            shutil.rmtree(work, ignore_errors=True)
    finish(result, started)


if __name__ == "__main__":
    main()
