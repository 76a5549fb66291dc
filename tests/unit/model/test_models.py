from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pl_parablock.errors import ModelError
from pl_parablock.model.build import build_model, offline_tokenizer
from pl_parablock.recipe.schema import ModelSection

SMALL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_offline_tokenizer_round_trips_any_text():
    tok = offline_tokenizer()
    text = "Größe: 12 + 7 = 19 ✓\n#### 19"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) == 259 and tok.pad_token_id != tok.eos_token_id


def test_built_models_are_seeded_and_sized_to_the_tokenizer():
    a, tok = build_model(ModelSection(config=dict(SMALL)), seed=3)
    b, _ = build_model(ModelSection(config=dict(SMALL)), seed=3)
    c, _ = build_model(ModelSection(config=dict(SMALL)), seed=4)
    assert a.config.vocab_size == len(tok)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    bf16, _ = build_model(ModelSection(config=dict(SMALL), dtype="bfloat16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_a_saved_model_loads_from_its_path_with_its_tokenizer(tmp_path):
    model, tok = build_model(ModelSection(config=dict(SMALL)), seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = build_model(ModelSection(config=None, path=str(tmp_path)))
    assert type(loaded) is type(model)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded_tok("abc")["input_ids"] == tok("abc")["input_ids"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model))


def test_a_checkpoint_without_a_tokenizer_is_named(tmp_path):
    model, _ = build_model(ModelSection(config=dict(SMALL)))
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="model.tokenizer"):
        build_model(ModelSection(config=None, path=str(tmp_path)))


def test_bad_configs_are_named():
    with pytest.raises(ModelError, match="not a transformers model type"):
        build_model(ModelSection(config={"model_type": "llamma"}))
    with pytest.raises(ModelError, match="vocab_size"):
        build_model(ModelSection(config={**SMALL, "vocab_size": 10}))


FAMILIES = {
    "llama": {**SMALL, "num_key_value_heads": 2},
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
}
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loads_from_a_directory_and_its_layers_are_the_blocks(family, tmp_path):
    from pl_parablock.core.blocks import partition_model

    model, tok = build_model(ModelSection(config=dict(FAMILIES[family])))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = build_model(ModelSection(config=None, path=str(tmp_path), gradient_checkpointing=True), seed=0)
    assert loaded.config.model_type == family and loaded.is_activation_checkpointing
    assert all(m.training for m in loaded.modules()), "a loaded model trains (dropout on)"
    part = partition_model(loaded)
    assert [b.name for b in part.blocks] == ["layers.0", "layers.1"]
    assert all(n.startswith(LAYERS[family] + f".{i}.") for i, b in enumerate(part.blocks) for n in b.params)
    ids = torch.tensor([tok("12 + 7 = 19")["input_ids"]])
    loaded.train()
    loaded(input_ids=ids, labels=ids).loss.backward()  # trains with gradient checkpointing
    assert all(p.grad is not None for n, p in loaded.named_parameters() if n in part.blocks[0].params)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_blocks_are_the_adapters_of_each_layer_group(family):
    from peft import PeftModel

    from pl_parablock.core.blocks import partition_model, whole_model_partition
    from pl_parablock.recipe.schema import PeftSection

    cfg = {**FAMILIES[family], **({"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4})}
    model, _ = build_model(ModelSection(config=cfg, peft=PeftSection(method="lora", r=4)), seed=1)
    assert isinstance(model, PeftModel)
    part = partition_model(model, layers_per_block=2)
    assert [b.name for b in part.blocks] == ["layers.0-1", "layers.2-3"]
    names = part.param_names
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names), "only adapters train"
    assert whole_model_partition(model).param_names == names  # FedIT: all adapters, one block

    ffa, _ = build_model(ModelSection(config=cfg, peft=PeftSection(method="ffa_lora", r=4)), seed=1)
    trainable = [n for n, p in ffa.named_parameters() if p.requires_grad]
    assert trainable == [n for n in names if ".lora_B." in n], "FFA-LoRA: only B trains"
    # the same seed gives the same adapters (A is random, so every client must draw the same one)
    again, _ = build_model(ModelSection(config=cfg, peft=PeftSection(method="lora", r=4)), seed=1)
    sa, sb = model.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lora_on_missing_modules_is_named():
    from pl_parablock.recipe.schema import PeftSection

    with pytest.raises(ModelError, match="cannot add LoRA adapters"):
        build_model(ModelSection(config=dict(SMALL), peft=PeftSection(method="lora", target_modules=["nope_proj"])))
