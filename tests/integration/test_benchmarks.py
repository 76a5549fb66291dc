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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS: dict[str, dict] = {}


def smoke(name: str) -> dict:
    if name in RESULTS:
        return RESULTS[name]
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    done = subprocess.run([sys.executable, path, "--smoke"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    last = [line for line in done.stdout.splitlines() if line.strip()][-1]
    result = json.loads(last)
    assert result["benchmark"] == name and result["form"] == "smoke"
    assert result["machine"]["cpus"] >= 1 and "other_load_cpus" in result["machine"]
    RESULTS[name] = result
    return result


def positive(*values: object) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_overlap():
    r = smoke("overlap")
    assert positive(r["speedup"], r["efficiency"], r["compute_s"], r["comm_s"])
    for mode in ("sync", "parablock"):
        assert positive(r[mode]["compute_s"], r[mode]["comm_s"], r[mode]["round_s"], r[mode]["wall_s"])
    assert r["link"]["uplink_mbps"] > 0 and "emulated" in r["link"]["description"]


def test_overhead():
    r = smoke("overhead")
    assert positive(r["throughput_ratio"], r["interference_ratio"], r["interference_ratio_unthrottled"])
    assert positive(r["plain_tokens_s"], r["federated_tokens_s"])


def test_transport():
    r = smoke("transport")
    assert r["results"]
    for row in r["results"]:
        assert positive(row["mb"], row["grpc_mb_s"], row["socket_mb_s"], row["ratio"])


def test_memory():
    r = smoke("memory")
    assert positive(r["client_rss_ratio"], r["server_peak_over_block"])
    assert r["block_coordinate"]["peak_rss_mb"] > 0 and r["full_adamw"]["peak_rss_mb"] > 0


def test_scaling():
    r = smoke("scaling")
    assert r["results"]
    for row in r["results"]:
        assert row["clients"] >= 2 and positive(row["round_s"], row["aggregate_s"])


def test_the_readme_table_is_made_from_the_results(tmp_path):
    files = []
    for name in ("overlap", "overhead", "transport", "memory", "scaling"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(smoke(name)))
        files.append(str(path))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "table.py"), *files], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("| benchmark |") and len(lines) >= 2 + 2 + 3 + 1 + 2 + 1
    for name in ("overlap", "overhead", "transport", "memory", "scaling"):
        assert any(line.startswith(f"| {name} |") for line in lines), name
