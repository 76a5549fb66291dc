"""FederatedBlockStrategy: federated block coordinate descent as a Lightning callback.

The callback translates Trainer hooks into calls on two objects and owns
nothing else: the algorithm's :class:`~pl_parablock.core.client.ClientCore`
(which block trains, when each aggregate is applied, the rebase, what is
sent with which weight) and the network's
:class:`~pl_parablock.client.session.ClientSession` (join, retry, resync,
transmitter thread). Without a server the same callback runs centralized
block coordinate descent (the BAdam way): every round's update is its own
aggregate.

Other callbacks may follow the global model: one with a method
``on_global_model(trainer, pl_module, round_index)`` is called whenever the
module holds exactly the global model after round ``round_index`` (``-1``:
the initial model), and, if it also has ``wants_global_model(round_index)``,
only for the rounds it wants. One with ``on_round_boundary(trainer,
pl_module, round_index)`` is called between rounds, when round
``round_index`` is about to train (checkpoints).
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pl_parablock.client.ledger import argument_problems, cover_optimizers
from pl_parablock.client.rounds import ClientRounds
from pl_parablock.client.session import ClientSession, model_fingerprint
from pl_parablock.client.transport import Transport
from pl_parablock.core.blocks import Partition, freeze_to_blocks, partition_model, whole_model_partition
from pl_parablock.core.client import ClientCore
from pl_parablock.core.codecs import NO_COMPRESSION, WIRE_DTYPE_CODECS, CodecError, Compression, make_codec
from pl_parablock.core.plan import make_plan, mode_of
from pl_parablock.core.tensors import digest
from pl_parablock.errors import ParaBlockError
from pl_parablock.wire.link import Link

if TYPE_CHECKING:
    from pl_parablock.wire.channel import TLS

__all__ = ["FederatedBlockStrategy"]

log = logging.getLogger(__name__)


class FederatedBlockStrategy(Callback):
    r"""Federated block coordinate descent with the ParaBlock schedule.

    Add it to any ``Trainer`` whose LightningModule holds the model; blocks
    are detected from the module's largest ``nn.ModuleList`` or given as name
    patterns. Rounds count optimizer steps (``trainer.global_step``), so with
    gradient accumulation a round is ``local_steps * accumulate_grad_batches``
    batches. The algorithm is :mod:`pl_parablock.core`'s.

    Args:
        server: ``"HOST:PORT"`` of a federation server, a
            :class:`~pl_parablock.client.transport.Transport`, or ``None``
            for centralized block coordinate descent on this machine.
        client_id: this client's id, ``0 <= client_id < clients``.
        local_steps: optimizer steps per round (``K``), >= 1.
        mode: ``parablock`` (overlap communication with the next round),
            ``sync`` (wait every round) or ``fedavg`` (one block of every
            trainable parameter, wait every round).
        blocks: one regular expression per block, matched in full against
            parameter names of the LightningModule; ``None`` detects layers.
        layers_per_block: consecutive layers per block when detecting layers.
        embeddings: make the input embeddings a block of their own.
        head: make the output head a block of its own.
        rounds: number of rounds without a server (the server decides otherwise).
        schedule: block order without a server: ``ascending``, ``descending``,
            ``random`` or a list of block indices.
        seed: seed of a random schedule without a server.
        keep_optimizer_state: keep each block's optimizer state across its
            rounds (default: a block's state is created fresh at the start of
            every round it trains in, and dropped when it stops training).
        weighting: this client's weight in the aggregate: ``samples`` or
            ``tokens`` seen in the round, its ``shard`` size, or ``uniform``.
        shard_size: this client's number of training records (``shard`` weighting).
        timeout_s: longest single network wait, seconds.
        link: emulated link for a ``"HOST:PORT"`` server.
        wire_dtype: dtype uploads travel in (``"bfloat16"``, ``"float16"``);
            ``None``: their own. A shorthand for a ``compression`` of that
            cast on uploads only, without error feedback.
        compression: how updates and aggregates travel: a
            :class:`~pl_parablock.core.codecs.Compression`, or a codec name of
            :data:`~pl_parablock.core.codecs.CODECS` (both ways, with error
            feedback). It must be the server's (``federation.compression``).
        chunk_kb: chunk size of streamed blocks, KiB.
        token: the federation's (or this client's) token for a ``"HOST:PORT"``
            server; ``None`` reads ``PL_PARABLOCK_TOKEN`` from the
            environment. An explicit token wins over the environment.
        tls: CA certificate (and optional client certificate) of a TLS server.

    Raises:
        ParaBlockError: on an invalid argument (shown with the allowed range).

    Example::

        >>> import lightning.pytorch as pl
        >>> strategy = FederatedBlockStrategy(None, local_steps=2, rounds=4)
        >>> trainer = pl.Trainer(callbacks=[strategy], max_steps=8, logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        server: str | Transport | None = None,
        client_id: int = 0,
        *,
        local_steps: int = 5,
        mode: str = "parablock",
        blocks: Sequence[str] | None = None,
        layers_per_block: int = 1,
        embeddings: bool = False,
        head: bool = False,
        rounds: int | None = None,
        schedule: str | Sequence[int] = "ascending",
        seed: int = 0,
        keep_optimizer_state: bool = False,
        weighting: str = "samples",
        shard_size: int | None = None,
        timeout_s: float = 600.0,
        link: Link | None = None,
        wire_dtype: str | None = None,
        compression: Compression | str | None = None,
        chunk_kb: int = 1024,
        token: str | None = None,
        tls: TLS | None = None,
    ) -> None:
        problems = argument_problems(
            server, client_id, local_steps=local_steps, mode=mode, blocks=blocks, layers_per_block=layers_per_block, rounds=rounds,
            weighting=weighting, shard_size=shard_size, timeout_s=timeout_s, wire_dtype=wire_dtype, chunk_kb=chunk_kb,
        )  # fmt: skip
        if problems:
            raise ParaBlockError("FederatedBlockStrategy: " + "; ".join(problems))
        self.compression = _compression(compression, wire_dtype)
        self.server = server
        self.client_id = client_id
        self.local_steps = local_steps
        self.mode = mode
        self.block_patterns = list(blocks) if blocks is not None else None
        self.layers_per_block = layers_per_block
        self.embeddings = embeddings
        self.head = head
        self.rounds = rounds or 0
        self.schedule_kind: str | list[int] = schedule if isinstance(schedule, str) else list(schedule)
        self.seed = seed
        self.keep_optimizer_state = keep_optimizer_state
        self.weighting = weighting
        self.shard_size = shard_size or 0
        self.session_options: dict[str, Any] = dict(timeout_s=timeout_s, link=link, chunk_kb=chunk_kb, token=token, tls=tls)

        self.partition: Partition | None = None
        self.client: ClientRounds | None = None
        self.final_metrics: dict[str, Any] = {}
        self._block_params: list[dict[str, nn.Parameter]] = []
        self._fingerprint: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self._dist: Any = None
        self._leader = True

    # ------------------------------------------------------------ properties

    @property
    def federated(self) -> bool:
        return self.server is not None

    @property
    def core(self) -> ClientCore | None:
        """The algorithm's state of this client (see :class:`~pl_parablock.core.client.ClientCore`)."""
        return self.client.core if self.client is not None else None

    @property
    def session(self) -> ClientSession | None:
        return self.client.session if self.client is not None else None

    @property
    def round(self) -> int:
        """Rounds ended (while a round trains: its index)."""
        return self.core.round if self.core is not None else 0

    @property
    def schedule(self) -> list[int]:
        return list(self.core.plan.schedule) if self.core is not None else []

    @property
    def records(self) -> list[dict[str, Any]]:
        """Per-round records: timings, bytes, loss, weight, kind, version."""
        return self.client.ledger.records if self.client is not None else []

    @property
    def events(self) -> list[dict[str, Any]]:
        """Joins, resyncs and restores, with their rounds."""
        return self.client.ledger.events if self.client is not None else []

    @property
    def round_start_step(self) -> int:
        """``trainer.global_step`` when the current round began."""
        return self.client.round_start_step if self.client is not None else 0

    @property
    def active_block(self) -> int | None:
        """Index of the block being trained, if a round is open."""
        return self.core.active_block if self.core is not None else None

    @property
    def is_leader(self) -> bool:
        """Whether this process talks to the server (global rank 0)."""
        return self._leader

    # ----------------------------------------------------------------- setup

    def partition_of(self, module: nn.Module) -> Partition:
        """The blocks this strategy trains in ``module`` (every trainable parameter as one block for ``fedavg``)."""
        if mode_of(self.mode).whole_model:
            return whole_model_partition(module)
        return partition_model(
            module, layers_per_block=self.layers_per_block, embeddings=self.embeddings, head=self.head, patterns=self.block_patterns
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._leader = trainer.is_global_zero
        if trainer.world_size > 1:
            self._dist = trainer.strategy
            if isinstance(trainer.strategy, DDPStrategy) and not trainer.strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise ParaBlockError(
                    "a multi-device client trains one block at a time, so DDP must allow parameters without gradients: "
                    "use Trainer(strategy='ddp_find_unused_parameters_true') or DDPStrategy(find_unused_parameters=True)"
                )
        self.partition = self.partition_of(pl_module)
        self._block_params[:] = freeze_to_blocks(pl_module, self.partition)
        self.final_metrics["trainable_params"] = sum(p.numel() for blk in self._block_params for p in blk.values())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.partition is not None
        cover_optimizers(trainer.optimizers, self._block_params)
        options = self.session_options
        session = None
        if self.server is not None:
            session = ClientSession(self.server, self.client_id, dist=self._dist, leader=self._leader, compression=self.compression,
                                    delta_downloads=mode_of(self.mode).delta_downloads, **options)  # fmt: skip
        self.client = ClientRounds(
            self.client_id, self.mode, self._block_params, session=session, weighting=self.weighting, shard_size=self.shard_size,
            keep_optimizer_state=self.keep_optimizer_state, compression=self.compression, dist=self._dist,
        )  # fmt: skip
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("partition") not in (None, self.partition.to_dict()):
            raise ParaBlockError("the checkpoint's block partition differs from this model's; resume with the same blocks settings")
        if session is None:
            schedule = restored["schedule"] if restored else self.schedule_kind
            plan = make_plan(self.mode, num_blocks=len(self.partition), rounds=self.rounds, schedule=schedule, seed=self.seed,
                             keep_optimizer_state=self.keep_optimizer_state)  # fmt: skip
            self.client.use_plan(plan)
            if restored is not None:
                self.client.restore(restored, federated=False)
            return
        self._fingerprint = (restored or {}).get("fingerprint") or model_fingerprint(pl_module, self.partition, self.mode)
        self.client.join(self._fingerprint, restored)
        assert self.core is not None
        self.rounds = self.core.plan.rounds
        remaining = (self.rounds - self.round) * self.local_steps
        if trainer.max_steps not in (None, -1) and trainer.global_step + remaining > trainer.max_steps:
            raise ParaBlockError(
                f"Trainer(max_steps={trainer.max_steps}) stops before the federation's {self.rounds} rounds of "
                f"{self.local_steps} steps end; set max_steps={self.rounds * self.local_steps} or -1"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.client is not None and self.core is not None
        if self.core.round == 0 and self.core.next_apply == 0:
            self.client.view.show(trainer, pl_module, self.core, -1)
        if self.active_block is None and not self.client.done:
            self.client.advance(trainer, pl_module, self._fingerprint, end=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Tensor | Mapping[str, Any] | None, batch: Any, batch_idx: int
    ) -> None:
        if self.client is None or self.active_block is None:
            return
        self.client.counter.add(batch, outputs)
        if trainer.global_step - self.client.round_start_step >= self.local_steps:
            self.client.advance(trainer, pl_module, self._fingerprint, end=True)

    # ------------------------------------------------------------------- end

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = self.client is not None and self.client.done
        if done:  # what this client holds at the end, to compare with the server's global and other drivers
            self.final_metrics["blocks_sha256"] = digest({n: p for blk in self._block_params for n, p in blk.items()})
        self.final_metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        if not done and not self.federated:
            rank_zero_warn(f"training stopped after {self.round} of {self.rounds} rounds; resume from a checkpoint to finish them")
        elif not done:
            raise ParaBlockError(
                f"client {self.client_id}: training stopped after {self.round} of {self.rounds} rounds; "
                f"let the Trainer run {self.rounds * self.local_steps} optimizer steps (max_steps=-1 or larger, "
                "max_epochs=-1 or enough epochs)"
            )

    def report(self) -> dict[str, Any]:
        """This client's per-round records, events and final metrics (plain data)."""
        return {
            "client_id": self.client_id,
            "mode": self.mode,
            "rounds": [dict(r) for r in self.records],
            "events": [dict(e) for e in self.events],
            "final": dict(self.final_metrics),
        }

    def leave(self) -> None:
        """Tell the server this client is done, with its report; idempotent."""
        if self.session is not None:
            self.session.leave(self.report())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.session is None:
            return
        done = self.client is not None and self.client.done
        try:
            if done:
                self.leave()
        finally:
            self.session.close(cancel_pending=not done)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(cancel_pending=True)

    # ----------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.client.state_dict() if self.client is not None else {}
        return {**state, "partition": self.partition.to_dict() if self.partition else None, "fingerprint": self._fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)


def _compression(compression: Compression | str | None, wire_dtype: str | None) -> Compression:
    """The strategy's ``compression`` argument (or its ``wire_dtype`` shorthand) as a :class:`Compression`."""
    if compression is not None and wire_dtype not in (None, "float32"):
        raise ParaBlockError("FederatedBlockStrategy: give compression= or wire_dtype=, not both")
    if isinstance(compression, Compression):
        return compression
    try:
        if isinstance(compression, str):
            return Compression(make_codec(compression), make_codec(compression))
        if compression is not None:
            raise ParaBlockError(f"FederatedBlockStrategy: compression={compression!r} must be a Compression, a codec name or None")
        if wire_dtype is not None:
            return Compression(make_codec(WIRE_DTYPE_CODECS[wire_dtype]), make_codec("none"), error_feedback=False)
    except CodecError as exc:
        raise ParaBlockError(f"FederatedBlockStrategy: {exc}") from None
    return NO_COMPRESSION
