"""The run report: per-round timings of every client, server rounds, totals, and their pictures.

``report.json`` holds, per round, the server's record (clients expected,
arrived, rejected, late; aggregation time; weighted loss) and every client's
record (``compute_s``, ``upload_s``, ``server_wait_s``, ``download_s``,
``blocked_s``, ``bytes_up``, ``bytes_down``, ``loss``); per client, totals;
per run, the wall time (``wall_s``: the whole run, process starts and final
evaluation included; ``train_wall_s``: from the first round's start to the
last aggregate applied on every client), the communication time hidden
behind computation (``comm_hidden_fraction = 1 - blocked / comm``), the
final metrics of the global model and the link (labelled as emulation when
it is one). A run of the simulator (``python -m pl_parablock.simulate``)
writes the same report with its times from the simulated clock: it holds
``clock: {simulated: true, ...}``, and the summary, the pictures and the
comparison label its times as simulated.

Pictures (matplotlib, no display needed): ``timeline.png`` (one row per
client: its compute bars above its communication bars, so the overlap is
visible) and ``loss.png`` (loss versus wall-clock and versus round). The
launcher writes both into the run's output directory.

Command line::

    python -m pl_parablock.report RUN              # the run's table; rewrites its pictures
    python -m pl_parablock.report RUN_A RUN_B      # side by side, and a comparison picture

``RUN`` is a run's output directory (or its ``report.json``). Bad input
prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pl_parablock.errors import ParaBlockError
from pl_parablock.recipe.load import to_dict
from pl_parablock.recipe.schema import Recipe
from pl_parablock.wire.link import Link

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "ReportError",
    "build_report",
    "format_comparison",
    "format_summary",
    "load_report",
    "mean_std",
    "plot_comparison",
    "plot_loss",
    "plot_seed_comparison",
    "plot_timeline",
    "write_pictures",
    "write_report",
]


class ReportError(ParaBlockError):
    """A path given to the report tool is not a run's report."""


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
                "blocks_sha256": rep.get("final", {}).get("blocks_sha256"),
                "peak_rss_mb": rep.get("final", {}).get("peak_rss_mb"),
                "events": [{**e, "at": e["at"] - t0} if isinstance(e.get("at"), (int, float)) else e for e in rep.get("events", [])],
            }
        )
    rounds = []
    for srec in server.get("rounds", []):
        r = int(srec["round"])
        rounds.append({**srec, "client_records": sorted(by_round.get(r, []), key=lambda e: e["client_id"])})

    starts = [float(e["started_at"]) for recs in by_round.values() for e in recs if "started_at" in e]
    ends = [float(v) for recs in by_round.values() for e in recs if isinstance(v := e.get("applied_at", e.get("ended_at")), (int, float))]
    comm_total = sum(c["comm_s"] for c in clients)
    blocked_total = sum(c["blocked_s"] for c in clients)
    final: dict[str, Any] = {}
    first = client_reports.get("0") or (next(iter(client_reports.values())) if client_reports else {})
    final.update({k: v for k, v in first.get("final", {}).items() if k not in ("eval_curve", "client_data")})
    evaluator = (server.get("evaluator") or {}).get("report")  # an evaluator of its own evaluated and saved the model
    if evaluator:
        final.update({k: v for k, v in evaluator.get("final", {}).items() if k != "eval_curve"})
    curve = evaluator.get("eval_curve", []) if evaluator else first.get("final", {}).get("eval_curve", [])
    last_losses = [r["loss"] for r in rounds if r.get("loss") is not None]
    final["loss"] = last_losses[-1] if last_losses else None
    final.setdefault("eval_loss", None)
    if recipe.data.format in ("synthetic", "gsm8k"):
        final.setdefault("exact_match", None)

    return {
        "mode": recipe.mode,
        "wall_s": wall_s,
        "data": _data_summary(recipe, client_reports),
        "train_wall_s": max(ends) - min(starts) if starts and ends else None,
        "rounds": rounds,
        "clients": clients,
        "final": final,
        "eval_curve": curve,
        "evaluator": _evaluator_summary(server.get("evaluator")),
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
            "globals_sha256": server.get("globals_sha256"),
            "blocks": [b["name"] for b in server.get("blocks", [])],
            "server_lr": server.get("server_lr"),
            "server_optimizer": server.get("server_optimizer"),
            "rejected_outside_rounds": server.get("rejected_outside_rounds", []),
            "aggregation": server.get("aggregation"),
            "compression": server.get("compression"),
            "joined": server.get("joined", []),
            "dropped": server.get("dropped", []),
            "never_reported": server.get("never_reported", []),
            "resumed_from_round": server.get("resumed_from_round"),
        },
        "model_dir": final.get("model_dir"),
        "output_dir": os.path.abspath(output_dir),
        "recipe": to_dict(recipe),
    }


def _evaluator_summary(desk: dict[str, Any] | None) -> dict[str, Any] | None:
    """Who evaluated the global model, when an evaluator of its own did (``None``: client 0)."""
    if not desk:
        return None
    report = desk.get("report") or {}
    return {
        "reported": desk.get("report") is not None,
        # the points the evaluator asked for and got a later one instead (or, without its report, those the server let go)
        "skipped_points": report.get("skipped_points", []) if desk.get("report") is not None else desk.get("dropped_points", []),
        "wall_s": report.get("wall_s"),
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
        ("wall time", f"{report['wall_s']:.1f} s" + _training(report) + _clock_note(report)),
        ("compute", f"{t['compute_s']:.1f} s over all clients"),
        ("communication", f"{t['comm_s']:.1f} s, blocked {t['blocked_s']:.1f} s"),
        ("comm hidden", (f"{max(0.0, 100 * hidden):.0f} %" if hidden is not None else "n/a") + "  (1 - blocked / communication)"),
        ("bytes moved", f"up {_mb(t['bytes_up'])}, down {_mb(t['bytes_down'])}{_codecs(report)}"),
        ("link", report["link"]["description"]),
        ("model", str(report.get("model_dir") or "not saved") + ("  (PEFT adapter)" if f.get("model_format") == "peft_adapter" else "")),
    ]
    if f.get("merged_model_dir"):
        rows.append(("merged model", str(f["merged_model_dir"])))
    rows += [
        ("report", report_path or os.path.join(report["output_dir"], "report.json")),
    ]
    pictures = report.get("pictures") or {}
    if pictures:
        rows.append(("pictures", ", ".join(os.path.basename(p) for p in pictures.values()) + "  (next to the report)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


# ------------------------------------------------------------------ pictures

COLORS = {
    "compute": "#4C72B0",
    "upload": "#DD8452",
    "server": "#B0B0B0",
    "download": "#55A868",
    "blocked": "#C44E52",
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _client_intervals(report: dict[str, Any]) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """Per client, ``(start, width)`` intervals of compute, upload, server wait, download and blocked time."""
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for rnd in report.get("rounds", []):
        for c in rnd.get("client_records", []):
            lanes = out.setdefault(int(c["client_id"]), {k: [] for k in COLORS})
            start, end = c.get("started_at"), c.get("ended_at")
            if isinstance(start, (int, float)) and isinstance(end, (int, float)):
                lanes["compute"].append((start, max(end - start, 0.0)))
            sent, arrived = c.get("sent_at"), c.get("arrived_at")
            up, wait, down = (float(c.get(k) or 0.0) for k in ("upload_s", "server_wait_s", "download_s"))
            if isinstance(sent, (int, float)):
                lanes["upload"].append((float(sent), up))
                # the download ends when the aggregate arrived; it began after the upload (at once in half duplex, when
                # the download thread was free in full duplex, while the next round uploads)
                t = float(arrived) - down - wait if isinstance(arrived, (int, float)) else float(sent) + up
                lanes["server"].append((t, wait))
                lanes["download"].append((t + wait, down))
            applied, blocked = c.get("applied_at"), float(c.get("blocked_s") or 0.0)
            if isinstance(applied, (int, float)) and blocked > 0:
                lanes["blocked"].append((applied - blocked, blocked))
    return out


def _run_title(report: dict[str, Any]) -> str:
    fed = report.get("federation", {})
    hidden = report.get("totals", {}).get("comm_hidden_fraction")
    parts = [
        f"{report.get('mode')}: {fed.get('clients')} clients, {fed.get('rounds_closed')} rounds",
        f"wall {report.get('wall_s', float('nan')):.1f} s" + _training(report) + (" simulated" if _simulated(report) else ""),
    ]
    if hidden is not None:
        parts.append(f"comm hidden {max(0.0, 100 * hidden):.0f} %")
    return ", ".join(parts)


def _simulated(report: dict[str, Any]) -> bool:
    return bool((report.get("clock") or {}).get("simulated"))


def _clock_note(report: dict[str, Any]) -> str:
    """``'  (simulated clock)'`` for a simulator's run: its times are the event simulation's, not measured."""
    return "  (simulated clock)" if _simulated(report) else ""


def _training(report: dict[str, Any]) -> str:
    train = report.get("train_wall_s")
    return f" (training {train:.1f} s)" if isinstance(train, (int, float)) else ""


def _codecs(report: dict[str, Any]) -> str:
    """`` (int8 up, int8 down, error feedback)`` when updates travel compressed; ``''`` otherwise."""
    c = (report.get("federation") or {}).get("compression") or {}
    if not c or (c.get("upload") == "none" and c.get("download") == "none"):
        return ""
    feedback = ", error feedback" if c.get("error_feedback") else ""
    return f" ({c.get('upload')} up, {c.get('download')} down{feedback})"


def _link_label(report: dict[str, Any]) -> str:
    link = report.get("link") or {}
    return str(link.get("description") or "link: unknown")


def plot_timeline(report: dict[str, Any], path: str, max_clients: int = 32) -> str:
    """Draw the run's timeline: per client, compute bars above communication bars.

    Compute bars carry the round number when they are wide enough; the
    communication lanes show the upload (upper) and, below it, waiting for
    the server's aggregate and the download (with ``federation.staleness``
    >= 2 the transmitter is full duplex and a round's upload overlaps the
    previous round's wait and download); red marks the time the training loop waited (blocked). The x
    axis is seconds since the server started (the simulated clock's, for
    a simulator's run). At most ``max_clients`` rows are drawn. Returns ``path``.
    """
    from matplotlib.patches import Patch

    lanes = _client_intervals(report)
    clients = sorted(lanes)[:max_clients]
    shown = f"  (the first {len(clients)} of {len(lanes)} clients that trained)" if len(lanes) > len(clients) else ""
    fig = _figure(12.0, 1.6 + 0.75 * max(len(clients), 1))
    ax = fig.subplots()
    ends = [s + w for c in lanes.values() for iv in c.values() for s, w in iv]
    starts = [s for c in lanes.values() for iv in c.values() for s, _ in iv]
    span = (max(ends) - min(starts)) if ends else 1.0
    rounds_by_start: dict[tuple[int, float], int] = {}
    for rnd in report.get("rounds", []):
        for c in rnd.get("client_records", []):
            if isinstance(c.get("started_at"), (int, float)):
                rounds_by_start[(int(c["client_id"]), float(c["started_at"]))] = int(rnd["round"])
    for row, cid in enumerate(clients):
        y = len(clients) - 1 - row
        lane = lanes[cid]
        ax.broken_barh(lane["compute"], (y + 0.52, 0.36), facecolors=COLORS["compute"], edgecolor="white", linewidth=0.4)
        ax.broken_barh(lane["blocked"], (y + 0.52, 0.36), facecolors=COLORS["blocked"], alpha=0.85)
        # upload above, the wait for the aggregate and the download below: in full duplex (staleness >= 2) a round's
        # upload runs while the round before waits and downloads, and the two bars overlap in time
        ax.broken_barh(lane["upload"], (y + 0.31, 0.17), facecolors=COLORS["upload"], edgecolor="white", linewidth=0.3)
        for name in ("server", "download"):
            ax.broken_barh(lane[name], (y + 0.12, 0.17), facecolors=COLORS[name], edgecolor="white", linewidth=0.3)
        for s, w in lane["compute"]:
            t = rounds_by_start.get((cid, s))
            if t is not None and w / span * 1100 > 6 + 6 * len(str(t + 1)):
                ax.text(s + w / 2, y + 0.70, str(t + 1), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks([len(clients) - 1 - i + 0.5 for i in range(len(clients))], [f"client {c}" for c in clients])
    ax.set_ylim(0, max(len(clients), 1))
    ax.set_xlabel("simulated time since the start (s)" if _simulated(report) else "time since the server started (s)")
    ax.set_title(f"Timeline — {_run_title(report)}{shown}\n{_link_label(report)}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    legend = [
        Patch(color=COLORS["compute"], label="compute (round number inside)"),
        Patch(color=COLORS["blocked"], label="training blocked, waiting for an aggregate"),
        Patch(color=COLORS["upload"], label="upload"),
        Patch(color=COLORS["server"], label="waiting for the server's aggregate"),
        Patch(color=COLORS["download"], label="download"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    fig.savefig(path)
    return path


def _loss_points(report: dict[str, Any]) -> tuple[list[float], list[int], list[float]]:
    times, rounds, losses = [], [], []
    for rnd in report.get("rounds", []):
        loss, closed = rnd.get("loss"), rnd.get("closed_at")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            times.append(float(closed) if isinstance(closed, (int, float)) else float("nan"))
            rounds.append(int(rnd["round"]) + 1)
            losses.append(float(loss))
    return times, rounds, losses


def _draw_losses(ax_time: Axes, ax_round: Axes, runs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    for label, report in runs:
        times, rounds, losses = _loss_points(report)
        clocked = f"{label} (simulated clock)" if _simulated(report) else label
        (line,) = ax_time.plot(times, losses, marker=".", markersize=4, linewidth=1.3, label=clocked)
        ax_round.plot(rounds, losses, marker=".", markersize=4, linewidth=1.3, color=line.get_color(), label=label)
        curve = [p for p in report.get("eval_curve") or [] if isinstance(p.get("eval_loss"), (int, float))]
        final_eval = (report.get("final") or {}).get("eval_loss")
        if curve:
            ax_round.plot(
                [p["round"] for p in curve],
                [p["eval_loss"] for p in curve],
                "s--",
                color=line.get_color(),
                markersize=4,
                label=f"{label}: eval loss of the global model",
            )
        if isinstance(final_eval, (int, float)) and rounds:
            ax_round.plot([rounds[-1]], [final_eval], marker="*", markersize=11, color=line.get_color(), linestyle="none")
    simulated = any(_simulated(r) for _, r in runs)
    ax_time.set_xlabel("wall-clock: time since the start (s)" + ("; simulated clock where marked" if simulated else ""))
    ax_time.set_title("loss vs wall-clock", fontsize=10)
    ax_round.set_xlabel("round")
    evaluated = any(report.get("eval_curve") for _, report in runs)
    marks = "\u25a0 eval loss of the global model, \u2605 final" if evaluated else "\u2605 final eval loss of the global model"
    ax_round.set_title(f"loss vs round  ({marks})", fontsize=10)
    ax_time.set_ylabel("training loss (clients' weighted mean)")
    ax_round.set_ylabel("loss")
    for ax in (ax_time, ax_round):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def plot_loss(report: dict[str, Any], path: str) -> str:
    """Draw the run's training loss versus wall-clock and versus round. Returns ``path``."""
    fig = _figure(12.0, 4.2)
    ax_time, ax_round = fig.subplots(1, 2)
    _draw_losses(ax_time, ax_round, [(str(report.get("mode")), report)])
    fig.suptitle(f"{_run_title(report)} — {_link_label(report)}", fontsize=10)
    fig.savefig(path)
    return path


def plot_comparison(runs: Sequence[tuple[str, dict[str, Any]]], path: str) -> str:
    """Draw several runs' loss versus wall-clock and versus round on shared axes. Returns ``path``."""
    fig = _figure(12.0, 4.6)
    ax_time, ax_round = fig.subplots(1, 2)
    _draw_losses(ax_time, ax_round, runs)
    links = sorted({_link_label(r) for _, r in runs})
    walls = "  vs  ".join(
        f"{name}: wall {r.get('wall_s', float('nan')):.1f} s{_training(r)}{' simulated' if _simulated(r) else ''}" for name, r in runs
    )
    # beyond two runs the walls would not fit one title line: the compare command puts them in the legend
    fig.suptitle((walls + "\n" if len(runs) <= 2 else "") + "; ".join(links), fontsize=10)
    fig.savefig(path)
    return path


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation (``n − 1``) of ``values``; ``None`` where undefined (no value; one value's spread)."""
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def plot_seed_comparison(groups: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str) -> str:
    """Several recipes, each run over several seeds: mean and spread. Returns ``path``.

    ``groups``: per recipe, its label and its runs' reports (one per seed).
    Left: the training loss per round, the mean over the seeds with a band
    of ± one standard deviation. Middle and right: each recipe's final eval
    loss and wall time, the mean with ± one standard deviation error bars,
    every seed a dot.
    """
    fig = _figure(15.0, 4.6)
    ax_round, ax_eval, ax_wall = fig.subplots(1, 3)
    names = [label for label, _ in groups]
    for k, (label, reports) in enumerate(groups):
        per_round: dict[int, list[float]] = {}
        for report in reports:
            _, rounds, losses = _loss_points(report)
            for r, v in zip(rounds, losses):
                per_round.setdefault(r, []).append(v)
        xs = sorted(per_round)
        stats = [mean_std(per_round[x]) for x in xs]
        means = [m if m is not None else float("nan") for m, _ in stats]
        spreads = [d if d is not None else 0.0 for _, d in stats]
        (line,) = ax_round.plot(xs, means, marker=".", markersize=4, linewidth=1.3, label=f"{label} ({len(reports)} seeds)")
        ax_round.fill_between(xs, [m - d for m, d in zip(means, spreads)], [m + d for m, d in zip(means, spreads)],
                              color=line.get_color(), alpha=0.2)  # fmt: skip
        for ax, values in (
            (ax_eval, [(r.get("final") or {}).get("eval_loss") for r in reports]),
            (ax_wall, [r.get("wall_s") for r in reports]),
        ):
            vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            mean, std = mean_std(vals)
            if mean is None:
                continue
            ax.errorbar([k], [mean], yerr=[std or 0.0], fmt="o", capsize=6, markersize=7, color=line.get_color())
            ax.plot([k] * len(vals), vals, ".", color=line.get_color(), alpha=0.5)
    ax_round.set_xlabel("round")
    ax_round.set_ylabel("training loss (clients' weighted mean)")
    ax_round.set_title("loss vs round: mean over the seeds, band ± 1 std", fontsize=10)
    ax_round.legend(fontsize=8)
    simulated = any(_simulated(r) for _, reports in groups for r in reports)
    for ax, title in (
        (ax_eval, "final eval loss: mean ± 1 std, dots: seeds"),
        (ax_wall, "wall time (s" + (", simulated clock" if simulated else "") + "): mean ± 1 std"),
    ):
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(title, fontsize=10)
    for ax in (ax_round, ax_eval, ax_wall):
        ax.grid(alpha=0.3)
    links = sorted({_link_label(r) for _, reports in groups for r in reports})
    fig.suptitle("; ".join(links), fontsize=10)
    fig.savefig(path)
    return path


def write_pictures(report: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Write ``timeline.png`` and ``loss.png`` into ``output_dir``; returns their paths by name."""
    directory = os.path.abspath(output_dir)
    os.makedirs(directory, exist_ok=True)
    return {
        "timeline": plot_timeline(report, os.path.join(directory, "timeline.png")),
        "loss": plot_loss(report, os.path.join(directory, "loss.png")),
    }


# ------------------------------------------------------------ command line


def load_report(path: str) -> tuple[dict[str, Any], str]:
    """The report of a run directory (or of a ``report.json`` path) and the file it came from.

    Raises:
        ReportError: no such path, no report there, or not a run report.
    """
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such file or directory; give a run's output directory (output_dir of the recipe)")
    file = os.path.join(path, "report.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ReportError(f"{path} is not a run: it holds no report.json (give the output_dir of a finished pl_parablock run)")
    try:
        with open(file, encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{file} is not a run report: {exc}") from None
    missing = [k for k in ("mode", "wall_s", "rounds", "totals", "link") if not isinstance(report, dict) or k not in report]
    if missing:
        raise ReportError(f"{file} is not a run report: it lacks {', '.join(missing)}")
    return report, file


def _cell(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def _comparison_rows(report: dict[str, Any]) -> list[tuple[str, Any, str]]:
    t, f, fed = report.get("totals", {}), report.get("final", {}), report.get("federation", {})
    hidden = t.get("comm_hidden_fraction")
    return [
        ("mode", report.get("mode"), ""),
        ("clock", "simulated" if _simulated(report) else "measured", ""),
        ("clients", fed.get("clients"), "d"),
        ("rounds", fed.get("rounds_closed"), "d"),
        ("wall time (s)", report.get("wall_s"), ".1f"),
        ("training time (s)", report.get("train_wall_s"), ".1f"),
        ("compute (s, all clients)", t.get("compute_s"), ".1f"),
        ("communication (s)", t.get("comm_s"), ".1f"),
        ("blocked (s)", t.get("blocked_s"), ".1f"),
        ("comm hidden (%)", 100 * max(0.0, hidden) if isinstance(hidden, (int, float)) else None, ".0f"),
        ("final loss", f.get("loss"), ".4f"),
        ("eval loss", f.get("eval_loss"), ".4f"),
        ("exact match", f.get("exact_match"), ".3f"),
        ("MB up", (t.get("bytes_up") or 0) / 1e6, ".1f"),
        ("MB down", (t.get("bytes_down") or 0) / 1e6, ".1f"),
    ]


def format_comparison(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Two runs side by side, with ``B / A`` for the numbers (for wall time, ``A / B`` is B's speedup)."""
    rows = [("", name_a, name_b, "B / A")]
    for (label, va, spec), (_, vb, _) in zip(_comparison_rows(a), _comparison_rows(b)):
        if spec:
            ratio = vb / va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
            rows.append((label, _cell(va, spec), _cell(vb, spec), _cell(ratio, ".3f")))
        else:
            rows.append((label, str(va), str(vb), ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"  {r[0].ljust(w[0])}  {r[1].rjust(w[1])}  {r[2].rjust(w[2])}  {r[3].rjust(w[3])}" for r in rows]
    lines += [f"  link {name_a}: {_link_label(a)}", f"  link {name_b}: {_link_label(b)}"]
    return "\n".join(line.rstrip() for line in lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pl_parablock.report",
        description="Show a run's report and pictures, or compare two runs side by side.",
        epilog="Example: python -m pl_parablock.report runs/quickstart runs/quickstart-sync",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run's output directory (or its report.json); two to compare")
    p.add_argument("-o", "--output", help="comparison picture (default: comparison.png in the current directory)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if len(args.runs) > 2:
            raise ReportError(f"give one run, or two to compare, not {len(args.runs)}")
        loaded = [load_report(r) for r in args.runs]
        if len(loaded) == 1:
            (report, file), run_dir = loaded[0], os.path.dirname(os.path.abspath(loaded[0][1]))
            report["pictures"] = write_pictures(report, run_dir)
            print(format_summary(report, file))
            return 0
        (a, file_a), (b, file_b) = loaded
        name_a, name_b = (os.path.basename(os.path.dirname(os.path.abspath(f))) for f in (file_a, file_b))
        if name_a == name_b:
            name_a, name_b = f"A ({name_a})", f"B ({name_b})"
        print(format_comparison(a, b, name_a, name_b))
        out = args.output or "comparison.png"
        if os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
        plot_comparison([(f"{name_a}: {a.get('mode')}", a), (f"{name_b}: {b.get('mode')}", b)], out)
        print(f"\n  comparison picture  {os.path.abspath(out)}")
        return 0
    except ParaBlockError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"error: cannot write the picture: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
