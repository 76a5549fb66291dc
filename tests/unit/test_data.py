from __future__ import annotations

import json
from collections import Counter

import pytest

from pl_parablock.data import dirichlet_partition, encode_example, iid_partition, load_records, synthetic_records
from pl_parablock.data.module import collate
from pl_parablock.errors import DataError
from pl_parablock.models import offline_tokenizer


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
