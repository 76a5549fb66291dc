"""ParaBlockModule: a LightningModule around a Hugging Face causal LM."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from pl_parablock.model.metrics import TokenLoss

__all__ = ["ParaBlockModule"]


class ParaBlockModule(pl.LightningModule):
    """Fine-tunes a causal LM on batches of ``input_ids``/``attention_mask``/``labels`` (packed rows: ``position_ids``).

    The loss is the model's next-token cross-entropy over tokens whose label
    is not ``-100`` (the response; prompt and padding are masked). The
    optimizer is AdamW over the parameters that require grad when it is
    built, so a :class:`~pl_parablock.client.strategy.FederatedBlockStrategy` that
    froze the parameters in no block in ``setup`` keeps them out of it.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (saved next to the model by :meth:`save_pretrained`).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.

    Example::

        >>> from pl_parablock.recipe.schema import ModelSection
        >>> from pl_parablock.model.build import build_model
        >>> model, tok = build_model(ModelSection(config={"model_type": "llama", "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}))
        >>> module = ParaBlockModule(model, tok, lr=1e-3)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.val_loss = TokenLoss()

    @override
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Any:
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids")).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss  # type: ignore[no-any-return]

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        self.val_loss.update(out.logits, batch["labels"])

    @override
    def on_validation_epoch_end(self) -> None:
        if int(self.val_loss.count) > 0:
            self.log("eval_loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    @property
    def is_peft(self) -> bool:
        """Whether the model is a ``peft`` model (LoRA adapters on a frozen base)."""
        return isinstance(self.model, PeftModel)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Save the model and its tokenizer with ``save_pretrained``.

        A ``peft`` model saves its adapters only (``adapter_config.json`` and
        ``adapter_model.safetensors``), which load with
        ``PeftModel.from_pretrained(base, directory)``; any other model saves
        its full weights, which load with ``AutoModelForCausalLM.from_pretrained``.
        """
        config = getattr(self.model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if config is not None:
            config.use_cache = True  # training turns the cache off; generation wants it
        try:
            self.model.save_pretrained(directory)
        finally:
            if config is not None:
                config.use_cache = use_cache
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
