"""The sequential reference: the algorithm core driven over every client of a recipe in one process.

No transmitter, no transport, no server process, no Lightning loop: each
client's ``K`` local steps are a plain PyTorch loop over the same data
loader, model and optimizer its real process builds, and the server's step
is :class:`~pl_parablock.core.server.RoundStep` on a
:class:`~pl_parablock.core.server.GlobalState`. Round ``t``: every client in
turn first applies the aggregates :meth:`~pl_parablock.core.client.ClientCore.awaiting`
names, then trains (or skips) the round; then the round is aggregated.

It is the oracle of the tests: a federation run (threads in one process, or
gRPC processes) of the same recipe must end with the same global model and
the same parameters on every client, bitwise. The loop mirrors Lightning's
automatic optimization (``training_step``, ``zero_grad``, ``backward``,
optional norm clipping, ``step``), so it supports ``train.precision:
32-true`` and ``train.accumulate_grad_batches: 1`` only; the aggregation
must be ``mean`` without clipping.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pl_parablock.client.runner import prepare_client
from pl_parablock.core.aggregate import rule_of
from pl_parablock.core.client import ClientCore, RoundStart, Update, activate
from pl_parablock.core.codecs import decode_broadcast, decode_update
from pl_parablock.core.server import GlobalState, RoundStep
from pl_parablock.errors import ConfigError
from pl_parablock.model.module import ParaBlockModule
from pl_parablock.model.steps import plain_steps
from pl_parablock.recipe.build import compression_of, plan_of, server_optimizer_of
from pl_parablock.recipe.schema import Recipe

__all__ = ["ReferenceResult", "plain_steps", "run_reference"]

log = logging.getLogger(__name__)


@dataclass
class ReferenceResult:
    """The end of a reference run: the server's global blocks, each client's parameters, the rounds' arrivals."""

    globals: dict[str, Tensor]
    clients: list[dict[str, Tensor]]
    rounds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Client:
    core: ClientCore
    module: ParaBlockModule
    optimizer: torch.optim.Optimizer
    batches: Iterator[Any]
    blocks: list[dict[str, nn.Parameter]]
    shard_size: int


def _check(recipe: Recipe) -> None:
    t, f = recipe.train, recipe.federation
    problems = []
    if t.precision != "32-true":
        problems.append(f"train.precision is {t.precision!r}; the reference runs 32-true only")
    if t.accumulate_grad_batches != 1:
        problems.append(f"train.accumulate_grad_batches is {t.accumulate_grad_batches}; the reference runs 1 only")
    if not rule_of(f.aggregation).everywhere or f.clip_norm is not None:
        problems.append(f"federation.aggregation is {f.aggregation!r}; the reference runs mean (with no federation.clip_norm) only")
    if problems:
        raise ConfigError(problems)


def _batches(loader: Any) -> Iterator[Any]:
    """Batches epoch after epoch, as Lightning's loop draws them (it sets the sampler's epoch first)."""
    for epoch in itertools.count():
        if callable(getattr(loader.sampler, "set_epoch", None)):
            loader.sampler.set_epoch(epoch)
        yield from loader


def _client(recipe: Recipe, client_id: int) -> _Client:
    run = prepare_client(recipe, client_id, None, evaluate=False, shard=True)
    module, strategy = run.module, run.strategy
    partition = strategy.partition_of(module)
    params = dict(module.named_parameters())
    in_blocks = set(partition.param_names)
    for name, p in params.items():
        p.requires_grad_(name in in_blocks)
    blocks = [{n: params[n] for n in b.params} for b in partition.blocks]
    optimizer = module.configure_optimizers()
    module.train()
    run.datamodule.setup("fit")
    plan = plan_of(recipe, len(partition))
    core = ClientCore(plan, client_id, blocks, compression=compression_of(recipe))
    return _Client(core, module, optimizer, _batches(run.datamodule.train_dataloader()), blocks, run.shard_size)


def _train(c: _Client, start: RoundStart, recipe: Recipe) -> Update:
    """``K`` local steps of block ``start.block``, then the round's update."""
    t = recipe.train
    activate(c.blocks, start, [c.optimizer])
    samples, tokens, loss = plain_steps(c.module, c.optimizer, c.batches, t.local_steps, t.gradient_clip_val)
    return c.core.end(samples=samples, tokens=tokens, shard=c.shard_size, weighting=recipe.federation.weighting, loss=loss)


def run_reference(recipe: Recipe) -> ReferenceResult:
    """Run ``recipe``'s federation sequentially in this process: the oracle every driver must match bitwise.

    Raises:
        ConfigError: a setting the reference does not run (see the module's docstring).
    """
    _check(recipe)
    clients = [_client(recipe, i) for i in range(recipe.federation.clients)]
    plan = clients[0].core.plan
    compression = compression_of(recipe)
    state = GlobalState(
        [{n: p.detach().to("cpu", copy=True) for n, p in blk.items()} for blk in clients[0].blocks], compression=compression
    )
    records = []
    optimizer = server_optimizer_of(recipe)
    shapes = {n: tuple(t.shape) for blk in state.values for n, t in blk.items()}

    def deliver(c: _Client) -> None:
        for r in c.core.awaiting():
            moved = {n: t for b in plan.blocks_of(r) for n, t in state.value_at(b, r, reader=c.core.client_id).items()}
            sent = [state.broadcast_at(b, r) for b in plan.blocks_of(r)]
            if compression.lossy_download and not plan.relay and all(x is not None for x in sent):
                parts = {n: t for x in sent if x is not None for n, t in x[1].items()}
                bases = {b: x[0] for b, x in zip(plan.blocks_of(r), sent) if x is not None}
                delta = decode_broadcast(compression, parts, {n: shapes[n] for n in moved})
                moved = c.core.compressed_aggregate(r, delta, bases)  # the client's own g + D, as a real client forms it
            c.core.apply(r, r, moved)
        if c.core.catching_up and (c.core.participates() or c.core.round >= plan.rounds):
            catch_up(c)  # cyclic: the blocks changed since its last turn (or, at the end, since its last)

    def catch_up(c: _Client) -> None:
        for b, v in enumerate(state.versions):
            if v > c.core.versions[b]:
                c.core.adopt(b, v, state.values[b])
        c.core.caught_up()

    for t in range(plan.rounds):
        steps = {b: RoundStep(t, b, optimizer=optimizer) for b in plan.blocks_of(t)}
        arrived = []
        for c in clients:
            deliver(c)
            if not c.core.participates():
                c.core.skip()
                continue
            update = _train(c, c.core.begin(), recipe)
            assert update.tensors is not None
            update.encode()
            tensors = update.tensors
            if update.codec != "none":
                tensors = decode_update(compression, update.codec, tensors, state.values[update.block])
            steps[update.block].add(tensors, update.weight, update.kind)
            arrived.append(c.core.client_id)
        problems = []
        for b, step in steps.items():  # a block nobody trained keeps its value
            new = step.close(state.values[b]) if step.count else state.values[b]
            problems.append(state.install(t, b, new, readers=range(len(clients))))
        records.append({"round": t, "block": plan.schedule[t], "clients": arrived, "problem": "; ".join(p for p in problems if p)})
        log.info("reference round %d: blocks %s, clients %s", t, list(steps), arrived)
    for c in clients:
        deliver(c)
        assert c.core.finished
    return ReferenceResult(
        globals={n: v for blk in state.values for n, v in blk.items()},
        clients=[{n: p.detach().clone() for n, p in c.module.named_parameters()} for c in clients],
        rounds=records,
    )
