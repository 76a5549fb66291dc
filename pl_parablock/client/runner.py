"""One client of a recipe: build its model, data and Trainer, run it, report.

The launcher runs this in each client process (or thread, in one-process
mode). Unless an evaluator of its own does it (``eval.evaluator: process``,
:mod:`pl_parablock.client.evaluator`), client 0 also evaluates the global
model every ``eval.every`` rounds and at the end, saves it with
``save_pretrained`` and puts the metrics in its report. Where the model
lands under ``OUTPUT_DIR`` (whoever saves it):

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
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from pl_parablock.client.checkpoint import RoundCheckpoint
from pl_parablock.client.evaluation import GlobalEvaluation
from pl_parablock.client.strategy import FederatedBlockStrategy
from pl_parablock.client.transport import Transport
from pl_parablock.data import ClientDataModule, client_data
from pl_parablock.errors import ParaBlockError
from pl_parablock.model.build import build_model, save_base, save_merged
from pl_parablock.model.module import ParaBlockModule
from pl_parablock.recipe.build import client_token, compression_of, run_loggers
from pl_parablock.recipe.schema import Recipe
from pl_parablock.wire.channel import TLS
from pl_parablock.wire.link import Link

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


def prepare_client(
    recipe: Recipe, client_id: int, server: str | Transport | None, *, evaluate: bool | None = None, shard: bool | None = None
) -> ClientRun:
    """Build client ``client_id`` of a recipe, connected to ``server``.

    The client reads only the data it needs: with a natural partition, its
    own file (and the evaluation file, if it evaluates).

    Args:
        recipe: the validated recipe.
        client_id: which client (its data shard).
        server: ``HOST:PORT``, a transport, or ``None`` for a centralized run on all the data.
        evaluate: evaluate and save the global model (default: client 0, unless ``eval.evaluator`` is ``process``).
        shard: train on this client's share of the data (default: with a
            server; a centralized run trains on all of it).

    Raises:
        ParaBlockError: a model, data or recipe problem, naming its cause.
    """
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    evaluate = client_id == 0 and recipe.eval.evaluator != "process" if evaluate is None else evaluate
    shard = server is not None if shard is None else shard
    data = client_data(
        recipe.data,
        client_id if shard else None,
        clients=recipe.federation.clients,
        seed=recipe.seed,
        evaluation=recipe.eval,
        evaluate=evaluate,
    )
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
        mode=recipe.mode,
        blocks=b.patterns,
        layers_per_block=b.layers_per_block,
        embeddings=b.embeddings,
        head=b.head,
        rounds=f.rounds,
        schedule=b.schedule,
        seed=recipe.seed,
        keep_optimizer_state=t.keep_optimizer_state,
        weighting=f.weighting,
        shard_size=len(data.train),
        timeout_s=f.timeout_s,
        link=Link.from_section(recipe.link),
        compression=compression_of(recipe),
        chunk_kb=f.chunk_kb,
        token=client_token(recipe, client_id),
        tls=TLS(ca=f.tls.ca) if f.tls.ca else None,
    )
    callbacks: list[Callback] = [strategy]
    evaluation = None
    ckpt_path = None
    if t.checkpoint_every > 0:
        ckpt = RoundCheckpoint(os.path.join(recipe.output_dir, "checkpoints", f"client_{client_id}.ckpt"), every=t.checkpoint_every)
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
            base_dir=os.path.join(recipe.output_dir, "base_model") if pe.method and recipe.model.config else None,
            save_base=partial(save_base, recipe.model, recipe.seed, tokenizer=tokenizer) if pe.method and recipe.model.config else None,
        )
        callbacks.append(evaluation)
    # a reference run (no server, shard=True) writes no logs of its own
    loggers = run_loggers(recipe, f"client_{client_id}") if server is not None else []
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,  # type: ignore[arg-type]
        max_epochs=-1,
        max_steps=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        callbacks=callbacks,
        logger=loggers or False,
        log_every_n_steps=1,
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
