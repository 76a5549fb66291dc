"""Compression: bytes per round and final eval loss of every codec against the fp32 wire, with and without error feedback.

    python benchmarks/compression.py [--quick] [--workloads quickstart,instruct] [--codecs int8,topk]

Each workload runs as a federation in this process (clients as threads over
the in-process transport, the real callback, transmitter, service and
aggregator; no emulated link: only the bytes and the loss are measured),
once per codec with ``federation.compression.error_feedback`` true and false
(one run for the lossless ``none``, the fp32 wire every other run is judged
against). The fp32 run is the reference of its workload: the figures are
``bytes_ratio`` (the clients' upload plus download bytes per round over the
fp32 run's) and ``final_loss_vs_fp32`` (final eval loss of the global model
over the fp32 run's; 1.0 is no loss of quality).

Workloads:

* ``quickstart``: ``recipes/quickstart.yaml`` (4 clients, the quickstart's
  synthetic data and model) without its emulated link;
* ``instruct``: ``recipes/instruct/parablock.yaml`` at small size: the
  quickstart's model built from its config (float32), on an Alpaca-format
  file of synthetic instructions this script writes (nothing is downloaded).

The last output line is JSON: ``{"workloads": {name: {"rows": [...]}}}``,
each row ``{codec, error_feedback, bytes_ratio, final_loss_vs_fp32,
eval_loss, bytes_per_round}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

from _common import REPO, finish, machine, say

from pl_parablock.client.runner import quiet_third_party
from pl_parablock.core.codecs import CODECS
from pl_parablock.fit import federate_in_process
from pl_parablock.recipe.load import load_recipe
from pl_parablock.recipe.schema import ModelSection

NO_LINK = ["link.uplink_mbps=null", "link.downlink_mbps=null", "link.latency_ms=0"]


def _instruct_file(path: str, rows: int = 2000, seed: int = 0) -> str:
    """Synthetic Alpaca records: arithmetic and word tasks with exact answers."""
    rng = random.Random(seed)
    words = ["river", "stone", "light", "cloud", "field", "paper", "glass", "music", "winter", "garden"]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            kind = rng.randrange(3)
            if kind == 0:
                a, b = rng.randrange(100), rng.randrange(100)
                rec = {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}
            elif kind == 1:
                w = rng.choice(words)
                rec = {"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]}
            else:
                ws = rng.sample(words, 3)
                rec = {"instruction": "Sort the words alphabetically.", "input": ", ".join(ws), "output": ", ".join(sorted(ws))}
            f.write(json.dumps(rec) + "\n")
    return path


def _overrides(workload: str, quick: bool, data_dir: str) -> tuple[str, list[str]]:
    if workload == "quickstart":
        rounds = 12 if quick else 36
        return os.path.join(REPO, "recipes", "quickstart.yaml"), [*NO_LINK, f"federation.rounds={rounds}", "eval.max_samples=100"]
    if workload == "instruct":
        config = json.dumps(dict(ModelSection().config)).replace('"', "")
        data = _instruct_file(os.path.join(data_dir, "instruct.jsonl"))
        rounds = 12 if quick else 24
        return os.path.join(REPO, "recipes", "instruct", "parablock.yaml"), [
            *NO_LINK,
            "model.path=null",
            f"model.config={config}",
            "model.dtype=float32",
            "model.gradient_checkpointing=false",
            "train.precision=32-true",
            "train.lr=2e-3",
            "train.batch_size=8",
            "train.max_length=64",
            "train.local_steps=5",
            "blocks.embeddings=true",
            "blocks.head=true",
            f"federation.rounds={rounds}",
            "eval.every=0",
            "eval.max_samples=100",
            f"data.path={data}",
        ]
    raise SystemExit(f"unknown workload {workload!r}; use quickstart or instruct")


def _run(path: str, overrides: list[str], out: str) -> dict[str, Any]:
    recipe = load_recipe(path, [*overrides, f"output_dir={out}"])
    _, runs, wall = federate_in_process(recipe)
    up = sum(x["bytes_up"] for r in runs for x in r.strategy.records)
    down = sum(x["bytes_down"] for r in runs for x in r.strategy.records)
    losses = [r.strategy.final_metrics["eval_loss"] for r in runs if "eval_loss" in r.strategy.final_metrics]
    return {"bytes_per_round": (up + down) / recipe.federation.rounds, "eval_loss": losses[0], "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--workloads", default="quickstart,instruct")
    parser.add_argument("--codecs", default=",".join(c for c in CODECS if c != "none"), help="lossy codecs to measure")
    parser.add_argument("--fraction", type=float, default=0.01, help="topk's fraction")
    args = parser.parse_args()
    quiet_third_party()
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick, "topk_fraction": args.fraction, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="pl_parablock-compression-") as tmp:
        for workload in args.workloads.split(","):
            path, overrides = _overrides(workload, args.quick, tmp)
            say(f"{workload}: fp32 wire")
            fp32 = _run(path, overrides, os.path.join(tmp, workload, "fp32"))
            rows = [{"codec": "none", "error_feedback": False, "bytes_ratio": 1.0, "final_loss_vs_fp32": 1.0, **fp32}]
            for codec in args.codecs.split(","):
                for ef in (True, False):
                    extra = [f"federation.compression.codec={codec}", f"federation.compression.error_feedback={str(ef).lower()}"]
                    if codec == "topk":
                        extra.append(f"federation.compression.fraction={args.fraction}")
                    say(f"{workload}: {codec}, error feedback {ef}")
                    got = _run(path, [*overrides, *extra], os.path.join(tmp, workload, f"{codec}-{ef}"))
                    rows.append(
                        {
                            "codec": codec,
                            "error_feedback": ef,
                            "bytes_ratio": round(got["bytes_per_round"] / fp32["bytes_per_round"], 4),
                            "final_loss_vs_fp32": round(got["eval_loss"] / fp32["eval_loss"], 4),
                            **got,
                        }
                    )
                    say(f"  bytes x{rows[-1]['bytes_ratio']:.3f}, loss x{rows[-1]['final_loss_vs_fp32']:.4f}")
            result["workloads"][workload] = {"recipe": os.path.relpath(path, REPO), "overrides": overrides, "rows": rows}
    finish(result, started)


if __name__ == "__main__":
    sys.exit(main())
