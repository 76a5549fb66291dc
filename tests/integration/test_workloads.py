"""Real fine-tuning workloads end to end: LoRA federations, saved adapters, exact global evaluation, bad data."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pl_parablock import FederatedBlockStrategy, ParaBlockModule
from pl_parablock.client.inprocess import InProcessTransport
from pl_parablock.client.strategy import model_fingerprint
from pl_parablock.data import client_data, collate, encode_record
from pl_parablock.fit import main
from pl_parablock.model.build import build_base_model, build_model
from pl_parablock.model.metrics import evaluate_loss
from pl_parablock.recipe.load import load_recipe
from pl_parablock.recipe.schema import ModelSection, PeftSection
from tests.helpers import TINY_LLAMA, run_clients, service, tiny_data, tiny_trainer

TINY = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}"
)
SMALL_RUN = [
    "train.local_steps=2",
    "train.batch_size=4",
    "train.max_length=64",
    "train.threads=1",
    "train.lr=3e-3",
    "federation.clients=2",
    "data.num_samples=96",
    "eval.max_samples=8",
    "eval.max_new_tokens=4",
    "blocks.embeddings=false",
    "blocks.head=false",
]


def run(tmp_path, name: str, *overrides: str) -> tuple[dict[str, Any], list[str]]:
    out = tmp_path / name
    args = [f"model.config={TINY}", f"output_dir={out}", *SMALL_RUN, *overrides]
    assert main([*args, "--inprocess"]) == 0
    return json.loads((out / "report.json").read_text()), args


def eval_batches(recipe, tokenizer):
    evals = client_data(recipe.data, 0, clients=recipe.federation.clients, seed=recipe.seed, evaluation=recipe.eval).evals
    examples = [encode_record(tokenizer, r, recipe.train.max_length) for r in evals]
    return [collate(examples[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(examples), 4)]


def test_a_lora_federation_saves_an_adapter_that_loads_with_peft(tmp_path):
    report, args = run(
        tmp_path, "lora", "mode=parablock", "federation.rounds=4", "model.peft.method=lora", "model.peft.r=4", "model.peft.merge=true"
    )
    final = report["final"]
    assert final["model_format"] == "peft_adapter" and report["federation"]["blocks"] == [f"layers.{i}" for i in range(4)]
    assert report["rounds"][-1]["loss"] < report["rounds"][0]["loss"]
    out = tmp_path / "lora"
    assert (out / "model" / "adapter_config.json").exists() and not (out / "model" / "model.safetensors").exists()

    recipe = load_recipe(None, [a for a in args if not a.startswith("output_dir")])
    base, tok = build_base_model(recipe.model, recipe.seed)
    initial = {n: p.clone() for n, p in base.named_parameters()}
    adapted = PeftModel.from_pretrained(base, str(out / "model"))
    loss = evaluate_loss(adapted, eval_batches(recipe, tok))["eval_loss"]
    assert loss == pytest.approx(final["eval_loss"], rel=1e-6), "the saved adapter is the evaluated global model"
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "every layer's adapters were trained"

    merged = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert evaluate_loss(merged, eval_batches(recipe, tok))["eval_loss"] == pytest.approx(loss, rel=1e-4)
    embed = "model.embed_tokens.weight"
    assert torch.equal(dict(merged.named_parameters())[embed], initial[embed]), "the base stays frozen"

    # built from a config, the adapter names the base saved next to it, so it loads on its own
    from peft import AutoPeftModelForCausalLM

    assert final["base_model_dir"] == str((out / "base_model").resolve())
    alone = AutoPeftModelForCausalLM.from_pretrained(str(out / "model"))
    assert evaluate_loss(alone, eval_batches(recipe, tok))["eval_loss"] == pytest.approx(loss, rel=1e-6)


class RecordingTransport(InProcessTransport):
    """An in-process transport that remembers the names of the tensors it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pushed: list[tuple[int, set[str]]] = []
        self.uploaded: set[str] = set()

    def upload_state(self, client_id, tensors, timeout):
        self.uploaded |= set(tensors)
        return super().upload_state(client_id, tensors, timeout)

    def push(self, header, tensors, timeout):
        self.pushed.append((int(header["block"]), set(tensors)))
        return super().push(header, tensors, timeout)


@pytest.mark.parametrize("mode,method", [("parablock", "lora"), ("fedavg", "ffa_lora")])
def test_only_trainable_adapter_tensors_travel(mode, method):
    svc = service(2, rounds=4, mode=mode)
    jobs, strategies, transports, modules = [], [], [], []
    for i in range(2):
        model, tok = build_model(ModelSection(config=dict(TINY_LLAMA), peft=PeftSection(method=method, r=4)), seed=0)
        module = ParaBlockModule(model, tok, lr=3e-3)
        transport = RecordingTransport(svc)
        strategy = FederatedBlockStrategy(transport, i, local_steps=2, mode=mode)
        jobs.append((tiny_trainer(strategy), module, tiny_data(module, seed=i)))
        strategies.append(strategy)
        transports.append(transport)
        modules.append(module)
    frozen = {n: p.clone() for n, p in modules[0].named_parameters() if "lora_" not in n}
    run_clients(jobs)

    wanted = ("lora_B.",) if method == "ffa_lora" else ("lora_A.", "lora_B.")
    partition = strategies[0].partition
    assert partition is not None
    names = set(partition.param_names)
    assert names and all(any(w in n for w in wanted) for n in names)
    if method == "ffa_lora":
        assert not any("lora_A" in n for n in names)
    assert set(model_fingerprint(modules[0], partition, mode)["tensors"]) == names
    sent = [(b, s) for t in transports for b, s in t.pushed]
    assert len(sent) == 8
    for block, tensors in sent:
        assert tensors == set(partition.blocks[block].params), "a round sends exactly its block's adapters"
    assert set().union(*(t.uploaded for t in transports)) <= names
    assert set(svc.aggregator.global_state()) == names, "the server holds adapters only"
    after = dict(modules[0].named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items()), "base weights never change"


def test_the_eval_curve_is_the_global_model_in_every_mode(tmp_path):
    """One client: parablock equals sync bitwise, so their global models, and curves, must agree point by point.

    Mid-run a parablock client holds one round of unaggregated progress; evaluating that instead of the
    global model would make the parablock curve differ from sync's.
    """
    common = ("federation.clients=1", "federation.rounds=6", "eval.every=1", "model.peft.method=ffa_lora", "model.peft.r=4")
    curves = {mode: run(tmp_path, mode, f"mode={mode}", *common)[0]["eval_curve"] for mode in ("sync", "parablock")}
    sync = {p["round"]: p["eval_loss"] for p in curves["sync"]}
    para = {p["round"]: p["eval_loss"] for p in curves["parablock"]}
    assert sorted(sync) == [0, 1, 2, 3, 4, 5, 6]
    assert sorted(para) == [0, 1, 2, 3, 4, 6]  # round 5's aggregate arrives with the last one
    assert len(set(sync.values())) == len(sync), "the curve moves"
    assert all(para[r] == sync[r] for r in para), (para, sync)
    assert "exact_match" in curves["sync"][-1]


def test_bad_data_exits_2_naming_the_line_or_is_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    good = [json.dumps({"instruction": f"say {i}", "output": str(i)}) for i in range(40)]
    path.write_text("\n".join([*good[:5], '{"instruction": "no output"}', *good[5:]]) + "\n")
    base = [f"model.config={TINY}", "data.format=alpaca", f"data.path={path}", "federation.rounds=2", *SMALL_RUN]
    assert main([*base, f"output_dir={tmp_path / 'raise'}", "--inprocess"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:6: missing field 'output'" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2

    assert main([*base, f"output_dir={tmp_path / 'skip'}", "data.on_error=skip", "--inprocess"]) == 0
    shown = capsys.readouterr().out
    assert "skipped 1 bad rows" in shown and "skipped 1 bad records" in shown
    report = json.loads((tmp_path / "skip" / "report.json").read_text())
    assert report["data"]["skipped"] == 1 and "train.jsonl:6" in report["data"]["skipped_examples"][0]
    assert sum(report["data"]["shard_sizes"]) + report["final"]["eval_samples"] == 40
