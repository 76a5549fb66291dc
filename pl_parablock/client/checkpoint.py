"""The client's round checkpoint, as a Lightning callback driven by the strategy's round boundaries."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["RoundCheckpoint"]


class RoundCheckpoint(Callback):
    """Saves the client's Lightning checkpoint every ``every`` rounds, atomically, between rounds.

    The strategy calls :meth:`on_round_boundary` before a round trains. The
    file is written next to its final name and renamed over it, so a crash
    while saving leaves the previous checkpoint whole.
    """

    def __init__(self, path: str, *, every: int = 1) -> None:
        self.path = path
        self.every = every
        self._saved_round = -1

    def on_round_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int) -> None:
        r = round_index
        if r != self._saved_round and r > 0 and r % self.every == 0:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            trainer.save_checkpoint(tmp)
            os.replace(tmp, self.path)
            self._saved_round = r
