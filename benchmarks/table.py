"""The performance table (docs/performance.md), from the benchmarks' JSON results.

    python benchmarks/table.py --run [--quick] [--save DIR]   # run all six, then print the table
    python benchmarks/table.py RESULT.json ...                # print the table of saved results

Each result is the last line a benchmark printed (``python
benchmarks/NAME.py ... | tail -1 > NAME.json``). The table is Markdown: one
row per figure with its target, and the machine's load while it ran
(``other_load_cpus``: CPUs other processes kept busy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from _common import HERE, REPO, last_json

NAMES = ("overlap", "overhead", "transport", "memory", "scaling", "simulation")


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def _load(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    return f"{_fmt(m.get('other_load_cpus'))} CPUs"


def rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, figure, measured, target, load) rows."""
    out: list[tuple[str, str, str, str, str]] = []
    if r := results.get("overlap"):
        link = r.get("link", {})
        pairs = f"{r['pairs']} pairs in alternating order, pooled, " if r.get("pairs", 1) > 1 else ""
        setup = f"{r['clients']} clients, {r['rounds']} rounds, {pairs}{link.get('description', '')}"
        out += [
            (
                "overlap",
                f"speedup = sync / parablock training time at comm/compute {_fmt(r.get('measured_ratio'))} ({setup})",
                f"{_fmt(r['speedup'])} (ideal {_fmt(r.get('speedup_ideal', r.get('speedup_bound')))})",
                "≥ 1.85 at ratio 1",
                _load(r),
            ),
            (
                "overlap",
                f"efficiency = max(compute {_fmt(r['compute_s'], '.3f')} s, comm {_fmt(r['comm_s'], '.3f')} s) of the sync run "
                "/ parablock round",
                f"{_fmt(r['efficiency'])} (own rounds' pairwise bound: {_fmt(r.get('self_pairwise', r.get('efficiency_pairwise')))})",
                "≥ 0.95",
                _load(r),
            ),
        ]
        for s in r.get("sweep", []):
            if s["ratio"] != r["ratio"]:
                out.append(
                    (
                        "overlap",
                        f"speedup at comm/compute {_fmt(s['measured_ratio'])} (target ratio {s['ratio']:g})",
                        f"{_fmt(s['speedup'])} (ideal {_fmt(s.get('speedup_ideal', s.get('speedup_bound')))}), "
                        f"efficiency {_fmt(s['efficiency'])}",
                        "",
                        _load(r),
                    )
                )
    if r := results.get("overhead"):
        out += [
            (
                "overhead",
                "client tokens/s: Trainer + FederatedBlockStrategy / plain PyTorch loop",
                f"{_fmt(r['throughput_ratio'])} (median of {len(r['runs']['plain'])} pairs; {_fmt(r['federated_tokens_s'], '.0f')} / "
                f"{_fmt(r['plain_tokens_s'], '.0f')} tokens/s)",
                "≥ 0.95",
                _load(r),
            ),
            (
                "overhead",
                f"training tokens/s while sending a {r['block_mb']} MB block over an emulated 1 Gbit/s link / idle",
                _fmt(r["interference_ratio"]),
                "≥ 0.95",
                _load(r),
            ),
        ]
        if r.get("interference_ratio_unthrottled") is not None:
            out.append(
                (
                    "overhead",
                    "the same over unthrottled loopback (server on the same 2 cores)",
                    _fmt(r["interference_ratio_unthrottled"]),
                    "",
                    _load(r),
                )
            )
    if r := results.get("transport"):
        for x in r["results"]:
            out.append(
                (
                    "transport",
                    f"push + pull of a {x['mb']} MB block, federation / raw TCP socket",
                    f"{_fmt(x['ratio'])} ({_fmt(x['grpc_mb_s'], '.0f')} / {_fmt(x['socket_mb_s'], '.0f')} MB/s; "
                    f"blocks over gRPC alone {_fmt(x.get('ratio_grpc_only'))}; raw gRPC {_fmt(x['raw_grpc_mb_s'], '.0f')} MB/s)",
                    "≥ 0.7 at ≥ 16 MB" if x["mb"] >= 16 else "",
                    _load(r),
                )
            )
    if r := results.get("memory"):
        out += [
            (
                "memory",
                f"client peak RSS, block coordinate / full AdamW "
                f"({r['model']['num_hidden_layers']} layers, {r['params_mb']} MB of weights)",
                f"{_fmt(r['client_rss_ratio'])} ({r['block_coordinate']['peak_rss_mb']:.0f} / {r['full_adamw']['peak_rss_mb']:.0f} MB; "
                f"{_fmt(r['client_rss_ratio_above_baseline'])} above the runtime's own RSS)",
                "≤ 0.6",
                _load(r),
            ),
        ]
        for s in r["server"]:
            out.append(
                (
                    "memory",
                    f"server peak memory for {s['clients']} clients' updates of a {s['block_mb']} MB block, in blocks",
                    _fmt(s["peak_over_block"], ".1f"),
                    "≤ 3",
                    _load(r),
                )
            )
        if s := r.get("server_grpc_only"):
            out.append(
                (
                    "memory",
                    f"the same for {s['clients']} clients with blocks over gRPC alone (`federation.data_port: null`)",
                    _fmt(s["peak_over_block"], ".1f"),
                    "≤ 3",
                    _load(r),
                )
            )
    if r := results.get("scaling"):
        for x in r["results"]:
            if "server_cpu_ms_per_client_round" in x:
                measured = (
                    f"{_fmt(x['rounds_per_s'], '.2f')} rounds/s; CPU per round: server {_fmt(x['server_cpu_ms_per_round'], '.0f')} ms "
                    f"({_fmt(x['server_cpu_ms_per_client_round'], '.1f')} per client), "
                    f"clients {_fmt(x['clients_cpu_ms_per_round'], '.0f')} ms"
                )
            else:
                measured = f"{_fmt(x['rounds_per_s'], '.1f')} rounds/s, {_fmt(x['aggregate_s'] * 1000, '.2f')} ms"
            out.append(
                (
                    "scaling",
                    f"{x['clients']} client processes, {x.get('block_mb', r['block_mb']):.2f} MB blocks: rounds/s, CPU per round",
                    measured,
                    "",
                    _load(r),
                )
            )
    if r := results.get("links"):
        rate = r["link"]["rate_mbit"]
        for x in r["results"]:
            window = "" if x["window"] == "adaptive" else f", gRPC window fixed at {x['window']} KiB"
            alone = f"; over gRPC alone {_fmt(x['grpc_push_up_vs_link'])}" if "grpc_push_up_vs_link" in x else ""
            out.append(
                (
                    "links",
                    f"push of a {r['block_mb']:g} MB block over {rate:g} Mbit/s at RTT {x['rtt_ms']:g} ms{window}: achieved / link rate",
                    f"{_fmt(x['push_up_vs_link'])} ({_fmt(x['push_up_mbit_s'], '.0f')} Mbit/s; "
                    f"raw socket {_fmt(x['raw_up_mbit_s'], '.0f')}; pull {_fmt(x.get('pull_down_vs_link'))}{alone})",
                    "",
                    _load(r),
                )
            )
    if r := results.get("staleness"):
        by_ratio: dict[float, dict[int, dict[str, Any]]] = {}
        for row in r["rows"]:
            by_ratio.setdefault(row["target_ratio"], {})[row["staleness"]] = row
        for ratio, ks in by_ratio.items():
            if 1 in ks and 2 in ks:
                k2 = ks[2]
                out.append(
                    (
                        "staleness",
                        f"k = 2 at comm/compute {_fmt(k2['comm_over_compute'])} (target {ratio:g}): efficiency; round / k = 1's round "
                        f"({r['clients']} {'client processes' if r.get('processes') else 'clients as threads'}, {r['rounds']} rounds)",
                        f"{_fmt(k2['efficiency'])}; {_fmt(k2['round_vs_k1'])} ({_fmt(k2['round_s'], '.3f')} / "
                        f"{_fmt(ks[1]['round_s'], '.3f')} s; x{_fmt(k2['speedup_vs_sync'])} vs sync)",
                        "≥ 0.9; ≤ 0.8" if ratio == 2.0 else "",
                        _load(r),
                    )
                )
        for x in r.get("loss", []):
            if x["staleness"] in (1, 2) and not x["damping"] and x["blocks"] == max(y["blocks"] for y in r["loss"]):
                out.append(
                    (
                        "staleness",
                        f"final eval loss, k = {x['staleness']} / sync (simulator, {x['seeds']} seeds, {x['blocks']} blocks)",
                        f"{_fmt(x['mean'], '.4f')} ± {_fmt(x['std'], '.4f')}",
                        "≤ 1.02" if x["staleness"] == 1 else "≤ 1.03",
                        _load(r),
                    )
                )
    if r := results.get("simulation"):
        for c in r.get("clock", []):
            out.append(
                (
                    "simulation",
                    f"simulated / measured training time, quickstart, 2 clients, its emulated link: {c['mode']}",
                    f"{_fmt(c['ratio'])} ({_fmt(c['simulated_s'])} / {_fmt(c['measured_s'])} s; compute factor "
                    f"{_fmt(c['compute_factor'])}; {_fmt(c.get('ratio_factor_1'))} without it)",
                    "0.9–1.1",
                    _load(r),
                )
            )
        runs = r.get("runs", {})
        big = next((v for k, v in runs.items() if k.startswith("sim_") and v is not None and v.get("clients", 0) >= 1000), None)
        small = next((v for k, v in runs.items() if k.startswith("sim_") and v is not None and v is not big), None)
        plain = runs.get("plain") or {}
        if big is not None:
            out.append(
                (
                    "simulation",
                    f"{big['clients']} virtual clients, {big['per_round']} per round: training tokens/s, simulator / a plain client "
                    "on the same batches",
                    f"{_fmt(r.get('throughput_ratio'))} ({_fmt(big.get('tokens_per_s'), '.0f')} / "
                    f"{_fmt(plain.get('tokens_per_s'), '.0f')} tokens/s)",
                    "≥ 0.9",
                    _load(r),
                )
            )
            if small is not None:
                out.append(
                    (
                        "simulation",
                        f"peak RSS, {big['clients']} virtual clients / {small['clients']} ({big['per_round']} per round)",
                        f"{_fmt(r.get('rss_ratio'))} ({_fmt(big['peak_rss_mb'], '.0f')} / {_fmt(small['peak_rss_mb'], '.0f')} MB)",
                        "≤ 1.1",
                        _load(r),
                    )
                )
    return out


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| benchmark | figure | measured | target | other load |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows(results)]
    return "\n".join(lines)


def run_all(quick: bool, save: str | None) -> dict[str, dict[str, Any]]:
    results = {}
    for name in NAMES:
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py")] + (["--quick"] if quick else [])
        print(f"running {' '.join(cmd[1:])} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = last_json(done.stdout)
        if save:
            os.makedirs(save, exist_ok=True)
            with open(os.path.join(save, f"{name}.json"), "w", encoding="utf-8") as fh:
                json.dump(results[name], fh, indent=1)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="*", help="saved results (the JSON line each benchmark printed last)")
    p.add_argument("--run", action="store_true", help="run the six benchmarks first")
    p.add_argument("--quick", action="store_true", help="with --run: their quick forms")
    p.add_argument("--save", help="with --run: keep each result as DIR/NAME.json")
    args = p.parse_args(argv)
    results: dict[str, dict[str, Any]] = run_all(args.quick, args.save) if args.run else {}
    for path in args.results:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        r = last_json(text)
        results[str(r.get("benchmark"))] = r
    if not results:
        p.error("give result files or --run")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
