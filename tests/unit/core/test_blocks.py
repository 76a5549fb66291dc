from __future__ import annotations

import itertools

import pytest
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from pl_parablock.core.blocks import find_layer_list, make_schedule, partition_model, whole_model_partition
from pl_parablock.errors import ModelError

CONFIGS = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    },
    "qwen2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    },
    "mistral": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    },
    "gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4, "vocab_size": 64, "n_positions": 64},
}


def tiny(model_type: str) -> nn.Module:
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type]))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_layers_are_detected_and_grouped(model_type):
    model = tiny(model_type)
    part = partition_model(model)
    assert [b.name for b in part.blocks] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    pairs = partition_model(model, layers_per_block=3)
    assert [b.name for b in pairs.blocks] == ["layers.0-2", "layers.3"]
    # blocks are disjoint and cover exactly the layers' parameters
    _, layers = find_layer_list(model)
    layer_params = {id(p) for p in layers.parameters()}
    named = dict(model.named_parameters())
    assert {id(named[n]) for n in part.param_names} == layer_params
    assert len(part.param_names) == len(set(part.param_names))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_embeddings_and_head_blocks(model_type):
    part = partition_model(tiny(model_type), embeddings=True, head=True)
    names = [b.name for b in part.blocks]
    assert names[0] == "embeddings" and names[-1] == "head" and len(names) == 6
    assert part.blocks[0].params == ("model.embed_tokens.weight",)
    assert part.blocks[-1].params == ("lm_head.weight",)


def test_tied_head_is_one_block_not_two():
    model = tiny("gpt2")
    with pytest.raises(ModelError, match="tied"):
        partition_model(model, embeddings=True, head=True)
    part = partition_model(model, embeddings=True)
    assert part.blocks[0].params == ("transformer.wte.weight",)
    part = partition_model(model, head=True)
    assert part.blocks[-1].params == ("transformer.wte.weight",)


def test_only_trainable_parameters_form_blocks():
    model = tiny("llama")
    for n, p in model.named_parameters():
        if "mlp" in n:
            p.requires_grad_(False)
    part = partition_model(model)
    assert all("mlp" not in n for n in part.param_names)


def test_patterns_define_blocks_and_must_match():
    model = tiny("llama")
    part = partition_model(model, patterns=[r"model\.layers\.[01]\..*", r"model\.layers\.[23]\..*"])
    assert len(part) == 2 and all(n.startswith("model.layers.0") or n.startswith("model.layers.1") for n in part.blocks[0].params)
    with pytest.raises(ModelError, match="matches no trainable parameter"):
        partition_model(model, patterns=[r"encoder\..*"])
    with pytest.raises(ModelError, match="two blocks"):
        partition_model(model, patterns=[r"model\.layers\.0\..*", r"model\.layers\.0\.mlp\..*"])


def test_a_module_without_layers_gets_a_clear_error():
    with pytest.raises(ModelError, match="patterns"):
        partition_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))


def test_whole_model_partition_is_one_block():
    model = tiny("llama")
    part = whole_model_partition(model)
    assert len(part) == 1 and len(part.blocks[0].params) == len(list(model.parameters()))


def test_ascending_and_descending():
    assert make_schedule("ascending", 3, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert make_schedule("descending", 3, 4) == [2, 1, 0, 2]
    assert make_schedule("random", 1, 3) == [0, 0, 0]


@pytest.mark.parametrize("blocks", [2, 3, 5, 8])
def test_random_is_a_seeded_permutation_per_sweep_without_back_to_back_repeats(blocks):
    rounds = blocks * 20
    s = make_schedule("random", blocks, rounds, seed=7)
    assert s == make_schedule("random", blocks, rounds, seed=7)
    assert s != make_schedule("random", blocks, rounds, seed=8) or blocks == 2
    for k in range(0, rounds, blocks):
        assert sorted(s[k : k + blocks]) == list(range(blocks))
    assert all(a != b for a, b in itertools.pairwise(s))


def test_explicit_schedule_is_checked():
    assert make_schedule([2, 0, 1], 3, 5) == [2, 0, 1, 2, 0]
    with pytest.raises(ModelError, match="consecutive"):
        make_schedule([0, 0, 1], 3, 3)
    with pytest.raises(ModelError, match="wrap-around"):
        make_schedule([0, 1, 0], 3, 6)
    with pytest.raises(ModelError, match="blocks 0..2"):
        make_schedule([0, 3], 3, 2)
