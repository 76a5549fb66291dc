"""Block partition of a model and the schedules that pick the active block.

A :class:`Partition` splits the trainable parameters of a module into
disjoint, named blocks. By default each block is ``layers_per_block``
consecutive layers of the module's largest :class:`torch.nn.ModuleList`
(the decoder layers of a Hugging Face causal LM); the embeddings and the LM
head may be blocks of their own, and explicit regular expressions over
parameter names replace the whole scheme. Parameters in no block are never
trained or sent.

Example::

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(4)]))
    >>> part = partition_model(net, layers_per_block=2)
    >>> [b.name for b in part.blocks]
    ['layers.0-1', 'layers.2-3']
    >>> make_schedule("ascending", num_blocks=2, rounds=5)
    [0, 1, 0, 1, 0]
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from pl_parablock.errors import ModelError

log = logging.getLogger(__name__)

__all__ = [
    "SCHEDULES",
    "Block",
    "Partition",
    "find_layer_list",
    "freeze_to_blocks",
    "make_schedule",
    "partition_model",
    "whole_model_partition",
]

SCHEDULES = ("ascending", "descending", "random")
"""The named schedules of :func:`make_schedule` (``blocks.schedule``; an explicit list of block indices is the other kind)."""


@dataclass(frozen=True)
class Block:
    """One block: a name and the parameter names it owns, in module order."""

    index: int
    name: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class Partition:
    """Disjoint blocks over a module's parameters."""

    blocks: tuple[Block, ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for block in self.blocks:
            if not block.params:
                raise ModelError(f"block {block.name!r} holds no trainable parameter")
            for p in block.params:
                if p in seen:
                    raise ModelError(f"parameter {p!r} is in two blocks ({seen[p]!r} and {block.name!r}); blocks must be disjoint")
                seen[p] = block.name

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def param_names(self) -> list[str]:
        """All parameter names in any block."""
        return [p for b in self.blocks for p in b.params]

    def to_dict(self) -> list[dict[str, Any]]:
        return [{"name": b.name, "params": list(b.params)} for b in self.blocks]

    @classmethod
    def from_dict(cls, data: Sequence[dict[str, Any]]) -> Partition:
        return cls(tuple(Block(i, str(d["name"]), tuple(d["params"])) for i, d in enumerate(data)))


def find_layer_list(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module's largest ``nn.ModuleList`` (by trainable parameters): its layers.

    Raises:
        ModelError: when the module has no non-empty ``nn.ModuleList``.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 0:
            size = sum(p.numel() for p in sub.parameters() if p.requires_grad)
            if size > 0 and (best is None or size > best[0]):
                best = (size, name, sub)
    if best is None:
        raise ModelError(
            f"no nn.ModuleList of layers with trainable parameters found in {type(module).__name__}; "
            "give the blocks as name patterns instead (blocks.patterns in a recipe, or "
            "FederatedBlockStrategy(blocks=[r'encoder\\.0\\..*', r'encoder\\.1\\..*']))"
        )
    return best[1], best[2]


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _params_of(module: nn.Module | None, names_by_id: dict[int, str]) -> tuple[str, ...]:
    if module is None:
        return ()
    return tuple(names_by_id[id(p)] for p in module.parameters() if id(p) in names_by_id)


def partition_model(
    module: nn.Module,
    *,
    layers_per_block: int = 1,
    embeddings: bool = False,
    head: bool = False,
    patterns: Sequence[str] | None = None,
) -> Partition:
    """Split the trainable parameters of ``module`` into blocks.

    Args:
        module: the model (a Hugging Face ``PreTrainedModel`` or any ``nn.Module``).
        layers_per_block: consecutive layers of the layer list per block.
        embeddings: add the input embeddings as a block (first).
        head: add the output head as a block (last); skipped with tied embeddings.
        patterns: one regular expression per block, matched in full against
            parameter names; replaces the layer-based partition.

    Raises:
        ModelError: no layers found, a pattern matching nothing, overlapping blocks.
    """
    if layers_per_block < 1:
        raise ModelError(f"layers_per_block is {layers_per_block}; it must be >= 1")
    trainable = _trainable(module)
    if not trainable:
        raise ModelError(f"{type(module).__name__} has no trainable parameter to split into blocks")

    if patterns:
        blocks = []
        for i, pat in enumerate(patterns):
            rx = re.compile(pat)
            names = tuple(n for n, _ in trainable if rx.fullmatch(n))
            if not names:
                sample = ", ".join(n for n, _ in trainable[:3])
                raise ModelError(f"block pattern {pat!r} matches no trainable parameter (names look like: {sample}, ...)")
            blocks.append(Block(i, f"pattern{i}", names))
        return Partition(tuple(blocks))

    names_by_id = {id(p): n for n, p in trainable}
    prefix, layers = find_layer_list(module)
    groups: list[tuple[str, tuple[str, ...]]] = []
    if embeddings:
        getter = getattr(module, "get_input_embeddings", None)
        emb = getter() if callable(getter) else None
        if emb is None:
            layer_ids = {id(p) for p in layers.parameters()}
            embs = [m for m in module.modules() if isinstance(m, nn.Embedding)]
            names = tuple(names_by_id[id(p)] for m in embs for p in m.parameters() if id(p) in names_by_id and id(p) not in layer_ids)
        else:
            names = _params_of(emb, names_by_id)
        if not names:
            raise ModelError(f"embeddings=True but {type(module).__name__} has no trainable input embedding")
        groups.append(("embeddings", names))
    for start in range(0, len(layers), layers_per_block):
        stop = min(start + layers_per_block, len(layers))
        names = tuple(n for i in range(start, stop) for n in _params_of(layers[i], names_by_id))
        label = f"layers.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}"
        if names:
            groups.append((label, names))
    if head:
        getter = getattr(module, "get_output_embeddings", None)
        out = getter() if callable(getter) else None
        names = _params_of(out, names_by_id)
        taken = {n for _, g in groups for n in g}
        names = tuple(n for n in names if n not in taken)
        if not names:
            raise ModelError(
                f"head=True but {type(module).__name__} has no separate trainable output head "
                "(tied to the input embeddings?); use embeddings=True instead"
            )
        groups.append(("head", names))
    if not groups:
        raise ModelError(f"the layers under {prefix!r} hold no trainable parameter")
    return Partition(tuple(Block(i, label, names) for i, (label, names) in enumerate(groups)))


def whole_model_partition(module: nn.Module) -> Partition:
    """One block holding every trainable parameter (FedAvg)."""
    names = tuple(n for n, _ in _trainable(module))
    if not names:
        raise ModelError(f"{type(module).__name__} has no trainable parameter")
    return Partition((Block(0, "all", names),))


def freeze_to_blocks(module: nn.Module, partition: Partition) -> list[dict[str, nn.Parameter]]:
    """Freeze every parameter of ``module`` in no block; return each block's parameters by name."""
    params = dict(module.named_parameters())
    in_blocks = set(partition.param_names)
    for name, p in params.items():
        p.requires_grad_(name in in_blocks)
    log.info(
        "%d blocks over %d parameters (%d frozen, never sent): %s",
        len(partition),
        sum(params[n].numel() for n in in_blocks),
        sum(p.numel() for n, p in params.items() if n not in in_blocks),
        ", ".join(b.name for b in partition.blocks),
    )
    return [{n: params[n] for n in b.params} for b in partition.blocks]


def make_schedule(kind: str | Sequence[int], num_blocks: int, rounds: int, seed: int = 0) -> list[int]:
    """The active block of each round.

    Args:
        kind: ``ascending``, ``descending``, ``random`` (a seeded permutation
            per sweep) or an explicit list of block indices, repeated.
        num_blocks: number of blocks ``M``.
        rounds: number of rounds.
        seed: seed of the random schedule.

    With two or more blocks no block is active in two consecutive rounds
    (random sweeps are re-drawn at their boundary; an explicit list that
    repeats a block back to back is refused), which is what bounds the
    staleness of a ParaBlock client to one round.

    Raises:
        ModelError: an explicit list naming a missing block or repeating one back to back.
    """
    if num_blocks < 1 or rounds < 0:
        raise ModelError(f"cannot schedule {rounds} rounds over {num_blocks} blocks")
    if num_blocks == 1:
        return [0] * rounds
    if isinstance(kind, str):
        if kind == "ascending":
            return [t % num_blocks for t in range(rounds)]
        if kind == "descending":
            return [num_blocks - 1 - t % num_blocks for t in range(rounds)]
        if kind == "random":
            rng = random.Random(seed)
            out: list[int] = []
            while len(out) < rounds:
                sweep = list(range(num_blocks))
                rng.shuffle(sweep)
                if out and sweep[0] == out[-1]:
                    j = rng.randrange(1, num_blocks)
                    sweep[0], sweep[j] = sweep[j], sweep[0]
                out.extend(sweep)
            return out[:rounds]
        raise ModelError(f"unknown schedule {kind!r}; use {', '.join(SCHEDULES)} or a list of block indices")
    order = list(kind)
    if not order:
        raise ModelError("the explicit schedule is empty")
    bad = [i for i in order if not 0 <= i < num_blocks]
    if bad:
        raise ModelError(f"schedule names block(s) {bad} but the model has blocks 0..{num_blocks - 1}")
    cyc = order + order[:1] if len(order) > 1 else order + order
    for a, b in itertools.pairwise(cyc):
        if a == b:
            raise ModelError(
                f"schedule {order} activates block {a} in two consecutive rounds (counting the wrap-around); "
                "reorder it so a ParaBlock client is never more than one round stale"
            )
    return [order[t % len(order)] for t in range(rounds)]
