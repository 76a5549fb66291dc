"""Evaluation off the training path: the quickstart with ``eval.every`` set, evaluated by client 0 and by an evaluator process.

Usage::

    python benchmarks/evaluator.py [--every 6] [--rounds 36] [--max-samples 200] [--out runs/bench-evaluator]

Runs the local launcher (server in this process, clients as processes)
twice on ``recipes/quickstart.yaml``: ``eval.evaluator=client`` (client 0
evaluates between its rounds; the other clients wait for its update) and
``eval.evaluator=process`` (an evaluator process of its own). Prints one
JSON object: per run the wall time, the clients' blocked time (total and
per client), the eval curve's rounds, and whether the two runs' curves,
final metrics and saved models are bitwise the same (``same_*``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

from _common import machine, say
from overlap import launch

HERE = os.path.dirname(os.path.abspath(__file__))
QUICKSTART = os.path.join(os.path.dirname(HERE), "recipes", "quickstart.yaml")


def _model_sha256(model_dir: str) -> str:
    """sha256 over the saved model's safetensors files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            h.update(name.encode())
            with open(os.path.join(model_dir, name), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    final = report["final"]
    return {
        "wall_s": report["wall_s"],
        "train_wall_s": report.get("train_wall_s"),
        "blocked_s": report["totals"]["blocked_s"],
        "blocked_s_per_client": [c["blocked_s"] for c in report["clients"]],
        "eval_rounds": [p["round"] for p in report["eval_curve"]],
        "eval_s": [p.get("eval_s") for p in report["eval_curve"]],
        "final_eval_loss": final.get("eval_loss"),
        "final_exact_match": final.get("exact_match"),
        "evaluator": report.get("evaluator"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--rounds", type=int, default=36)
    p.add_argument("--max-samples", type=int, default=200)
    p.add_argument("--out", default=os.path.join("runs", "bench-evaluator"))
    args = p.parse_args()
    overrides = [f"eval.every={args.every}", f"federation.rounds={args.rounds}", f"eval.max_samples={args.max_samples}"]
    runs: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    for who in ("client", "process"):
        out = os.path.join(args.out, who)
        say(f"quickstart, eval.every={args.every}, eval.evaluator={who} ...")
        reports[who] = launch(QUICKSTART, out, [*overrides, f"eval.evaluator={who}"], inprocess=False)
        runs[who] = {**_summary(reports[who]), "model_sha256": _model_sha256(os.path.join(out, "model"))}
    strip = ("eval_s",)
    curves = {w: [{k: v for k, v in pt.items() if k not in strip} for pt in reports[w]["eval_curve"]] for w in runs}
    finals = {w: {k: reports[w]["final"].get(k) for k in ("eval_loss", "perplexity", "exact_match")} for w in runs}
    result = {
        "benchmark": "evaluator",
        "machine": machine(),
        "recipe": "recipes/quickstart.yaml",
        "overrides": overrides,
        "runs": runs,
        "same_curve": curves["client"] == curves["process"],
        "same_final": finals["client"] == finals["process"],
        "same_model": runs["client"]["model_sha256"] == runs["process"]["model_sha256"],
        "blocked_saved_s": runs["client"]["blocked_s"] - runs["process"]["blocked_s"],
        "wall_saved_s": runs["client"]["wall_s"] - runs["process"]["wall_s"],
    }
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
