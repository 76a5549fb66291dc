from __future__ import annotations

import math

import pytest
import torch

from pl_parablock.model.metrics import ExactMatch, TokenLoss, extract_answer, normalize_number


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so the total is 1,000 apples\n#### 1,000", "1000"),
        ("#### -3", "-3"),
        ("it costs $3.50", "3.5"),
        ("3 + 4 = 7. The answer is 7.", "7"),
        ("#### 12 apples", "12"),
        ("no number here", None),
        ("0.50", "0.5"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_match_compares_numbers_by_value():
    m = ExactMatch()
    m.update(["#### 1,000", "the answer is 3.50", "#### -3", "#### 4"], ["1000", "3.5", "-3", "5"])
    assert m.compute().item() == pytest.approx(0.75)
    assert normalize_number("1e3") == "1000"


def test_token_loss_ignores_masked_tokens():
    logits = torch.zeros(1, 4, 3)
    labels = torch.tensor([[-100, 1, -100, 2]])
    m = TokenLoss()
    m.update(logits, labels)
    assert m.compute().item() == pytest.approx(math.log(3))
    assert int(m.count) == 2


def test_exact_match_on_gsm8k_references_with_tricky_answers(tmp_path):
    import json

    from pl_parablock.data import load_records

    rows = [("Total?", "500+500=1,000\n#### 1,000"), ("Change?", "2-5=-3\n#### -3"), ("Price?", "7/2=3.50\n#### 3.50")]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    refs = [r["answer"] for r in load_records("gsm8k", str(path))]
    m = ExactMatch()
    m.update(["so that makes 1000 in all", "#### -3", "#### $3.5"], refs)
    assert m.compute().item() == 1.0
    m = ExactMatch()
    m.update(["#### 1,001", "#### 3", "#### 3.05"], refs)  # off by one, sign lost, digits swapped
    assert m.compute().item() == 0.0
