from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from pl_parablock.data import dirichlet_partition, encode_example, iid_partition, load_records, synthetic_records
from pl_parablock.data.module import collate
from pl_parablock.errors import DataError
from pl_parablock.model.build import offline_tokenizer


def test_synthetic_records_are_deterministic_and_checkable():
    a, b = synthetic_records(50, seed=1), synthetic_records(50, seed=1)
    assert a == b and a != synthetic_records(50, seed=2)
    for r in a:
        if r["answer"] is not None:
            assert r["response"].endswith(f"#### {r['answer']}")
            lhs = r["response"].split("=")[0]
            assert eval(lhs) == int(r["answer"])  # the arithmetic is right


def test_alpaca_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("a.json", "a.jsonl"):
        recs = load_records("alpaca", str(tmp_path / name))
        assert [r["response"] for r in recs] == ["hi", "3"]
        assert "### Input:\n1 2" in recs[1]["prompt"] and "### Input" not in recs[0]["prompt"]


def test_gsm8k_final_answer(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 1,004"}) + "\n")
    assert load_records("gsm8k", str(tmp_path / "g.jsonl"))[0]["answer"] == "1004"


@pytest.mark.parametrize(
    "content,fmt,message",
    [
        ('{"instruction": "x", "output": "y"}\n{broken\n', "alpaca", ":2: not valid JSON"),
        ('{"instruction": "x"}\n', "alpaca", ":1: missing field 'output'"),
        ('{"question": "q", "answer": "no marker"}\n', "gsm8k", "#### N"),
        ("\n\n", "alpaca", "holds no record"),
        ('["a"]', "alpaca", ":1: expected a JSON object"),
    ],
)
def test_bad_data_names_the_file_and_line(tmp_path, content, fmt, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_records(fmt, str(path))
    assert message in str(err.value) and "bad.jsonl" in str(err.value)


def test_iid_partition_covers_the_data_once():
    shares = iid_partition(103, 4, seed=0)
    flat = sorted(i for s in shares for i in s)
    assert flat == list(range(103)) and {len(s) for s in shares} <= {25, 26}
    assert shares == iid_partition(103, 4, seed=0)
    with pytest.raises(DataError):
        iid_partition(3, 4)


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = [f"c{i % 5}" for i in range(1000)]

    def skew(alpha):
        shares = dirichlet_partition(labels, 4, alpha, seed=0)
        assert sorted(i for s in shares for i in s) == list(range(1000))
        # mean share of each client's most common label
        return sum(max(Counter(labels[i] for i in s).values()) / len(s) for s in shares) / 4

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.3


def test_prompt_is_masked_and_truncation_keeps_the_response():
    tok = offline_tokenizer()
    ex = encode_example(tok, "Q: 1+1?\nA: ", "2", max_length=64)
    n_prompt = len("Q: 1+1?\nA: ")
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["input_ids"][-1] == tok.eos_token_id
    long = encode_example(tok, "x" * 100, "answer", max_length=32)
    assert len(long["input_ids"]) == 32 and tok.decode([i for i in long["labels"] if i >= 0]).startswith("answer")
    batch = collate([ex, long], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 32) and int(batch["attention_mask"][0].sum()) == len(ex["input_ids"])
    assert (batch["labels"][0, len(ex["input_ids"]) :] == -100).all()


def test_partitions_are_seeded():
    labels = [f"c{i % 3}" for i in range(300)]
    assert dirichlet_partition(labels, 4, 0.5, seed=1) == dirichlet_partition(labels, 4, 0.5, seed=1)
    assert dirichlet_partition(labels, 4, 0.5, seed=1) != dirichlet_partition(labels, 4, 0.5, seed=2)
    assert iid_partition(300, 4, seed=1) != iid_partition(300, 4, seed=2)


def recipe_for(tmp_path, *overrides: str):
    from pl_parablock.recipe.load import load_recipe

    return load_recipe(None, ["federation.clients=3", "eval.max_samples=4", *overrides])


def of(recipe) -> dict:
    """What the data functions read besides a recipe's data section."""
    return {"clients": recipe.federation.clients, "seed": recipe.seed, "evaluation": recipe.eval}


def test_client_shares_sum_to_the_data_and_dirichlet_uses_any_column(tmp_path):
    from pl_parablock.data import client_data, describe_data
    from tests.helpers import write_jsonl

    rows = [{"instruction": f"task {i}", "output": str(i), "source": f"src{i % 4}"} for i in range(120)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for part in (["data.partition.kind=iid"], ["data.partition.kind=dirichlet", "data.partition.alpha=0.3", "data.partition.label=source"]):
        recipe = recipe_for(tmp_path, "data.format=alpaca", f"data.path={path}", *part)
        parts = [client_data(recipe.data, i, **of(recipe)) for i in range(3)]
        held = parts[0].evals
        assert len(held) == 4 and all(p.evals == held for p in parts)
        seen = sorted(r["response"] for p in parts for r in p.train) + sorted(r["response"] for r in held)
        assert sorted(seen) == sorted(str(i) for i in range(120)), "every record in exactly one share or the eval set"
        assert parts[0].shares == [len(p.train) for p in parts]
    lines = describe_data(recipe.data, **of(recipe))
    assert len(lines) == 4 and lines[1].startswith("  client 0:") and "src" in lines[1]
    bad = recipe_for(tmp_path, "data.format=alpaca", f"data.path={path}", "data.partition.kind=dirichlet", "data.partition.alpha=1")
    with pytest.raises(DataError, match=r"every record has the same value 'alpaca'"):
        client_data(bad.data, 0, **of(bad))  # alpaca rows without a category column: no silent one-label "skew"
    rows[7].pop("source")
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:8: no field 'source'"):
        client_data(recipe.data, 0, **of(recipe))


def test_natural_partition_reads_only_the_clients_own_file(tmp_path):
    from pl_parablock.data import client_data, describe_data
    from tests.helpers import write_jsonl

    paths = [write_jsonl(tmp_path / f"c{i}.jsonl", [{"instruction": f"c{i} {j}", "output": "x"} for j in range(10 + i)]) for i in range(3)]
    recipe = recipe_for(tmp_path, "data.format=alpaca", "data.partition.kind=natural", f"data.client_paths=[{','.join(paths)}]")
    assert "client 2:     12 records" in "\n".join(describe_data(recipe.data, **of(recipe)))
    zero = client_data(recipe.data, 0, **of(recipe))
    assert len(zero.train) + len(zero.evals) == 10 and zero.evals, "client 0's file gives the held-out set"
    os.remove(paths[0])
    os.remove(paths[1])
    two = client_data(recipe.data, 2, evaluate=False, **of(recipe))  # the other clients' files are gone: client 2 does not need them
    assert len(two.train) == 12 and all(r["prompt"].count("c2 ") for r in two.train)
    # several machines: each client gets the same recipe and its own data.path
    alone = recipe_for(tmp_path, "data.format=alpaca", "data.partition.kind=natural", f"data.path={paths[2]}")
    assert len(client_data(alone.data, 1, evaluate=False, **of(alone)).train) == 12
    with pytest.raises(DataError, match="data.client_paths, one file per client"):
        describe_data(alone.data, **of(alone))


def test_an_empty_client_shard_is_named():
    from pl_parablock.data import ClientDataModule

    with pytest.raises(DataError, match="client 3's data shard is empty"):
        ClientDataModule([], None, offline_tokenizer(), name="client 3")


def test_packing_fills_rows_and_keeps_examples_apart():
    from pl_parablock.data import pack_examples

    tok = offline_tokenizer()
    examples = [encode_example(tok, f"Q{i}: " + "x" * i, "yes", max_length=32) for i in range(12)]
    rows = pack_examples(examples, 64, tok.pad_token_id, seed=0)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == 64 for r in rows)
    assert len(rows) < len(examples)
    total = sum(len(e["input_ids"]) for e in examples)
    assert sum(sum(1 for t in r["input_ids"] if t != tok.pad_token_id) for r in rows) == total, "every example packed once"
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][i] == -100 for i in starts), "an example never learns from the one before it"
    batch = collate(rows[:2], tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}, "packed rows carry no attention mask"
    assert pack_examples(examples, 64, tok.pad_token_id, seed=0) == rows
    with pytest.raises(DataError, match="does not fit"):
        pack_examples(examples, 8, tok.pad_token_id)


def test_plain_prompts_start_with_bos_when_the_tokenizer_adds_one():
    from tokenizers.processors import TemplateProcessing

    from pl_parablock.data import encode_prompt, encode_record

    tok = offline_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    ex = encode_record(tok, {"prompt": "x" * 100, "response": "answer"}, max_length=32)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == -100, "truncation keeps the BOS"
    assert len(ex["input_ids"]) == 32 and tok.decode([t for t in ex["labels"] if t >= 0]) == "answer<|eos|>"
    assert encode_prompt(tok, {"prompt": "y" * 50}, max_length=16)[0] == tok.bos_token_id
    assert encode_record(offline_tokenizer(), {"prompt": "q", "response": "a"}, 32)["input_ids"][0] != tok.bos_token_id


def test_an_hf_recipe_trains_on_one_split_and_evaluates_on_another(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pl_parablock.data import client_data

    def rows(n, offset):
        return [{"problem": f"{i} + 1?", "solution": f"#### {i + 1}"} for i in range(offset, offset + n)]

    splits = {"train": datasets.Dataset.from_list(rows(30, 0)), "test": datasets.Dataset.from_list(rows(5, 100))}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "ds")
    recipe = recipe_for(
        tmp_path, "data.format=hf", f"data.path={tmp_path / 'ds'}", "eval.split=test", "data.columns={question: problem, answer: solution}"
    )
    parts = [client_data(recipe.data, i, **of(recipe)) for i in range(3)]
    assert sum(len(p.train) for p in parts) == 30, "nothing held out of the training split"
    assert [r["answer"] for r in parts[0].evals] == ["101", "102", "103", "104"]  # eval.max_samples=4
