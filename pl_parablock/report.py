"""The run report: per-round timings of every client, server rounds, totals.

``report.json`` holds, per round, the server's record (clients expected,
arrived, rejected, late; aggregation time; weighted loss) and every client's
record (``compute_s``, ``upload_s``, ``server_wait_s``, ``download_s``,
``blocked_s``, ``bytes_up``, ``bytes_down``, ``loss``); per client, totals;
per run, the wall time, the communication time hidden behind computation
(``comm_hidden_fraction = 1 - blocked / comm``), the final metrics of the
global model and the link (labelled as emulation when it is one).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pl_parablock.config import Recipe, to_dict
from pl_parablock.federation.link import Link

__all__ = ["build_report", "format_summary", "write_report"]

CLIENT_FIELDS = ("compute_s", "upload_s", "server_wait_s", "download_s", "blocked_s", "bytes_up", "bytes_down", "loss")


def _num(rec: dict[str, Any], key: str) -> float:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) else 0.0


def build_report(recipe: Recipe, server: dict[str, Any], *, wall_s: float, link: Link, output_dir: str) -> dict[str, Any]:
    """Merge the server's view and the clients' reports into the run report."""
    t0 = float(server.get("started_at", 0.0))
    client_reports: dict[str, Any] = server.get("client_reports", {})
    by_round: dict[int, list[dict[str, Any]]] = {}
    clients = []
    for cid, rep in sorted(client_reports.items(), key=lambda kv: int(kv[0])):
        totals = {k: 0.0 for k in ("compute_s", "upload_s", "server_wait_s", "download_s", "blocked_s", "bytes_up", "bytes_down")}
        for rec in rep.get("rounds", []):
            entry = {"client_id": int(cid)}
            for k in (*CLIENT_FIELDS, "samples", "weight", "kind", "version"):
                if k in rec:
                    entry[k] = rec[k]
            for k in ("started_at", "ended_at", "sent_at", "arrived_at", "applied_at"):
                if isinstance(rec.get(k), (int, float)):
                    entry[k] = rec[k] - t0
            by_round.setdefault(int(rec["round"]), []).append(entry)
            for k in totals:
                totals[k] += _num(rec, k)
        comm = totals["upload_s"] + totals["server_wait_s"] + totals["download_s"]
        data = rep.get("final", {}).get("client_data", {})
        clients.append(
            {
                "client_id": int(cid),
                "shard_size": data.get("shard_size", rep.get("shard_size")),
                "data_skipped": int(data.get("read_skipped", 0)) + int(data.get("encode_skipped", 0)),
                **totals,
                "comm_s": comm,
                "comm_hidden_fraction": 1.0 - totals["blocked_s"] / comm if comm > 0 else None,
            }
        )
    rounds = []
    for srec in server.get("rounds", []):
        r = int(srec["round"])
        rounds.append({**srec, "client_records": sorted(by_round.get(r, []), key=lambda e: e["client_id"])})

    comm_total = sum(c["comm_s"] for c in clients)
    blocked_total = sum(c["blocked_s"] for c in clients)
    final: dict[str, Any] = {}
    first = client_reports.get("0") or (next(iter(client_reports.values())) if client_reports else {})
    final.update({k: v for k, v in first.get("final", {}).items() if k not in ("eval_curve", "client_data")})
    last_losses = [r["loss"] for r in rounds if r.get("loss") is not None]
    final["loss"] = last_losses[-1] if last_losses else None
    final.setdefault("eval_loss", None)
    if recipe.data.format in ("synthetic", "gsm8k"):
        final.setdefault("exact_match", None)

    return {
        "mode": recipe.mode,
        "wall_s": wall_s,
        "data": _data_summary(recipe, client_reports),
        "rounds": rounds,
        "clients": clients,
        "final": final,
        "eval_curve": first.get("final", {}).get("eval_curve", []),
        "totals": {
            "compute_s": sum(c["compute_s"] for c in clients),
            "comm_s": comm_total,
            "blocked_s": blocked_total,
            "comm_hidden_fraction": 1.0 - blocked_total / comm_total if comm_total > 0 else None,
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "bytes_down": sum(c["bytes_down"] for c in clients),
            "aggregation_s": sum(float(r.get("aggregation_s") or 0.0) for r in rounds),
        },
        "link": {
            "emulated": link.emulated,
            "description": link.describe(),
            "uplink_mbps": link.uplink_mbps,
            "downlink_mbps": link.downlink_mbps,
            "latency_ms": link.latency_ms,
        },
        "federation": {
            "clients": server.get("clients"),
            "rounds_planned": server.get("rounds_planned"),
            "rounds_closed": len(rounds),
            "schedule": server.get("schedule"),
            "blocks": [b["name"] for b in server.get("blocks", [])],
            "server_lr": server.get("server_lr"),
            "rejected_outside_rounds": server.get("rejected_outside_rounds", []),
        },
        "model_dir": final.get("model_dir"),
        "output_dir": os.path.abspath(output_dir),
        "recipe": to_dict(recipe),
    }


def _data_summary(recipe: Recipe, client_reports: dict[str, Any]) -> dict[str, Any]:
    """Shard sizes and the bad records skipped (``data.on_error=skip``), counted once.

    With a shared data file (iid, dirichlet) every client read the same bad
    rows, so the file's count is taken once (client 0 also reads the
    evaluation file); with a natural partition each client read its own.
    """
    reports = [rep.get("final", {}).get("client_data", {}) for _, rep in sorted(client_reports.items(), key=lambda kv: int(kv[0]))]
    reads = [int(d.get("read_skipped", 0)) for d in reports]
    encodes = [int(d.get("encode_skipped", 0)) for d in reports]
    read = sum(reads) if recipe.data.partition.kind == "natural" else max(reads, default=0)
    examples = [e for d in reports for e in d.get("skipped_examples", [])][:5]
    return {
        "format": recipe.data.format,
        "partition": recipe.data.partition.kind,
        "shard_sizes": [d.get("shard_size") for d in reports],
        "on_error": recipe.data.on_error,
        "skipped": read + sum(encodes),
        "skipped_examples": examples,
    }


def write_report(report: dict[str, Any], output_dir: str) -> str:
    """Write ``report.json`` atomically; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "report.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def format_summary(report: dict[str, Any], report_path: str | None = None) -> str:
    """A table of the run for people."""
    f, t = report["final"], report["totals"]

    def fmt(v: Any, spec: str = ".4f") -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "n/a"

    hidden = t.get("comm_hidden_fraction")
    fed = report.get("federation", {})
    rows = [
        ("mode", f"{report['mode']}  ({fed.get('clients')} clients, {fed.get('rounds_closed')}/{fed.get('rounds_planned')} rounds)"),
        ("final loss", fmt(f.get("loss"))),
        ("eval loss", fmt(f.get("eval_loss")) + (f"  (perplexity {fmt(f.get('perplexity'), '.2f')})" if f.get("perplexity") else "")),
    ]
    if "exact_match" in f:
        n = f.get("exact_match_samples")
        rows.append(("exact match", fmt(f.get("exact_match"), ".3f") + (f"  ({n} math questions)" if n else "")))
    skipped = report.get("data", {}).get("skipped", 0)
    if skipped:
        rows.append(("data", f"skipped {skipped} bad records (data.on_error=skip); examples in report.json"))
    rows += [
        ("wall time", f"{report['wall_s']:.1f} s"),
        ("compute", f"{t['compute_s']:.1f} s over all clients"),
        ("communication", f"{t['comm_s']:.1f} s, blocked {t['blocked_s']:.1f} s"),
        ("comm hidden", (f"{max(0.0, 100 * hidden):.0f} %" if hidden is not None else "n/a") + "  (1 - blocked / communication)"),
        ("bytes moved", f"up {_mb(t['bytes_up'])}, down {_mb(t['bytes_down'])}"),
        ("link", report["link"]["description"]),
        ("model", str(report.get("model_dir") or "not saved") + ("  (PEFT adapter)" if f.get("model_format") == "peft_adapter" else "")),
    ]
    if f.get("merged_model_dir"):
        rows.append(("merged model", str(f["merged_model_dir"])))
    rows += [
        ("report", report_path or os.path.join(report["output_dir"], "report.json")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
