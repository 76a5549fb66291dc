"""The simulator over worker processes ends bitwise where the one-process simulator ends: spawned, and under torchrun on two "nodes".

One group of two workers (``simulation.workers: 2``, started by the
simulator itself; this test's process is rank 0) runs several recipes in
turn, and two ``torchrun --nnodes 2`` launches on 127.0.0.1 (one process per
"node") run the first of them meanwhile; each global must equal the
one-process run's (equal ``train.threads``), and every worker's copy of the
server state (globals and the server's download residual) must be rank 0's.
The last recipe of the group is refused by the server's norm bound: every
worker stops with the server's reason.

The order of the sums (the chain) is pinned in tests/unit/simulation/test_workers.py,
on sums that round: with this tiny model the float64 sums of a round are exact, so a
chain run out of order, or per-worker partial sums added on rank 0, still end equal
here (tried: both pass here and fail there).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pl_parablock.errors import FederationError
from pl_parablock.simulate import simulate_many
from pl_parablock.simulation.driver import run_simulation
from tests.helpers import TINY_RECIPE, tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    "parablock-sampled": ["mode=parablock", "federation.clients=5", "federation.clients_per_round=3"],
    "parablock-int8-ef-int4-down-sampled": [
        "mode=parablock",
        "federation.clients=5",
        "federation.compression.codec=int8",
        "federation.compression.download=int4",
        "federation.clients_per_round=3",
    ],
    "sync-median-clip": ["mode=sync", "federation.clients=4", "federation.aggregation=median", "federation.clip_norm=0.05"],
}
REFUSED = ["mode=parablock", "federation.clients=4", "federation.max_update_norm=1e-6"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_two_nodes(tmp_path, overrides: list[str]) -> list[subprocess.Popen]:
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "pl_parablock.simulate", str(tmp_path / "recipe.yaml"), *overrides, f"output_dir={tmp_path / 'torchrun'}", "--quiet",
        ]  # fmt: skip
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path)))
        log.close()
    return procs


def _natural_partition(tmp_path) -> list[str]:
    """Three clients' own files, one with a record that is not JSON (skipped): its count must not double when the client moves."""
    from tests.helpers import ALPACA_ROWS

    paths = []
    for i in range(3):
        rows = [json.dumps(dict(r, instruction=f"{r['instruction']} ({i}-{k})")) for k in range(3 + 2 * i) for r in ALPACA_ROWS]
        path = tmp_path / f"client{i}.jsonl"
        path.write_text("\n".join(rows[:3] + (["{not json"] if i == 0 else []) + rows[3:]) + "\n")
        paths.append(str(path))
    return [
        "mode=parablock",
        "federation.clients=3",
        "federation.clients_per_round=2",
        "federation.rounds=6",
        "data.format=alpaca",
        "data.on_error=skip",
        "data.partition.kind=natural",
        f"data.client_paths=[{','.join(paths)}]",
    ]


def test_workers_end_bitwise_where_one_process_ends(tmp_path):
    (tmp_path / "nodes").mkdir()
    nodes = _torchrun_two_nodes(tmp_path / "nodes", CASES["parablock-sampled"])
    try:
        cases = {
            **CASES,
            "natural-sampled": _natural_partition(tmp_path),
            "fixed-placement": [*CASES["parablock-sampled"], "simulation.placement=fixed"],
        }
        recipes = {name: tiny_recipe(tmp_path, *ov, "simulation.workers=2", output=f"w2-{name}") for name, ov in cases.items()}
        refused = tiny_recipe(tmp_path, *REFUSED, "simulation.workers=2", output="w2-refused")
        with pytest.raises(FederationError, match="the server rejected the update of round 0: update norm .* exceeds the bound"):
            simulate_many([*recipes.values(), refused])
        for name, ov in cases.items():
            one = run_simulation(tiny_recipe(tmp_path, *ov, output=f"w1-{name}"))
            with open(os.path.join(recipes[name].output_dir, "report.json")) as fh:
                two = json.load(fh)
            assert two["federation"]["globals_sha256"] == one.server["globals_sha256"], name
            # a sampled round is dealt evenly, so clients move between the workers (with their residuals, their data's place)
            assert (two["simulation"]["clients_moved"] > 0) == ("sampled" in name), name
            skipped = sum(rep["final"]["client_data"]["read_skipped"] for rep in one.server["client_reports"].values())
            assert two["data"]["skipped"] == skipped == (1 if name.startswith("natural") else 0), name
            assert [r["clients"] for r in two["rounds"]] == [r["clients"] for r in one.server["rounds"]], name
            # every worker holds the server's state (globals and download residual) bitwise as rank 0 does
            ranks = two["simulation"]["state_sha256"]
            assert len(ranks) == 2 and ranks[0] == ranks[1] == one.workers["state_sha256"][0], name
            assert len(two["final"]["peak_rss_mb_per_worker"]) == 2
            assert two["clock"]["clients_in_memory_peak"] == one.peak_clients_in_memory
        for p in nodes:
            assert p.wait(timeout=120) == 0, (tmp_path / "nodes" / "node0.log").read_text()[-3000:]
        with open(tmp_path / "nodes" / "torchrun" / "report.json") as fh:
            torchrun = json.load(fh)
        with open(os.path.join(recipes["parablock-sampled"].output_dir, "report.json")) as fh:
            assert torchrun["federation"]["globals_sha256"] == json.load(fh)["federation"]["globals_sha256"]
        assert torchrun["simulation"]["workers"] == 2
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
