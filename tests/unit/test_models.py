from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pl_parablock.config import ModelSection
from pl_parablock.errors import ModelError
from pl_parablock.models import build_model, offline_tokenizer

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
