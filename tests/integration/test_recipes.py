"""A small offline variant of every shipped recipe runs: its own keys, a tiny local checkpoint, fixture data, 2 rounds."""

from __future__ import annotations

import glob
import json
import os

import pytest
import yaml
from omegaconf import OmegaConf
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

from pl_parablock.fit import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")))

# Only what makes a recipe small and CPU-friendly; everything else (mode, peft, blocks, data format,
# packing, gradient checkpointing, ...) is the recipe's own.
SMALL = [
    "model.dtype=float32",
    "train.precision=32-true",
    "train.max_length=64",
    "train.batch_size=4",
    "train.local_steps=2",
    "train.threads=1",
    "federation.clients=2",
    "federation.clients_per_round=null",  # the simulation recipes sample 8 of 64
    "federation.rounds=2",
    "eval.max_samples=4",
    "eval.max_new_tokens=4",
    "link.uplink_mbps=null",  # the offline recipes emulate the quickstart's slow link: not what is tested here
    "link.downlink_mbps=null",
    "link.latency_ms=0",
]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "recipes")))
def test_a_small_offline_variant_of_the_recipe_runs(path, fixture_files, tmp_path):
    shipped = yaml.safe_load(open(path, encoding="utf-8"))
    required = OmegaConf.missing_keys(OmegaConf.create(shipped))
    math = shipped["data"]["format"] == "gsm8k"
    given = {
        "model.path": fixture_files["model"],
        "data.path": fixture_files["gsm8k_train" if math else "alpaca"],
        "eval.path": fixture_files["gsm8k_test" if math else "alpaca"],
    }
    out = tmp_path / "run"
    assert main([path, *(f"{k}={given[k]}" for k in sorted(required)), *SMALL, f"output_dir={out}", "--inprocess"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == shipped["mode"] and len(report["rounds"]) == 2
    final = report["final"]
    assert final["eval_loss"] is not None and final["loss"] is not None
    if math:
        assert 0.0 <= final["exact_match"] <= 1.0 and final["exact_match_samples"] == 4
    peft = (shipped["model"].get("peft") or {}).get("method")
    if peft:
        assert final["model_format"] == "peft_adapter"
        # the adapter names its base (the local checkpoint), so it loads on its own
        adapter = AutoPeftModelForCausalLM.from_pretrained(out / "model")
        assert {n for n, p in adapter.named_parameters() if "lora_" in n}
        if shipped["model"]["peft"].get("merge"):
            assert AutoModelForCausalLM.from_pretrained(out / "merged_model").config.model_type == "llama"
    else:
        assert final["model_format"] == "full"
        assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "llama"
