"""Tokenized examples, batches and the per-client LightningDataModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from pl_parablock.errors import DataError

__all__ = ["ClientDataModule", "TokenizedDataset", "collate", "encode_example"]


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of ``prompt + response + eos`` and labels masking the prompt.

    Longer examples are truncated: the response keeps at least half of
    ``max_length`` (or all of it if shorter) and the prompt loses its start.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = [*r, tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        keep_r = min(len(r), max(max_length // 2, max_length - len(p)))
        r = r[:keep_r]
        p = p[len(p) - (max_length - keep_r) :] if max_length - keep_r > 0 else []
    return {"input_ids": p + r, "labels": [-100] * len(p) + r}


class TokenizedDataset(Dataset[dict[str, list[int]]]):
    """Records (``prompt``/``response``) tokenized once, up front."""

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.examples = [encode_example(tokenizer, r["prompt"], r["response"], max_length) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)


class ClientDataModule(pl.LightningDataModule):
    """One client's training shard and the evaluation set.

    Training batches are shuffled by a generator seeded with ``seed``, so the
    data order is the same in every run with the same seed.

    Args:
        train: this client's records.
        eval: held-out records (``None``: no validation loader).
        tokenizer: tokenizer of the model.
        batch_size: sequences per batch.
        max_length: tokens per sequence.
        seed: seed of the shuffling order.
    """

    def __init__(
        self,
        train: Sequence[dict[str, Any]],
        eval: Sequence[dict[str, Any]] | None,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 8,
        max_length: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not train:
            raise DataError("this client's data shard is empty; use fewer clients or more data")
        self.train_records = list(train)
        self.eval_records = list(eval) if eval else None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token")
        self._collate = _Collate(int(pad))
        self._train: TokenizedDataset | None = None
        self._eval: TokenizedDataset | None = None

    def setup(self, stage: str) -> None:
        if self._train is None:
            self._train = TokenizedDataset(self.train_records, self.tokenizer, self.max_length)
        if self._eval is None and self.eval_records:
            self._eval = TokenizedDataset(self.eval_records, self.tokenizer, self.max_length)

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup("fit")
        assert self._train is not None
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, generator=g, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader[Any]:
        self.setup("validate")
        if self._eval is None:
            return DataLoader(TokenizedDataset([], self.tokenizer, self.max_length), batch_size=self.batch_size)
        return DataLoader(self._eval, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)
