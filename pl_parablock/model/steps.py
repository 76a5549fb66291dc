"""Local steps without a Trainer, as Lightning's automatic optimization takes them (the reference and the simulator)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from pl_parablock.model.module import ParaBlockModule

__all__ = ["plain_steps"]


def plain_steps(
    module: ParaBlockModule, optimizer: torch.optim.Optimizer, batches: Iterator[Any], steps: int, gradient_clip_val: float | None
) -> tuple[int, int, float]:
    """``steps`` optimizer steps as Lightning's automatic optimization takes them; returns samples, label tokens, mean loss.

    ``training_step``, ``zero_grad``, ``backward``, norm clipping over the
    optimizer's parameters when asked, ``step``: the same arithmetic in the
    same order as a Lightning client, so the reference and the simulator end
    bitwise where the federation does.
    """
    samples = 0
    tokens: Tensor | int = 0
    losses = []
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(steps):
        batch = next(batches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training_step logs, and there is no Trainer to log to
            loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        if gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(trainable, gradient_clip_val)
        optimizer.step()
        samples += extract_batch_size(batch)
        tokens = tokens + (batch["labels"] != -100).sum()
        losses.append(loss.detach())
    return samples, int(tokens), float(torch.stack(losses).float().mean())
