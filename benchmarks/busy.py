"""The simulator and the process federation on a busy machine: each one's slowdown when another process takes a core.

    python benchmarks/busy.py [--rounds N] [--repeats R] [--load CORES] [--output DIR]

Runs the quickstart recipe (``--rounds`` rounds) as a process federation
(``python -m pl_parablock.fit``: the server and one process per client) and
in the simulator (``python -m pl_parablock.simulate``), each with its
defaults (``train.threads``: the cores available shared by the clients,
the same for both, so both end with the same model bitwise), once on the
machine as it is and once while ``--load`` other processes each spin a core
(pure Python loops, started before and stopped after the run). The order
alternates run by run (fit idle, fit busy, simulate busy, simulate idle,
then the reverse), so that drift favours neither.

Per command: ``idle_s`` and ``busy_s`` (median wall time, launch to exit,
over ``--repeats``), ``slowdown`` (``busy_s / idle_s``). The ideal each is
judged against comes from how many cores it keeps busy when idle (its
``user + sys`` CPU time over its wall time, ``cores_used``, measured on
the idle run): with ``L`` of ``C`` cores taken, a job that needs ``u``
cores runs on ``min(u, C·u / (u + L))`` (the OS shares the cores fairly
between runnable threads), so its ideal slowdown is ``u`` over that.
``simulator_vs_federation`` divides the simulator's slowdown by the
federation's: above 1 the simulator falls further behind under load.

The last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import REPO, finish, median, say

from pl_parablock.recipe.build import available_cores

SPIN = "while True:\n    pass\n"


def _run(module: str, rounds: int, out: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys of the command and its children) of one run."""
    recipe = os.path.join(REPO, "recipes", "quickstart.yaml")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", module, recipe, f"federation.rounds={rounds}", f"output_dir={out}"]
    if module.endswith("simulate"):
        cmd.append("--quiet")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _with_load(load: int, fn: Any) -> Any:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
    try:
        time.sleep(0.5)  # the spinners are running before the run begins
        return fn()
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait(10)


def _ideal_slowdown(used: float, load: int, cores: int) -> float:
    share = min(used, cores * used / (used + load)) if load else used
    return used / share if share > 0 else float("nan")


def main() -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--load", type=int, default=1, help="other processes, each spinning one core")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    root = args.output or tempfile.mkdtemp(prefix="busy-")
    cores = available_cores()
    commands = {"federation": "pl_parablock.fit", "simulator": "pl_parablock.simulate"}
    times: dict[str, dict[str, list[float]]] = {k: {"idle": [], "busy": [], "cpu": []} for k in commands}
    order = [("federation", "idle"), ("federation", "busy"), ("simulator", "busy"), ("simulator", "idle")]
    n = 0
    for rep in range(args.repeats):
        for name, state in order if rep % 2 == 0 else list(reversed(order)):
            out = os.path.join(root, f"{name}-{state}-{rep}")
            n += 1
            say(f"  {n}/{4 * args.repeats}: {name}, {state}")
            if state == "busy":
                wall, _ = _with_load(args.load, lambda out=out, name=name: _run(commands[name], args.rounds, out))
            else:
                wall, cpu = _run(commands[name], args.rounds, out)
                times[name]["cpu"].append(cpu / wall)
            times[name][state].append(wall)
    rows = {}
    for name, t in times.items():
        idle, busy, used = median(t["idle"]), median(t["busy"]), median(t["cpu"])
        rows[name] = {
            "idle_s": round(idle, 2),
            "busy_s": round(busy, 2),
            "slowdown": round(busy / idle, 3),
            "cores_used": round(used, 2),
            "ideal_slowdown": round(_ideal_slowdown(used, args.load, cores), 3),
            "runs": {k: [round(x, 2) for x in v] for k, v in t.items()},
        }
    result = {
        "benchmark": "busy",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_cores": args.load,
        "cores": cores,
        "rows": rows,
        "simulator_vs_federation": round(rows["simulator"]["slowdown"] / rows["federation"]["slowdown"], 3),
    }
    with open(os.path.join(root, "busy.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    finish(result, started)


if __name__ == "__main__":
    main()
