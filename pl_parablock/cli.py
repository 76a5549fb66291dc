"""``python -m pl_parablock.cli``: one federation client through the Lightning CLI.

The server runs elsewhere (``python -m pl_parablock.fit recipe.yaml --role
server``). A client config puts the model under ``model``, the data under
``data``, and :class:`~pl_parablock.client.strategy.FederatedBlockStrategy` under
``trainer.callbacks``::

    python -m pl_parablock.cli fit --config client.yaml
    python -m pl_parablock.cli fit --config client.yaml --print_config
    python -m pl_parablock.cli fit --trainer.callbacks.help pl_parablock.FederatedBlockStrategy

The ``model`` and ``data`` keys are the recipe's ``model`` and ``data``
sections (same names, types and meaning), plus a few training settings.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader
from typing_extensions import override

from pl_parablock.client.strategy import FederatedBlockStrategy
from pl_parablock.data import ClientDataModule, client_data
from pl_parablock.errors import ConfigError, ParaBlockError
from pl_parablock.model.build import build_model
from pl_parablock.model.module import ParaBlockModule
from pl_parablock.recipe.schema import DataSection, EvalSection, ModelSection, PartitionSection, PeftSection, TrainSection
from pl_parablock.recipe.validate import data_problems, model_problems

__all__ = ["CausalLM", "FederatedData", "main"]

_QUICKSTART_MODEL = ModelSection().config


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


class CausalLM(ParaBlockModule):
    """A Hugging Face causal LM built from a config or loaded from a directory, for the CLI.

    Args:
        config: Hugging Face config of a model built from scratch (needs
            ``model_type``); ``vocab_size`` defaults to the offline tokenizer's.
            Exclusive with ``path``.
        path: local directory of a causal LM (config.json + weights); set
            ``config: null`` to use it.
        tokenizer: tokenizer directory; default: the offline byte-level
            tokenizer for ``config``, the checkpoint's own for ``path``.
        dtype: parameter dtype: float32, bfloat16 or float16.
        gradient_checkpointing: recompute activations in the backward pass.
        peft: LoRA adapters instead of the full weights (``method: lora |
            ffa_lora``, ``r``, ``alpha``, ``dropout``, ``target_modules``).
        seed: seed of the initial weights; every client of a federation must
            use the same.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Raises:
        ConfigError: an invalid model setting, naming the key.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        path: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        peft: PeftSection | None = None,
        seed: int = 0,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
    ) -> None:
        if config is None and path is None:
            config = dict(_QUICKSTART_MODEL or {})
        section = ModelSection(
            config=config,
            path=path,
            tokenizer=tokenizer,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            peft=peft or PeftSection(),
        )
        _check(model_problems(section))
        model, tok = build_model(section, seed)
        super().__init__(model, tok, lr=lr, weight_decay=weight_decay)


class FederatedData(pl.LightningDataModule):
    """One client's share of a data set, for the CLI.

    The tokenizer is the model's. The client id is the
    :class:`FederatedBlockStrategy` callback's unless ``client_id`` is given.

    Args:
        format: synthetic | alpaca | gsm8k | chat | hf.
        path: data file or directory (not used by synthetic).
        client_paths: natural partition: client i's own file.
        partition: how the data is split among clients (``kind``: iid |
            dirichlet | natural; ``alpha``; ``label``).
        num_samples: records the synthetic generator makes.
        on_error: raise (stop at a bad record) | skip (drop and count it).
        columns: rename fields, e.g. ``{question: problem}``.
        split: hf: the split to train on.
        row_format: hf: how rows read (auto | alpaca | gsm8k | chat).
        clients: number of clients the data is split among.
        client_id: this client's share; default: the strategy callback's id.
        batch_size: sequences per batch.
        max_length: tokens per sequence.
        packing: pack whole examples into rows of ``max_length`` tokens.
        seed: seed of the partition and of the shuffling order.

    Raises:
        ConfigError: an invalid data setting, naming the key.
    """

    def __init__(
        self,
        format: str = "synthetic",
        path: str | None = None,
        client_paths: list[str] | None = None,
        partition: PartitionSection | None = None,
        num_samples: int = 2000,
        on_error: str = "raise",
        columns: dict[str, str] | None = None,
        split: str = "train",
        row_format: str = "auto",
        clients: int = 1,
        client_id: int | None = None,
        batch_size: int = 8,
        max_length: int = 128,
        packing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        section = DataSection(
            format=format,
            path=path,
            client_paths=client_paths,
            partition=partition or PartitionSection(),
            num_samples=num_samples,
            on_error=on_error,
            columns=columns,
            split=split,
            row_format=row_format,
        )
        _check(data_problems(section, clients=clients))
        self.data, self.clients, self.seed = section, clients, seed
        self.train = TrainSection(batch_size=batch_size, max_length=max_length, packing=packing)
        self.client_id = client_id
        self._module: ClientDataModule | None = None

    @override
    def setup(self, stage: str) -> None:
        if self._module is not None:
            return
        trainer = self.trainer
        if trainer is None or not isinstance(trainer.lightning_module, ParaBlockModule) or trainer.lightning_module.tokenizer is None:
            raise ParaBlockError("FederatedData needs a model with a tokenizer (pl_parablock.cli.CausalLM)")
        client_id = self.client_id
        if client_id is None:
            strategies = [cb for cb in trainer.callbacks if isinstance(cb, FederatedBlockStrategy)]  # type: ignore[attr-defined]
            client_id = strategies[0].client_id if strategies else 0
        if not 0 <= client_id < self.clients:
            raise ParaBlockError(f"client {client_id} has no share: data.clients is {self.clients}")
        data = client_data(self.data, client_id, clients=self.clients, seed=self.seed, evaluation=EvalSection(), evaluate=False)
        t = self.train
        self._module = ClientDataModule(
            data.train,
            None,
            trainer.lightning_module.tokenizer,
            batch_size=t.batch_size,
            max_length=t.max_length,
            seed=self.seed,
            packing=t.packing,
            on_error=self.data.on_error,
            name=f"client {client_id}",
        )
        self._module.setup(stage)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        assert self._module is not None
        return self._module.train_dataloader()


class ParaBlockCLI(LightningCLI):
    """LightningCLI whose trainer defaults suit a federation client."""

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.max_epochs": -1, "trainer.num_sanity_val_steps": 0, "trainer.limit_val_batches": 0})


def main(args: Sequence[str] | None = None) -> int:
    """Run the CLI; a :class:`ParaBlockError` prints one message and returns 2."""
    try:
        ParaBlockCLI(CausalLM, FederatedData, args=list(args) if args is not None else None, save_config_kwargs={"overwrite": True})
    except ParaBlockError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


# the CLI's model and data arguments are the recipe's sections: the test suite checks they stay in step
CLI_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelSection)}
CLI_DATA_FIELDS = {f.name for f in dataclasses.fields(DataSection)}

if __name__ == "__main__":
    sys.exit(main())
