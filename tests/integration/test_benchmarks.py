"""Every benchmark runs in its smallest form and prints its JSON with the keys scripts compare across versions.

Benchmarks measure; these tests only check that each one runs and reports
what it must (no speed or memory target is asserted here).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("overlap", "overhead", "transport", "memory", "scaling", "staleness")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """All six smoke forms at once (they mostly wait on process start-up, so they share 2 cores well)."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    procs = {}
    for name in NAMES:
        out, err = open(tmp / f"{name}.out", "w+"), open(tmp / f"{name}.err", "w+")
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--smoke"]
        procs[name] = (subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT), out, err)
    runs = {}
    try:
        for name, (proc, out, err) in procs.items():
            proc.wait(timeout=300)
            out.seek(0)
            err.seek(0)
            runs[name] = (proc.returncode, out.read(), err.read())
    finally:
        for proc, out, err in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
    return runs


@pytest.fixture
def smoke(smoke_runs):
    def result(name: str) -> dict:
        status, stdout, stderr = smoke_runs[name]
        assert status == 0, stdout[-2000:] + stderr[-4000:]
        last = [line for line in stdout.splitlines() if line.strip()][-1]
        r = json.loads(last)
        assert r["benchmark"] == name and r["form"] == "smoke"
        assert r["machine"]["cpus"] >= 1 and "other_load_cpus" in r["machine"]
        return r

    return result


def positive(*values: object) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_overlap(smoke):
    r = smoke("overlap")
    assert positive(r["speedup"], r["efficiency"], r["compute_s"], r["comm_s"])
    for mode in ("sync", "parablock"):
        assert positive(r[mode]["compute_s"], r[mode]["comm_s"], r[mode]["round_s"], r[mode]["wall_s"])
    assert r["link"]["uplink_mbps"] > 0 and "emulated" in r["link"]["description"]


def test_overhead(smoke):
    r = smoke("overhead")
    assert positive(r["throughput_ratio"], r["interference_ratio"])
    assert positive(r["plain_tokens_s"], r["federated_tokens_s"])


def test_transport(smoke):
    r = smoke("transport")
    assert r["results"]
    for row in r["results"]:
        assert positive(row["mb"], row["grpc_mb_s"], row["socket_mb_s"], row["ratio"])


def test_memory(smoke):
    r = smoke("memory")
    assert positive(r["client_rss_ratio"], r["server_peak_over_block"])
    assert r["block_coordinate"]["peak_rss_mb"] > 0 and r["full_adamw"]["peak_rss_mb"] > 0


def test_scaling(smoke):
    r = smoke("scaling")
    assert r["results"]
    for row in r["results"]:
        assert row["clients"] >= 2 and positive(row["round_s"], row["aggregate_s"])


def test_staleness(smoke):
    r = smoke("staleness")
    assert {row["staleness"] for row in r["rows"]} == {0, 1, 2, 3}
    for row in r["rows"]:
        assert positive(row["comm_over_compute"], row["round_s"], row["ideal_round_s"], row["efficiency"], row["speedup_vs_sync"])
    assert {(x["staleness"], x["damping"]) for x in r["loss"]} >= {(0, False), (1, False), (2, False), (3, False), (2, True)}
    for x in r["loss"]:
        assert x["seeds"] >= 2 and positive(x["mean"]) and x["std"] >= 0
    assert [m["peak_blocks"] for m in r["memory"] if m["blocks"] == 4] == [1, 2, 3, 4]


def test_the_readme_table_is_made_from_the_results(smoke, tmp_path):
    files = []
    for name in NAMES:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(smoke(name)))
        files.append(str(path))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "table.py"), *files], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("| benchmark |") and len(lines) >= 2 + 2 + 2 + 1 + 2 + 1
    for name in NAMES:
        assert any(line.startswith(f"| {name} |") for line in lines), name
