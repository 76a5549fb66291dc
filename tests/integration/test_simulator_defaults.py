"""One answer per recipe: ``fit`` and ``simulate`` with their default settings end with the same model, bitwise.

torch's CPU kernels may sum in another order with another thread count, so
the two commands agree only if every client computes with the same number
of threads. ``train.threads`` defaults, in both, to what ``fit`` gives each
of its local client processes: ``max(1, cores // clients)``
(:func:`pl_parablock.recipe.build.client_threads`).

Wrong variant tried: the simulator leaving torch's default (the machine's
cores) when ``train.threads`` is not set, as it did before: on a 2-core
machine with 3 clients (``fit``: 1 thread each) the globals differ, and this
test fails. (``train.batch_size=16``: on this tiny model the kernels split
the work by thread only from that size on.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULTS = ["train.threads=null", "train.batch_size=16", "mode=parablock", "federation.clients_per_round=2", "federation.rounds=4"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # the commands' own defaults
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_fit_and_simulate_with_default_threads_end_on_the_same_model(tmp_path):
    tiny_recipe(tmp_path)  # writes tmp_path/recipe.yaml (train.threads: 1, set back to the default null here)
    recipe = str(tmp_path / "recipe.yaml")
    fit = _run(["pl_parablock.fit", recipe, *DEFAULTS, f"output_dir={tmp_path / 'fit'}"])
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    sim = _run(["pl_parablock.simulate", recipe, *DEFAULTS, f"output_dir={tmp_path / 'sim'}", "--quiet"])
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    real = json.loads((tmp_path / "fit" / "report.json").read_text())
    simulated = json.loads((tmp_path / "sim" / "report.json").read_text())
    assert simulated["federation"]["globals_sha256"] == real["federation"]["globals_sha256"]
    assert [r["clients"] for r in simulated["rounds"]] == [r["clients"] for r in real["rounds"]]
    # both resolved the same default, and it is fit's per-client share of the cores
    expected = max(1, len(os.sched_getaffinity(0)) // 3)
    resolved = (tmp_path / "fit" / "recipe.yaml").read_text()
    assert f"threads: {expected}" in resolved
    assert simulated["clock"]["threads"] == expected
