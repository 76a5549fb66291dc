"""Evaluation of the global model: token loss / perplexity and exact match.

Both are torchmetrics ``Metric`` objects, so they accumulate over batches and
reduce correctly across processes.

Exact match follows the GSM8K convention: the answer is the number after the
last ``####`` in the generated text, or else the last number in it; numbers
compare by value after removing thousands separators (``1,000 == 1000``,
``3.50 == 3.5``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional
from torchmetrics import Metric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pl_parablock.data.module import encode_prompt

__all__ = ["ExactMatch", "TokenLoss", "evaluate_exact_match", "evaluate_loss", "extract_answer", "normalize_number"]

_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written as text, or ``None``.

    Example::

        >>> [normalize_number(s) for s in ["1,000", "-3", "3.50", "$12", "abc"]]
        ['1000', '-3', '3.5', '12', None]
    """
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    if d == d.to_integral_value():
        return str(int(d))
    return format(d, "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a response (``#### N``, else the last number)."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        return normalize_number(m.group(0)) if m else None
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


class ExactMatch(Metric):
    """Fraction of predictions whose final number equals the reference."""

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        for p, t in zip(preds, targets, strict=True):
            ref = normalize_number(t) if normalize_number(t) is not None else extract_answer(t)
            got = extract_answer(p)
            self.correct += int(got is not None and got == ref)
            self.total += 1

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class TokenLoss(Metric):
    """Mean next-token cross-entropy over supervised tokens (labels != -100)."""

    full_state_update = False
    nll: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        loss = functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        self.nll += loss.double()
        self.count += (shift_labels != -100).sum()

    def compute(self) -> Tensor:
        return self.nll / self.count.clamp(min=1)


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Token-weighted loss and perplexity of ``model`` on ``batches``."""
    was_training = model.training
    model.eval()
    metric = TokenLoss(sync_on_compute=False).to(model.device)  # these batches are this process's whole set: nothing to sync
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        metric.update(out.logits, batch["labels"])
    model.train(was_training)
    if int(metric.count) == 0:
        return {}
    loss = float(metric.compute())
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def evaluate_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
) -> dict[str, float]:
    """Greedy-generate an answer for each math record (one with an ``answer``) and score exact match.

    The prompt is the record's prompt, or a chat up to its last assistant
    turn, tokenized as in training; longer ones keep their last
    ``max_prompt_tokens`` tokens.
    """
    math_records = [r for r in records if r.get("answer") is not None]
    if not math_records:
        return {}
    was_training = model.training
    model.eval()
    metric = ExactMatch(sync_on_compute=False)  # these records are this process's whole set: nothing to sync
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(math_records), batch_size):
        chunk = math_records[i : i + batch_size]
        prompts = [encode_prompt(tokenizer, r, max_prompt_tokens) for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):  # left padding for generation
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        metric.update(texts, [str(r["answer"]) for r in chunk])
    model.train(was_training)
    return {"exact_match": float(metric.compute()), "exact_match_samples": len(math_records)}
