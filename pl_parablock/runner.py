"""One client of a recipe: build its model, data and Trainer, run it, report.

The launcher runs this in each client process (or thread, in one-process
mode). Client 0 also evaluates the global model every ``eval.every`` rounds
and at the end, saves it with ``save_pretrained`` and puts the metrics in its
report. Where the model lands under ``OUTPUT_DIR``:

* ``model/``: the global model with its tokenizer: full weights
  (``AutoModelForCausalLM.from_pretrained``), or with ``model.peft`` the
  LoRA adapter (``PeftModel.from_pretrained(base, OUTPUT_DIR/model)``, the
  base built or loaded as the recipe says);
* ``merged_model/``: with ``model.peft.merge``, the base with the adapter
  merged in, a full model with its tokenizer.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from pl_parablock.config import Recipe, client_token
from pl_parablock.data import ClientDataModule, client_data, collate, encode_record
from pl_parablock.errors import DataError, ParaBlockError
from pl_parablock.federation.channel import TLS
from pl_parablock.federation.link import Link
from pl_parablock.federation.transport import Transport
from pl_parablock.metrics import evaluate_exact_match, evaluate_loss
from pl_parablock.models import build_model, save_merged
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
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*")  # peft on transformers 5


class GlobalEvaluation(Callback):
    """Evaluates the global model on client 0, every ``every`` rounds and at the end, and saves it.

    Each evaluation computes the token loss and perplexity of the held-out
    records and, for math records (those with an ``answer``), greedy
    exact match. The model evaluated is exactly the global model after round
    ``t``: in ``sync`` and ``fedavg`` modes the client holds it as soon as
    round ``t``'s aggregate is applied; in ``parablock`` mode round ``t``'s
    aggregate is applied when round ``t + 2`` starts, while the block of round
    ``t + 1`` already holds this client's unaggregated progress, so that
    block is swapped for its global value (saved when round ``t + 1``
    started) during the evaluation. A point due at the second-to-last round
    of a ``parablock`` run is covered by the final evaluation (both
    aggregates arrive together). The curve (``round`` = rounds aggregated,
    0 = the initial model) goes to the report's ``eval_curve``.

    At the end (``on_train_end``, after the strategy applied the last
    aggregates) the final metrics go to the report and the model is saved:
    a full model, or a PEFT adapter, in ``model_dir``; with ``merge``, the
    base with the adapter merged in, in ``merged_dir``.

    Args:
        strategy: the client's strategy, whose report receives the metrics.
        records: evaluation records.
        tokenizer: tokenizer of the model.
        batch_size: evaluation batch size.
        max_length: tokens per sequence.
        max_new_tokens: generated tokens per math question.
        model_dir: where to save the global model, or ``None``.
        every: evaluate every this many rounds; 0: only at the end.
        on_error: ``raise`` on an evaluation record that cannot be encoded, or ``skip`` it.
        merged_dir: where to save the merged model (PEFT models only).
        merge: ``merge(adapter_dir, merged_dir)`` saves the merged model.
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
        every: int = 0,
        on_error: str = "raise",
        merged_dir: str | None = None,
        merge: Callable[[str, str], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.model_dir = model_dir
        self.every = every
        self.merged_dir = merged_dir
        self.merge = merge
        self.curve: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        examples = []
        for r in records:
            try:
                examples.append(encode_record(tokenizer, r, max_length))
                self.records.append(r)
            except DataError as exc:
                if on_error != "skip":
                    raise
                self.skipped.append(str(exc))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._batches = [collate(examples[i : i + batch_size], int(pad or 0)) for i in range(0, len(examples), batch_size)]
        self._last_round = -1
        self._snapshot: tuple[int, dict[str, Tensor]] | None = None
        self._warned = False

    def evaluate(self, model: PreTrainedModel) -> dict[str, Any]:
        """Loss, perplexity and (math records) exact match of ``model`` on the evaluation records."""
        if not self.records:
            return {}
        t0 = time.perf_counter()
        metrics: dict[str, Any] = dict(evaluate_loss(model, self._batches))
        metrics.update(
            evaluate_exact_match(
                model,
                self.tokenizer,
                self.records,
                max_new_tokens=self.max_new_tokens,
                batch_size=max(self.batch_size, 16),
                max_prompt_tokens=self.max_length,
            )
        )
        metrics["eval_s"] = time.perf_counter() - t0
        return metrics

    def _due(self, t: int) -> bool:
        """Whether the global model after round ``t`` (0-based) is a point of the curve before the final one."""
        return self.every > 0 and t >= 0 and (t + 1) % self.every == 0 and t < self.strategy.rounds - 1

    def _point(self, t: int, model: PreTrainedModel) -> None:
        metrics = self.evaluate(model)
        if metrics:
            self.curve.append({"round": t + 1, **metrics})
            self.strategy.final_metrics["eval_curve"] = list(self.curve)
            log.info("global model after round %d: %s", t + 1, metrics)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ParaBlockModule)
        self._last_round = self.strategy.round
        if self.every > 0 and self.strategy.round == 0 and not self.curve:
            self._point(-1, pl_module.model)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        r = self.strategy.round  # rounds ended; round r has begun if r < rounds
        if self.every <= 0 or r == self._last_round:
            return
        self._last_round = r
        assert isinstance(pl_module, ParaBlockModule)
        stale = self.strategy.federated and self.strategy.mode == "parablock"
        if not stale:
            if self._due(r - 1):
                self._point(r - 1, pl_module.model)
            return
        partition = self.strategy.partition
        assert partition is not None
        if len(partition) < 2:
            if not self._warned:
                self._warned = True
                rank_zero_warn("parablock with a single block never holds the global model mid-run; only the final model is evaluated")
            return
        params = dict(pl_module.named_parameters())
        if self._due(r - 2) and r < self.strategy.rounds and self._snapshot is not None:
            block, saved = self._snapshot
            with torch.no_grad():
                local = {n: params[n].detach().clone() for n in saved}
                for n, v in saved.items():
                    params[n].copy_(v)
                try:
                    self._point(r - 2, pl_module.model)
                finally:
                    for n, v in local.items():
                        params[n].copy_(v)
        self._snapshot = None
        if self._due(r - 1) and r + 1 < self.strategy.rounds:
            block = self.strategy.schedule[r]
            names = partition.blocks[block].params
            self._snapshot = (block, {n: params[n].detach().clone() for n in names})

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ParaBlockModule)
        metrics: dict[str, Any] = {}
        if self.records:
            metrics.update(self.evaluate(pl_module.model))
            metrics["eval_samples"] = len(self.records)
            if self.every > 0:
                self.curve.append({"round": self.strategy.round, **{k: v for k, v in metrics.items() if k != "eval_samples"}})
        if self.model_dir is not None:
            pl_module.save_pretrained(self.model_dir)
            metrics["model_dir"] = os.path.abspath(self.model_dir)
            if pl_module.is_peft:
                metrics["model_format"] = "peft_adapter"
                if self.merge is not None and self.merged_dir is not None:
                    self.merge(self.model_dir, self.merged_dir)
                    metrics["merged_model_dir"] = os.path.abspath(self.merged_dir)
            else:
                metrics["model_format"] = "full"
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
    evaluation: GlobalEvaluation | None = None
    ckpt_path: str | None = None

    def fit(self) -> None:
        """Train; resumes from this client's checkpoint when one exists."""
        if self.ckpt_path is not None:
            self._check_checkpoint(self.ckpt_path)
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.ckpt_path)
        except (RuntimeError, KeyError) as exc:
            if self.ckpt_path is None or self.trainer.global_step > 0:
                raise
            raise self._unusable(self.ckpt_path, exc) from None

    def _unusable(self, path: str, exc: BaseException) -> ParaBlockError:
        return ParaBlockError(
            f"client {self.client_id}: cannot resume from {path} ({type(exc).__name__}: {str(exc)[:200]}); "
            "it is corrupt or from another model: move it away to start this client afresh"
        )

    def _check_checkpoint(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # any failure to read it back means it is unusable
            raise self._unusable(path, exc) from None
        if not isinstance(state, dict) or "state_dict" not in state:
            raise self._unusable(path, ValueError("not a Lightning checkpoint"))

    def report(self) -> dict[str, Any]:
        return {**self.strategy.report(), "shard_size": self.shard_size, **self.extra}


def prepare_client(recipe: Recipe, client_id: int, server: str | Transport | None, *, evaluate: bool | None = None) -> ClientRun:
    """Build client ``client_id`` of a recipe, connected to ``server``.

    The client reads only the data it needs: with a natural partition, its
    own file (and the evaluation file, if it evaluates).

    Args:
        recipe: the validated recipe.
        client_id: which client (its data shard).
        server: ``HOST:PORT``, a transport, or ``None`` for a centralized run on all the data.
        evaluate: evaluate and save the global model (default: client 0 only).

    Raises:
        ParaBlockError: a model, data or recipe problem, naming its cause.
    """
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    evaluate = client_id == 0 if evaluate is None else evaluate
    data = client_data(recipe, client_id if server is not None else None, evaluate=evaluate)
    log.info("client %d: %d training records, %d evaluation records", client_id, len(data.train), len(data.evals))
    if data.skipped:
        log.warning(
            "client %d: skipped %d bad data rows (data.on_error=skip), the first: %s", client_id, len(data.skipped), data.skipped[0]
        )
    model, tokenizer = build_model(recipe.model, recipe.seed)
    t, d = recipe.train, recipe.data
    datamodule = ClientDataModule(
        data.train,
        None,
        tokenizer,
        batch_size=t.batch_size,
        max_length=t.max_length,
        seed=recipe.seed,
        packing=t.packing,
        on_error=d.on_error,
        name=f"client {client_id}",
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
    evaluation = None
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
        pe = recipe.model.peft
        evaluation = GlobalEvaluation(
            strategy,
            data.evals,
            tokenizer,
            batch_size=t.batch_size,
            max_length=t.max_length,
            max_new_tokens=recipe.eval.max_new_tokens,
            model_dir=os.path.join(recipe.output_dir, "model"),
            every=recipe.eval.every,
            on_error=d.on_error,
            merged_dir=os.path.join(recipe.output_dir, "merged_model") if pe.method and pe.merge else None,
            merge=partial(save_merged, recipe.model, recipe.seed, tokenizer=tokenizer) if pe.method and pe.merge else None,
        )
        callbacks.append(evaluation)
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
        limit_val_batches=0,
        default_root_dir=recipe.output_dir,
    )
    # Encode now: a bad record stops the client before it joins, and the
    # counts travel to the server with the client's report (its `final`).
    datamodule.setup("fit")
    encode_skipped = datamodule.skipped + (evaluation.skipped if evaluation is not None else [])
    strategy.final_metrics["client_data"] = {
        "shard_size": len(data.train),
        "read_skipped": len(data.skipped),
        "encode_skipped": len(encode_skipped),
        "skipped_examples": (data.skipped + encode_skipped)[:5],
    }
    return ClientRun(client_id, trainer, module, datamodule, strategy, len(data.train), evaluation=evaluation, ckpt_path=ckpt_path)
