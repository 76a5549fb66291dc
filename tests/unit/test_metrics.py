from __future__ import annotations

import math

import pytest
import torch

from pl_parablock.metrics import ExactMatch, TokenLoss, extract_answer, normalize_number


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
