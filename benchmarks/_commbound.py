"""The communication-bound point of ``overlap.py --comm-bound``: a link where the fp32 wire's communication is 4 x computation.

The calibration (a sync run without emulation, as for the other ratios)
gives the compute time of a round and the bytes an fp32 round moves; the
emulated link is then set so that one round's upload + server + download
takes 4 x compute with the fp32 wire. On that same link, parablock runs once
with the fp32 wire and once per codec (``federation.compression``, error
feedback on and off). For each: ``bytes_ratio`` (bytes per round over the
fp32 run's), ``round_over_compute`` (parablock's median round period over
the *calibration's* compute per round: the ideal is 1.0, perfect overlap of
a communication no longer than the computation; fp32 sits near 4),
``comm_over_compute`` (the run's median communication over the same
compute), ``compute_in_run_over_compute`` (the run's own median compute per
round over the calibration's: above 1 when the transmitter, the server and
the other clients take CPU from training, as on a 2-core machine) and ``final_loss_vs_fp32`` (final loss over the fp32 run's).
"""

from __future__ import annotations

import os
from typing import Any

from _common import say

COMM_BOUND_RATIO = 4.0
CODECS = (("int8", True), ("int8", False), ("topk", True), ("topk", False))


def comm_bound(recipe: str, root: str, cal: dict[str, Any], rounds: int, inprocess: bool, fraction: float = 0.01) -> dict[str, Any]:
    """Parablock on a link where fp32 communication = 4 x compute: fp32, then every codec of :data:`CODECS`."""
    from overlap import launch, link_for, summarize

    link = link_for(COMM_BOUND_RATIO, cal)
    overrides = ["mode=parablock", f"federation.rounds={rounds}"] + [
        f"link.{k}={link[k]}" for k in ("uplink_mbps", "downlink_mbps", "latency_ms")
    ]
    compute = cal["compute_s"]

    def run(tag: str, extra: list[str]) -> dict[str, Any]:
        say(f"  comm-bound: {tag}, link {link['uplink_mbps']:g} Mbit/s ...")
        report = launch(recipe, os.path.join(root, f"commbound-{tag}"), [*overrides, *extra], inprocess)
        s = summarize(report)
        moved = sum(c["bytes_up"] + c["bytes_down"] for r in report["rounds"] for c in r["client_records"]) / max(1, len(report["rounds"]))
        loss = report["final"].get("eval_loss", s["final_loss"])
        return {**s, "final_loss": loss, "bytes_per_round": moved, "link_description": report["link"]["description"]}

    fp32 = run("fp32", [])
    rows = [
        {
            "codec": "none",
            "error_feedback": False,
            "bytes_ratio": 1.0,
            "round_over_compute": round(fp32["round_s"] / compute, 3),
            "comm_over_compute": round(fp32["comm_s"] / compute, 3),
            "compute_in_run_over_compute": round(fp32["compute_s"] / compute, 3),
            "final_loss_vs_fp32": 1.0,
            "final_loss": fp32["final_loss"],
        }
    ]
    for codec, ef in CODECS:
        extra = [f"federation.compression.codec={codec}", f"federation.compression.error_feedback={str(ef).lower()}"]
        if codec == "topk":
            extra.append(f"federation.compression.fraction={fraction}")
        got = run(f"{codec}-{'ef' if ef else 'noef'}", extra)
        rows.append(
            {
                "codec": codec,
                "error_feedback": ef,
                "bytes_ratio": round(got["bytes_per_round"] / fp32["bytes_per_round"], 4),
                "round_over_compute": round(got["round_s"] / compute, 3),
                "comm_over_compute": round(got["comm_s"] / compute, 3),
                "compute_in_run_over_compute": round(got["compute_s"] / compute, 3),
                "final_loss_vs_fp32": round(got["final_loss"] / fp32["final_loss"], 4),
                "final_loss": got["final_loss"],
            }
        )
        r = rows[-1]
        say(f"    bytes x{r['bytes_ratio']:.3f}, round/compute {r['round_over_compute']:.2f}, loss x{r['final_loss_vs_fp32']:.4f}")
    return {
        "ratio_fp32": COMM_BOUND_RATIO,
        "link": {**link, "description": fp32["link_description"]},
        "compute_s": compute,
        "topk_fraction": fraction,
        "codecs": rows,
        "targets": {"int8 with error feedback": "round_over_compute <= 1.1", "topk": "comm_over_compute < 1 with bytes_ratio <= 0.1"},
    }
