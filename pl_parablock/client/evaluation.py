"""Evaluation of the global model: what is measured and saved (:class:`ModelEvaluation`), and client 0's callback.

:class:`ModelEvaluation` evaluates a model on the held-out records and
saves it; the evaluator process (:mod:`pl_parablock.client.evaluator`) and
:class:`GlobalEvaluation` both use it, so a curve point and the saved model
are the same whoever evaluates. :class:`GlobalEvaluation` follows the
global model through the strategy's hook (``on_global_model``): it never
works out by itself when an aggregate is applied.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from pl_parablock.client.strategy import FederatedBlockStrategy
from pl_parablock.data import collate, encode_record
from pl_parablock.errors import DataError
from pl_parablock.model.metrics import evaluate_exact_match, evaluate_loss
from pl_parablock.model.module import ParaBlockModule

__all__ = ["GlobalEvaluation", "ModelEvaluation"]

log = logging.getLogger(__name__)


class ModelEvaluation:
    """Evaluates a model on held-out records and saves it.

    Each evaluation computes the token loss and perplexity of the held-out
    records and, for math records (those with an ``answer``), greedy
    exact match. The final model is saved as a full model, or a PEFT
    adapter, in ``model_dir``; with ``merge``, the base with the adapter
    merged in, in ``merged_dir``.

    Args:
        records: evaluation records.
        tokenizer: tokenizer of the model.
        batch_size: evaluation batch size.
        max_length: tokens per sequence.
        max_new_tokens: generated tokens per math question.
        model_dir: where to save the global model, or ``None``.
        on_error: ``raise`` on an evaluation record that cannot be encoded, or ``skip`` it.
        merged_dir: where to save the merged model (PEFT models only).
        merge: ``merge(adapter_dir, merged_dir)`` saves the merged model.
        base_dir: where to save the base of an adapter built from a config.
        save_base: ``save_base(adapter_dir, base_dir)`` saves the base and points the adapter at it.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        max_length: int,
        max_new_tokens: int,
        model_dir: str | None,
        on_error: str = "raise",
        merged_dir: str | None = None,
        merge: Callable[[str, str], None] | None = None,
        base_dir: str | None = None,
        save_base: Callable[[str, str], str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.model_dir = model_dir
        self.merged_dir = merged_dir
        self.merge = merge
        self.base_dir = base_dir
        self.save_base = save_base
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

    def final(self, module: ParaBlockModule, rounds_done: int, curve: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Evaluate and save the final global model; its point joins ``curve`` (unless ``None``). Returns the final metrics."""
        metrics: dict[str, Any] = {}
        if self.records:
            metrics.update(self.evaluate(module.model))
            metrics["eval_samples"] = len(self.records)
            if curve is not None:
                curve.append({"round": rounds_done, **{k: v for k, v in metrics.items() if k != "eval_samples"}})
        if self.model_dir is not None:
            module.save_pretrained(self.model_dir)
            metrics["model_dir"] = os.path.abspath(self.model_dir)
            if module.is_peft:
                metrics["model_format"] = "peft_adapter"
                if self.save_base is not None and self.base_dir is not None:
                    metrics["base_model_dir"] = self.save_base(self.model_dir, self.base_dir)
                if self.merge is not None and self.merged_dir is not None:
                    self.merge(self.model_dir, self.merged_dir)
                    metrics["merged_model_dir"] = os.path.abspath(self.merged_dir)
            else:
                metrics["model_format"] = "full"
        if curve:
            metrics["eval_curve"] = list(curve)
        return metrics


class GlobalEvaluation(Callback):
    """Evaluates the global model on client 0, every ``every`` rounds and at the end, and saves it.

    What is measured and saved is :class:`ModelEvaluation`'s. The model
    evaluated is exactly the global model after round ``t``: the strategy
    calls :meth:`on_global_model` when the module holds it (it alone knows
    when each aggregate is applied). A point due at the second-to-last round
    of a ``parablock`` run is covered by the final evaluation (both
    aggregates arrive together). The curve (``round`` = rounds aggregated,
    0 = the initial model) goes to the report's ``eval_curve``.

    At the end (``on_train_end``, after the strategy applied the last
    aggregates) the final metrics go to the report and the model is saved.

    Args:
        strategy: the client's strategy, whose report receives the metrics.
        records: evaluation records.
        tokenizer: tokenizer of the model.
        every: evaluate every this many rounds; 0: only at the end.
        **kwargs: :class:`ModelEvaluation`'s (``batch_size``, ``max_length``, ``max_new_tokens``, ``model_dir``, ...).
    """

    def __init__(
        self,
        strategy: FederatedBlockStrategy,
        records: list[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        every: int = 0,
        **kwargs: Any,
    ) -> None:
        self.strategy = strategy
        self.every = every
        self.evaluation = ModelEvaluation(records, tokenizer, **kwargs)
        self.curve: list[dict[str, Any]] = []

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.evaluation.records

    @property
    def skipped(self) -> list[str]:
        return self.evaluation.skipped

    def evaluate(self, model: PreTrainedModel) -> dict[str, Any]:
        """Loss, perplexity and (math records) exact match of ``model`` on the evaluation records."""
        return self.evaluation.evaluate(model)

    def _due(self, t: int) -> bool:
        """Whether the global model after round ``t`` (0-based) is a point of the curve before the final one."""
        return self.every > 0 and t >= 0 and (t + 1) % self.every == 0 and t < self.strategy.rounds - 1

    def wants_global_model(self, round_index: int) -> bool:
        """The strategy asks before it shows the global model after ``round_index`` (``-1``: the initial one)."""
        if round_index < 0:
            return self.every > 0 and not self.curve
        return self._due(round_index)

    def on_global_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int) -> None:
        """The module holds exactly the global model after ``round_index``: a point of the curve."""
        assert isinstance(pl_module, ParaBlockModule)
        metrics = self.evaluate(pl_module.model)
        if metrics:
            self.curve.append({"round": round_index + 1, **metrics})
            self.strategy.final_metrics["eval_curve"] = list(self.curve)
            log.info("global model after round %d: %s", round_index + 1, metrics)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ParaBlockModule)
        metrics = self.evaluation.final(pl_module, self.strategy.round, self.curve if self.every > 0 else None)
        if self.curve and "eval_curve" not in metrics:
            metrics["eval_curve"] = list(self.curve)
        self.strategy.final_metrics.update(metrics)
        log.info("global model: %s", {k: v for k, v in metrics.items() if k != "eval_curve"})
