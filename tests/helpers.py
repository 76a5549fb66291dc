"""Small builders the tests share: tiny models, synthetic shards, one-client trainers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from pl_parablock import FederatedBlockStrategy, ParaBlockModule
from pl_parablock.client.inprocess import InProcessTransport
from pl_parablock.data import ClientDataModule, synthetic_records
from pl_parablock.model.build import build_model
from pl_parablock.recipe.schema import ModelSection
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.service import Caller, FederationService
from pl_parablock.wire.link import Link

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_module(seed: int = 0, config: dict[str, Any] | None = None, lr: float = 3e-3) -> ParaBlockModule:
    model, tok = build_model(ModelSection(config=dict(config or TINY_LLAMA)), seed)
    return ParaBlockModule(model, tok, lr=lr)


def tiny_data(module: ParaBlockModule, n: int = 48, seed: int = 0, batch_size: int = 4) -> ClientDataModule:
    assert module.tokenizer is not None
    return ClientDataModule(synthetic_records(n, seed), None, module.tokenizer, batch_size=batch_size, max_length=96, seed=seed)


def tiny_trainer(strategy: FederatedBlockStrategy, **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    opts.update(kwargs)
    callbacks = [strategy, *opts.pop("callbacks", [])]
    return pl.Trainer(callbacks=callbacks, **opts)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def service(clients: int, rounds: int, mode: str = "parablock", **kwargs: Any) -> FederationService:
    return FederationService(Aggregator(clients=clients, rounds=rounds, mode=mode, **kwargs))


def run_clients(jobs: list[tuple[pl.Trainer, ParaBlockModule, ClientDataModule]], timeout: float = 120.0) -> None:
    """Fit several trainers at once, one thread each; re-raise the first failure."""
    errors: list[BaseException] = []

    def fit(trainer: pl.Trainer, module: ParaBlockModule, data: ClientDataModule) -> None:
        try:
            trainer.fit(module, datamodule=data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fit, args=job, name="test-client") for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a client thread did not finish in time"
    if errors:
        raise errors[0]


def federated_client(
    svc: FederationService, client_id: int, mode: str, *, local_steps: int, seed: int = 0, link: Link | None = None, **kw: Any
) -> tuple[pl.Trainer, ParaBlockModule, ClientDataModule, FederatedBlockStrategy]:
    module = tiny_module(seed)
    data = tiny_data(module, seed=seed)
    strategy = FederatedBlockStrategy(InProcessTransport(svc, link=link), client_id, local_steps=local_steps, mode=mode, **kw)  # type: ignore[arg-type]
    return tiny_trainer(strategy), module, data, strategy


# ---------------------------------------------------------------------------
# a tiny recipe: what the launcher, the reference and the process federation all build from

TINY_RECIPE = """
seed: 0
model:
  config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4,
           num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}
train: {local_steps: 2, lr: 3.0e-3, batch_size: 4, max_length: 64, threads: 1}
federation: {clients: 3, rounds: 8, timeout_s: 60}
data: {num_samples: 96}
eval: {max_samples: 4, max_new_tokens: 2}
"""


def tiny_recipe(tmp_path: Any, *overrides: str, output: str = "run") -> Any:
    """The tiny recipe with dotlist ``overrides``, written to ``tmp_path/recipe.yaml``, output under ``tmp_path/output``."""
    from pl_parablock.recipe.load import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE)
    return load_recipe(str(path), [*overrides, f"output_dir={tmp_path / output}"])


# ---------------------------------------------------------------------------
# fixture files for the data loaders and the shipped recipes

ALPACA_ROWS = [
    {"instruction": "Write the word backwards.", "input": "river", "output": "revir", "source": "words"},
    {"instruction": "Write the word in capital letters.", "input": "stone", "output": "STONE", "source": "words"},
    {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3", "source": "numbers"},
    {"instruction": "Say hello.", "input": "", "output": "hello", "source": "chat"},
]


def gsm8k_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` GSM8K-style rows (question, worked answer ending in ``#### N``), from the synthetic generator."""
    out = []
    for r in synthetic_records(4 * n, seed):
        if r["answer"] is not None:
            question = r["prompt"].split("\n")[1]
            out.append({"question": question, "answer": r["response"]})
        if len(out) == n:
            break
    return out


def write_jsonl(path: Any, rows: list[Any]) -> str:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def save_tiny_checkpoint(directory: Any, config: dict[str, Any] | None = None, seed: int = 0) -> str:
    """A tiny causal LM and its (offline) tokenizer saved with save_pretrained: a local checkpoint."""
    model, tok = build_model(ModelSection(config=dict(config or TINY_LLAMA)), seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll ``cond`` every 20 ms until it holds (``True``) or ``timeout`` seconds pass (``False``)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class CountingService(FederationService):
    """The real service; counts the bytes its ``Pull`` has produced (what the server holds for a stalled reader)."""

    produced = 0

    def Pull(self, request: bytes, token: str | None = None, caller: Caller | None = None) -> Iterator[bytes]:
        for message in super().Pull(request, token=token, caller=caller):
            CountingService.produced += len(message)
            yield message
