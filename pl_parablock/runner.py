"""One client of a recipe: build its model, data and Trainer, run it, report.

The launcher runs this in each client process (or thread, in one-process
mode). Client 0 also evaluates the assembled global model at the end (and
every ``eval.every`` rounds), saves it with ``save_pretrained`` and puts the
metrics in its report.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from pl_parablock.config import Recipe, client_token
from pl_parablock.data import ClientDataModule, client_shares, collate, encode_example, recipe_data
from pl_parablock.errors import ParaBlockError
from pl_parablock.federation.link import Link
from pl_parablock.federation.server import TLS
from pl_parablock.federation.transport import Transport
from pl_parablock.metrics import evaluate_exact_match, evaluate_loss
from pl_parablock.models import build_model
from pl_parablock.module import ParaBlockModule
from pl_parablock.strategy import FederatedBlockStrategy

__all__ = ["ClientRun", "GlobalEvaluation", "prepare_client", "quiet_third_party"]

log = logging.getLogger(__name__)


def quiet_third_party() -> None:
    """Silence banners and progress bars of Lightning and transformers in client logs."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`max_epochs` was not set.*")
    warnings.filterwarnings("ignore", message=r".*litlogger.*")


class GlobalEvaluation(Callback):
    """Evaluates the global model on client 0 and saves it.

    Runs in ``on_train_end`` after the strategy has applied the last
    aggregates (so the model is the global one), and on every validation run
    the Trainer makes during training (``eval.every`` rounds).

    Args:
        strategy: the client's strategy, whose report receives the metrics.
        records: evaluation records.
        tokenizer: tokenizer of the model.
        batch_size: evaluation batch size.
        max_length: tokens per sequence.
        max_new_tokens: generated tokens per math question.
        model_dir: where to save the global model, or ``None``.
    """

    def __init__(
        self,
        strategy: FederatedBlockStrategy,
        records: list[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        max_length: int,
        max_new_tokens: int,
        model_dir: str | None,
    ) -> None:
        self.strategy = strategy
        self.records = records
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.model_dir = model_dir
        self.curve: list[dict[str, Any]] = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("eval_loss")
        if value is not None and not trainer.sanity_checking:
            self.curve.append({"round": self.strategy.round, "eval_loss": float(value)})
            self.strategy.final_metrics["eval_curve"] = list(self.curve)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ParaBlockModule)
        metrics: dict[str, Any] = {}
        if self.records:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            examples = [encode_example(self.tokenizer, r["prompt"], r["response"], self.max_length) for r in self.records]
            batches = [collate(examples[i : i + self.batch_size], int(pad)) for i in range(0, len(examples), self.batch_size)]
            metrics.update(evaluate_loss(pl_module.model, batches))
            metrics.update(
                evaluate_exact_match(
                    pl_module.model, self.tokenizer, self.records, max_new_tokens=self.max_new_tokens, batch_size=max(self.batch_size, 16)
                )
            )
            metrics["eval_samples"] = len(self.records)
        if self.model_dir is not None:
            pl_module.save_pretrained(self.model_dir)
            metrics["model_dir"] = os.path.abspath(self.model_dir)
        if self.curve:
            metrics["eval_curve"] = list(self.curve)
        self.strategy.final_metrics.update(metrics)
        log.info("global model: %s", {k: v for k, v in metrics.items() if k != "eval_curve"})


class RoundCheckpoint(Callback):
    """Saves the client's Lightning checkpoint every ``every`` rounds, atomically.

    The file is written next to its final name and renamed over it, so a
    crash while saving leaves the previous checkpoint whole.
    """

    def __init__(self, strategy: FederatedBlockStrategy, path: str, *, every: int = 1) -> None:
        self.strategy = strategy
        self.path = path
        self.every = every
        self._saved_round = -1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        r = self.strategy.round
        if r != self._saved_round and r > 0 and r % self.every == 0 and trainer.global_step == self.strategy.round_start_step:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            trainer.save_checkpoint(tmp)
            os.replace(tmp, self.path)
            self._saved_round = r


@dataclass
class ClientRun:
    """A client ready to train: call :meth:`fit`, then read :meth:`report`."""

    client_id: int
    trainer: pl.Trainer
    module: ParaBlockModule
    datamodule: ClientDataModule
    strategy: FederatedBlockStrategy
    shard_size: int
    extra: dict[str, Any] = field(default_factory=dict)
    ckpt_path: str | None = None

    def fit(self) -> None:
        """Train; resumes from this client's checkpoint when one exists."""
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.ckpt_path)
        except (RuntimeError, KeyError, EOFError) as exc:
            if self.ckpt_path is None or self.trainer.global_step > 0:
                raise
            raise ParaBlockError(
                f"client {self.client_id}: cannot resume from {self.ckpt_path} ({type(exc).__name__}: {exc}); "
                "it is corrupt or from another model: move it away to start this client afresh"
            ) from None

    def report(self) -> dict[str, Any]:
        return {**self.strategy.report(), "shard_size": self.shard_size, **self.extra}


def prepare_client(recipe: Recipe, client_id: int, server: str | Transport | None, *, evaluate: bool | None = None) -> ClientRun:
    """Build client ``client_id`` of a recipe, connected to ``server``.

    Args:
        recipe: the validated recipe.
        client_id: which client (its data shard).
        server: ``HOST:PORT``, a transport, or ``None`` for a centralized run.
        evaluate: evaluate and save the global model (default: client 0 only).
    """
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    model, tokenizer = build_model(recipe.model, recipe.seed)
    train, evals = recipe_data(recipe)
    shares = client_shares(recipe, train) if server is not None else [list(range(len(train)))]
    shard = [train[i] for i in shares[client_id]]
    evaluate = client_id == 0 if evaluate is None else evaluate
    t = recipe.train
    eval_every = recipe.eval.every if evaluate and evals else 0
    datamodule = ClientDataModule(
        shard, evals if eval_every else None, tokenizer, batch_size=t.batch_size, max_length=t.max_length, seed=recipe.seed
    )
    module = ParaBlockModule(model, tokenizer, lr=t.lr, weight_decay=t.weight_decay)
    b, f = recipe.blocks, recipe.federation
    strategy = FederatedBlockStrategy(
        server,
        client_id,
        local_steps=t.local_steps,
        mode=recipe.mode,  # type: ignore[arg-type]
        blocks=b.patterns,
        layers_per_block=b.layers_per_block,
        embeddings=b.embeddings,
        head=b.head,
        rounds=f.rounds,
        schedule=b.schedule,
        seed=recipe.seed,
        keep_optimizer_state=t.keep_optimizer_state,
        weighting=f.weighting,  # type: ignore[arg-type]
        timeout_s=f.timeout_s,
        link=Link.from_section(recipe.link),
        wire_dtype=f.wire_dtype,
        chunk_kb=f.chunk_kb,
        token=client_token(recipe, client_id),
        tls=TLS(ca=f.tls.ca) if f.tls.ca else None,
    )
    callbacks: list[Callback] = [strategy]
    ckpt_path = None
    if t.checkpoint_every > 0:
        ckpt = RoundCheckpoint(
            strategy, os.path.join(recipe.output_dir, "checkpoints", f"client_{client_id}.ckpt"), every=t.checkpoint_every
        )
        callbacks.append(ckpt)
        if os.path.isfile(ckpt.path):
            ckpt_path = ckpt.path
            log.info("client %d resumes from its checkpoint %s", client_id, ckpt.path)
    if evaluate:
        model_dir = os.path.join(recipe.output_dir, "model")
        callbacks.append(
            GlobalEvaluation(
                strategy,
                evals,
                tokenizer,
                batch_size=t.batch_size,
                max_length=t.max_length,
                max_new_tokens=recipe.eval.max_new_tokens,
                model_dir=model_dir,
            )
        )
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,  # type: ignore[arg-type]
        max_epochs=-1,
        max_steps=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=eval_every * t.local_steps * t.accumulate_grad_batches if eval_every else None,
        check_val_every_n_epoch=None if eval_every else 1,
        limit_val_batches=None if eval_every else 0,
        default_root_dir=recipe.output_dir,
    )
    return ClientRun(client_id, trainer, module, datamodule, strategy, len(shard), ckpt_path=ckpt_path)
