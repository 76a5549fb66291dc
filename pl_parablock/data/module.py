"""Tokenized examples, packing, batches and the per-client LightningDataModule.

An example is the token ids of a record and labels that are ``-100`` on every
token the loss must ignore: the prompt of a single-turn record, everything
but the assistant turns of a chat. Plain (non-chat-template) prompts start
with the tokenizer's BOS token when the tokenizer adds one by default.

Sequences longer than ``max_length`` are truncated: the masked context before
the first learned segment loses its start until that segment keeps at least
half of ``max_length`` (or all of it, if shorter), then the end is cut. With
packing, examples (each truncated first) are laid whole, in a seeded order,
into rows of exactly ``max_length`` tokens; ``position_ids`` restart at every
example, which makes Hugging Face models attend within each example only
(no ``attention_mask`` is passed for packed rows).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from pl_parablock.data.chat import chat_prompt, chat_segments, has_chat_template
from pl_parablock.data.formats import WHERE
from pl_parablock.errors import DataError

__all__ = [
    "ClientDataModule",
    "TokenizedDataset",
    "collate",
    "encode_example",
    "encode_prompt",
    "encode_record",
    "encode_records",
    "pack_examples",
]

log = logging.getLogger(__name__)

Example = dict[str, list[int]]


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts a text with its BOS token by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _segments(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], bos: bool) -> tuple[list[tuple[list[int], bool]], int]:
    """Token segments ``(ids, learned)`` of a record and how many leading tokens truncation must keep (BOS)."""
    source = str(record.get(WHERE, "record"))
    if "messages" in record:
        segs = [(_ids(tokenizer, text), learned) for text, learned in chat_segments(tokenizer, record["messages"], source)]
        if bos and not has_chat_template(tokenizer):
            return [([tokenizer.bos_token_id], False), *segs], 1
        return segs, 0
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{source}: a record needs string 'prompt' and 'response' (or 'messages')")
    r = _ids(tokenizer, response)
    if tokenizer.eos_token_id is not None:
        r = [*r, tokenizer.eos_token_id]
    p = _ids(tokenizer, prompt)
    if bos:
        return [([tokenizer.bos_token_id], False), (p, False), (r, True)], 1
    return [(p, False), (r, True)], 0


def _truncate(segs: list[tuple[list[int], bool]], pinned: int, max_length: int) -> Example:
    ids = [t for s, _ in segs for t in s]
    labels = [t if learned else -100 for s, learned in segs for t in s]
    if len(ids) <= max_length:
        return {"input_ids": ids, "labels": labels}
    room = max_length - pinned
    lengths = [len(s) for s, _ in segs]
    first = next((i for i, (_, learned) in enumerate(segs) if learned), None)
    cut = 0
    if first is not None:
        context = sum(lengths[:first]) - pinned
        keep_first = min(lengths[first], room // 2)
        cut = max(0, context - (room - keep_first))
    ids = ids[:pinned] + ids[pinned + cut :]
    labels = labels[:pinned] + labels[pinned + cut :]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_record(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int, *, bos: bool | None = None) -> Example:
    """Token ids and loss labels of a record (single-turn or chat), truncated to ``max_length``.

    Args:
        tokenizer: the model's tokenizer.
        record: a record (``prompt``/``response`` or ``messages``).
        max_length: tokens at most.
        bos: start plain prompts with BOS; default: if the tokenizer does by default.

    Raises:
        DataError: naming the record's source, when it cannot be rendered.
    """
    segs, pinned = _segments(tokenizer, record, adds_bos(tokenizer) if bos is None else bos)
    return _truncate(segs, pinned, max_length)


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> Example:
    """Token ids of ``prompt + response + eos`` and labels masking the prompt.

    Longer examples are truncated: the response keeps at least half of
    ``max_length`` (or all of it if shorter) and the prompt loses its start.
    """
    return encode_record(tokenizer, {"prompt": prompt, "response": response}, max_length)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int | None = None) -> list[int]:
    """Token ids a model continues to answer the record (its prompt, or the chat up to the last assistant turn).

    Longer prompts keep their last ``max_length`` tokens (and a leading BOS).
    """
    if "messages" in record:
        text = chat_prompt(tokenizer, record["messages"], str(record.get(WHERE, "record")))
        ids = _ids(tokenizer, text)
        pinned = 0
        if adds_bos(tokenizer) and not has_chat_template(tokenizer):
            ids, pinned = [tokenizer.bos_token_id, *ids], 1
    else:
        ids = _ids(tokenizer, str(record["prompt"]))
        pinned = 0
        if adds_bos(tokenizer):
            ids, pinned = [tokenizer.bos_token_id, *ids], 1
    if max_length is not None and len(ids) > max_length:
        ids = ids[:pinned] + ids[len(ids) - (max_length - pinned) :]
    return ids


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, Any]], max_length: int, *, on_error: str = "raise"
) -> tuple[list[Example], list[str]]:
    """Encode records; with ``on_error="skip"`` a record that cannot be rendered is dropped and reported.

    Returns:
        The examples and one message per skipped record.
    """
    bos = adds_bos(tokenizer)
    out: list[Example] = []
    skipped: list[str] = []
    for r in records:
        try:
            out.append(encode_record(tokenizer, r, max_length, bos=bos))
        except DataError as exc:
            if on_error != "skip":
                raise
            skipped.append(str(exc))
    return out, skipped


def pack_examples(examples: Sequence[Example], max_length: int, pad_id: int, seed: int = 0) -> list[Example]:
    """Lay examples whole, in a seeded order, into rows of exactly ``max_length`` tokens.

    Each row holds ``input_ids``, ``labels`` and ``position_ids`` that restart
    at 0 for every example (and for the padding at the row's end, which is
    masked out of the loss). An example's first token is never a target, so
    no example learns from the one before it.

    Raises:
        DataError: an example longer than ``max_length`` (truncate first).
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[Example] = []
    cur: Example = {"input_ids": [], "labels": [], "position_ids": []}

    def flush() -> None:
        n = max_length - len(cur["input_ids"])
        if n < max_length:
            rows.append(
                {
                    "input_ids": cur["input_ids"] + [pad_id] * n,
                    "labels": cur["labels"] + [-100] * n,
                    "position_ids": cur["position_ids"] + list(range(n)),
                }
            )
        for v in cur.values():
            v.clear()

    for i in order:
        ex = examples[int(i)]
        n = len(ex["input_ids"])
        if n > max_length:
            raise DataError(f"an example of {n} tokens does not fit a packed row of {max_length}; truncate it first")
        if n == 0:
            continue
        if len(cur["input_ids"]) + n > max_length:
            flush()
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [-100, *ex["labels"][1:]]
        cur["position_ids"] += list(range(n))
    flush()
    return rows


class TokenizedDataset(Dataset[Example]):
    """Records tokenized once, up front (and packed into rows when ``packing``).

    Args:
        records: the records.
        tokenizer: the model's tokenizer.
        max_length: tokens per example (per row when packing).
        on_error: ``raise`` on a record that cannot be rendered, or ``skip`` it (see :attr:`skipped`).
        packing: pack examples into rows of ``max_length`` tokens.
        seed: seed of the packing order.
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        *,
        on_error: str = "raise",
        packing: bool = False,
        seed: int = 0,
    ) -> None:
        self.examples, self.skipped = encode_records(tokenizer, records, max_length, on_error=on_error)
        self.num_examples = len(self.examples)
        if packing and self.examples:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self.examples = pack_examples(self.examples, max_length, int(pad or 0), seed)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss.

    Packed rows (with ``position_ids``, all ``max_length`` long) are stacked
    with their position ids and no attention mask.
    """
    if all("position_ids" in e for e in examples):
        return {k: torch.tensor([e[k] for e in examples], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
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

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch: the order of epoch ``e`` depends on ``(seed, e)`` alone.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so the data
    order does not depend on how many times a loader's iterator was created
    (every driver of the algorithm sees the same batches).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())


class ClientDataModule(pl.LightningDataModule):
    """One client's training shard and the evaluation set.

    Training batches are shuffled by :class:`EpochShuffle`, a permutation
    seeded by ``seed`` and the epoch, so the data order is the same in every
    run with the same seed.

    Args:
        train: this client's records.
        eval: held-out records (``None``: no validation loader).
        tokenizer: tokenizer of the model.
        batch_size: sequences per batch.
        max_length: tokens per sequence.
        seed: seed of the shuffling (and packing) order.
        packing: pack training examples into rows of ``max_length`` tokens.
        on_error: ``raise`` on a record that cannot be rendered, or ``skip`` and count it.
        name: how errors name this shard (e.g. ``client 2``).

    Raises:
        DataError: an empty shard, or a tokenizer with no pad or eos token.
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
        packing: bool = False,
        on_error: str = "raise",
        name: str = "this client",
    ) -> None:
        super().__init__()
        if not train:
            raise DataError(f"{name}'s data shard is empty; use fewer clients or more data")
        self.train_records = list(train)
        self.eval_records = list(eval) if eval else None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.packing = packing
        self.on_error = on_error
        self.name = name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token")
        self._collate = _Collate(int(pad))
        self._train: TokenizedDataset | None = None
        self._eval: TokenizedDataset | None = None
        self.skipped: list[str] = []

    def setup(self, stage: str) -> None:
        if self._train is None:
            self._train = TokenizedDataset(
                self.train_records, self.tokenizer, self.max_length, on_error=self.on_error, packing=self.packing, seed=self.seed
            )
            self.skipped.extend(self._train.skipped)
            if not self._train.examples:
                raise DataError(
                    f"{self.name}'s data shard is empty: all {len(self.train_records)} records were skipped, "
                    f"the first: {self._train.skipped[0] if self._train.skipped else 'n/a'}"
                )
            if self._train.skipped:
                log.warning("%s: skipped %d records that cannot be encoded, the first: %s", self.name, *self._skip_summary())
        if self._eval is None and self.eval_records:
            self._eval = TokenizedDataset(self.eval_records, self.tokenizer, self.max_length, on_error=self.on_error)
            self.skipped.extend(self._eval.skipped)

    def _skip_summary(self) -> tuple[int, str]:
        assert self._train is not None
        return len(self._train.skipped), self._train.skipped[0]

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup("fit")
        assert self._train is not None
        g = torch.Generator().manual_seed(self.seed)  # the loader's own seed draws must not touch the global RNG
        sampler = EpochShuffle(len(self._train), self.seed)
        return DataLoader(self._train, batch_size=self.batch_size, sampler=sampler, generator=g, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader[Any]:
        self.setup("validate")
        if self._eval is None:
            return DataLoader(TokenizedDataset([], self.tokenizer, self.max_length), batch_size=self.batch_size)
        return DataLoader(self._eval, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)
