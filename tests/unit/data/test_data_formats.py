"""Loaders on small fixture files: chat, Hugging Face datasets, column names, counted skips."""

from __future__ import annotations

import json

import pytest

from pl_parablock.data import encode_prompt, encode_record, load_records, read_records
from pl_parablock.data.chat import chat_prompt, chat_segments
from pl_parablock.errors import DataError
from pl_parablock.model.build import offline_tokenizer
from tests.helpers import ALPACA_ROWS, write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6\n#### 6"},
]


def learned_text(tok, example) -> str:
    return tok.decode([t for t in example["labels"] if t != -100])


def test_chat_jsonl_loads_with_answers_and_labels(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": CONVERSATION, "topic": "math"}, {"messages": CONVERSATION[:3], "answer": 4}],
    )
    recs = load_records("chat", path)
    assert [r["answer"] for r in recs] == ["6", "4"]  # from the final '#### N', or the answer field
    assert recs[0]["topic"] == "math" and recs[0]["_where"] == f"{path}:1" and recs[1]["category"] == "chat"


def test_plain_template_learns_only_the_assistant_turns():
    tok = offline_tokenizer()
    segs = chat_segments(tok, CONVERSATION)
    text = "".join(s for s, _ in segs)
    assert text == (
        "### System:\nBe brief.\n### User:\n2+2?\n### Assistant:\n4<|eos|>\n### User:\nand 3+3?\n### Assistant:\n6\n#### 6<|eos|>"
    )
    ex = encode_record(tok, {"messages": CONVERSATION}, max_length=512)
    assert learned_text(tok, ex) == "4<|eos|>6\n#### 6<|eos|>"
    assert tok.decode(ex["input_ids"]) == text
    prompt = chat_prompt(tok, CONVERSATION)
    assert text.startswith(prompt) and prompt.endswith("### Assistant:\n") and "and 3+3?" in prompt


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = offline_tokenizer()
    tok.chat_template = CHATML
    ex = encode_record(tok, {"messages": CONVERSATION}, max_length=512)
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    # the assistant contents and their end-of-turn markers, nothing of the headers or other turns
    assert learned_text(tok, ex) == "4<|im_end|>\n6\n#### 6<|im_end|>\n"
    ids = encode_prompt(tok, {"messages": CONVERSATION})
    assert tok.decode(ids).endswith("and 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_rewrites_history_is_refused():
    tok = offline_tokenizer()
    # renders only the last two turns: adding a turn changes the earlier text
    tok.chat_template = (
        "{% for m in messages[-2:] %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with pytest.raises(DataError, match="changes the text of earlier turns"):
        encode_record(tok, {"messages": CONVERSATION, "_where": "c.jsonl:3"}, max_length=512)


def test_a_failing_template_names_the_record():
    tok = offline_tokenizer()
    tok.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must start with user') }}{% endif %}x"
    with pytest.raises(DataError, match=r"c.jsonl:7: the tokenizer's chat template failed.*roles must start with user"):
        encode_record(tok, {"messages": CONVERSATION, "_where": "c.jsonl:7"}, max_length=512)


def test_long_chats_keep_the_first_assistant_turn():
    tok = offline_tokenizer()
    convo = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "answer"}, {"role": "user", "content": "more"}]
    ex = encode_record(tok, {"messages": convo}, max_length=64)
    assert len(ex["input_ids"]) == 64 and learned_text(tok, ex) == "answer<|eos|>"


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no 'assistant' turn"),
        ({"messages": [{"role": "assistant"}]}, "messages[0] must be an object with string 'role' and 'content'"),
        ({"messages": "hello"}, "field 'messages' must be a non-empty list"),
        ({"conversation": []}, "missing field 'messages'"),
    ],
)
def test_bad_chat_rows_name_the_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, row])
    with pytest.raises(DataError) as err:
        load_records("chat", path)
    assert f"bad.jsonl:2: {message}" in str(err.value)


def test_skip_counts_bad_rows_and_an_all_bad_file_still_fails(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(ALPACA_ROWS[0])
    path.write_text(f"{good}\n{{broken\n{json.dumps({'instruction': 'x'})}\n{good}\n")
    with pytest.raises(DataError, match="mixed.jsonl:2: not valid JSON"):
        read_records("alpaca", str(path))
    loaded = read_records("alpaca", str(path), on_error="skip")
    assert len(loaded.records) == 2
    assert (
        len(loaded.skipped) == 2 and "mixed.jsonl:2" in loaded.skipped[0] and "mixed.jsonl:3: missing field 'output'" in loaded.skipped[1]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    with pytest.raises(DataError, match="holds no valid record: all 1 rows are bad"):
        read_records("alpaca", str(bad), on_error="skip")


def test_json_array_items_are_named_by_their_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"a.json:4: missing field 'output'"):
        load_records("alpaca", str(path))


def test_columns_rename_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "solution": "1+1=2\n#### 2", "level": "easy"}])
    (rec,) = load_records("gsm8k", path, columns={"question": "problem", "answer": "solution", "category": "level"})
    assert rec["answer"] == "2" and "1+1?" in rec["prompt"] and rec["category"] == "easy"
    with pytest.raises(DataError, match=r"missing field 'question' .*have: level, problem, solution"):
        load_records("gsm8k", path)
    with pytest.raises(DataError, match=r"missing field 'query' \(data.columns.question\)"):
        load_records("gsm8k", path, columns={"question": "query"})


def test_hf_datasets_from_local_files_and_a_saved_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"{i} + 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}", "source": "s" + str(i % 2)} for i in range(6)]
    jsonl = write_jsonl(tmp_path / "g.jsonl", rows)
    recs = load_records("hf", jsonl)  # rows read as gsm8k: detected from the columns
    assert [r["answer"] for r in recs] == [str(i + 1) for i in range(6)] and recs[3]["source"] == "s1"

    csv = tmp_path / "alpaca.csv"
    csv.write_text("instruction,input,output\nSay hi,,hi\nAdd,1 2,3\n")
    assert [r["response"] for r in load_records("hf", str(csv))] == ["hi", "3"]

    saved = tmp_path / "saved"
    chats = [{"messages": CONVERSATION[1:3]}] * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats), "test": datasets.Dataset.from_list(chats[:1])}).save_to_disk(saved)
    assert len(load_records("hf", str(saved))) == 3 and len(load_records("hf", str(saved), split="test")) == 1
    with pytest.raises(DataError, match=r"has no split 'validation' \(splits: train, test\)"):
        load_records("hf", str(saved), split="validation")

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="cannot tell how to read rows with columns text; set data.row_format"):
        load_records("hf", odd)
    with pytest.raises(DataError, match=r"odd.jsonl row 0: missing field 'output'"):
        load_records("hf", odd, row_format="alpaca", columns={"instruction": "text"})
