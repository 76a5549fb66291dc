"""FederatedBlockStrategy: federated block coordinate descent as a Lightning callback.

The callback translates Trainer hooks into calls on two objects and owns
nothing else: the algorithm's :class:`~pl_parablock.algorithm.ClientCore`
(which block trains, when each aggregate is applied, the rebase, what is
sent with which weight) and the network's
:class:`~pl_parablock.session.ClientSession` (join, retry, resync,
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
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from typing_extensions import override

from pl_parablock.algorithm import MODES, WEIGHTINGS, ClientCore, Plan, activate, digest, make_plan
from pl_parablock.blocks import Partition, partition_model, whole_model_partition
from pl_parablock.errors import ParaBlockError, ResyncNeeded, TransmitterError
from pl_parablock.federation.link import Link
from pl_parablock.federation.transport import Transport
from pl_parablock.federation.wire import WIRE_DTYPES
from pl_parablock.session import ClientSession, model_fingerprint

if TYPE_CHECKING:
    from pl_parablock.federation.channel import TLS

__all__ = ["FederatedBlockStrategy"]

log = logging.getLogger(__name__)


class FederatedBlockStrategy(Callback):
    r"""Federated block coordinate descent with the ParaBlock schedule.

    Add it to any ``Trainer`` whose LightningModule holds the model; blocks
    are detected from the module's largest ``nn.ModuleList`` or given as name
    patterns. Rounds count optimizer steps (``trainer.global_step``), so with
    gradient accumulation a round is ``local_steps * accumulate_grad_batches``
    batches. The algorithm is :mod:`pl_parablock.algorithm`'s.

    Args:
        server: ``"HOST:PORT"`` of a federation server, a
            :class:`~pl_parablock.federation.transport.Transport`, or ``None``
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
            ``None``: their own. Downloads always carry the exact global.
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
        chunk_kb: int = 1024,
        token: str | None = None,
        tls: TLS | None = None,
    ) -> None:
        problems = []
        if not (isinstance(local_steps, int) and local_steps >= 1):
            problems.append(f"local_steps={local_steps!r} must be an integer >= 1")
        if mode not in MODES:
            problems.append(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if not (isinstance(layers_per_block, int) and layers_per_block >= 1):
            problems.append(f"layers_per_block={layers_per_block!r} must be an integer >= 1")
        if client_id < 0:
            problems.append(f"client_id={client_id!r} must be >= 0")
        if server is None and (rounds is None or rounds < 1):
            problems.append(f"rounds={rounds!r}: without a server, give the number of rounds (>= 1)")
        if server is not None and not isinstance(server, (str, Transport)):
            problems.append(f"server={server!r} must be 'HOST:PORT', a Transport or None")
        if weighting not in WEIGHTINGS:
            problems.append(f"weighting={weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if weighting == "shard" and not (isinstance(shard_size, int) and shard_size >= 1):
            problems.append(f"weighting='shard' needs shard_size (this client's number of training records), not {shard_size!r}")
        if not timeout_s > 0:
            problems.append(f"timeout_s={timeout_s!r} must be > 0")
        if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
            problems.append(f"wire_dtype={wire_dtype!r} must be one of {', '.join(WIRE_DTYPES)} or None")
        if chunk_kb < 1:
            problems.append(f"chunk_kb={chunk_kb!r} must be >= 1")
        if blocks is not None and not list(blocks):
            problems.append("blocks=[] is empty: give one regular expression per block, or None to detect layers")
        if problems:
            raise ParaBlockError("FederatedBlockStrategy: " + "; ".join(problems))
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
        self.timeout_s = timeout_s
        self.link = link
        self.wire_dtype = wire_dtype
        self.chunk_kb = chunk_kb
        self.token = token
        self.tls = tls

        self.partition: Partition | None = None
        self.core: ClientCore | None = None
        self.session: ClientSession | None = None
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.final_metrics: dict[str, Any] = {}
        self._block_params: list[dict[str, nn.Parameter]] = []
        self._round_start_step = 0
        self._round_t0 = 0.0
        self._samples = 0
        self._tokens: Tensor | int = 0
        self._losses: list[Tensor] = []
        self._fingerprint: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self._snapshot: tuple[int, dict[str, Tensor]] | None = None  # (round, block values at its start): the global model hook
        self._dist: Any = None
        self._leader = True
        self._warned_tokens = False
        self._warned_view = False
        self._done = False

    # ------------------------------------------------------------ properties

    @property
    def federated(self) -> bool:
        return self.server is not None

    @property
    def round(self) -> int:
        """Rounds ended (while a round trains: its index)."""
        return self.core.round if self.core is not None else 0

    @property
    def schedule(self) -> list[int]:
        return list(self.core.plan.schedule) if self.core is not None else []

    @property
    def round_start_step(self) -> int:
        """``trainer.global_step`` when the current round began."""
        return self._round_start_step

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
        if self.mode == "fedavg":
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
        params = dict(pl_module.named_parameters())
        in_blocks = set(self.partition.param_names)
        for name, p in params.items():
            p.requires_grad_(name in in_blocks)
        self._block_params = [{n: params[n] for n in b.params} for b in self.partition.blocks]
        log.info(
            "client %d: %d blocks over %d parameters (%d frozen, never sent): %s",
            self.client_id,
            len(self.partition),
            sum(params[n].numel() for n in in_blocks),
            sum(p.numel() for n, p in params.items() if n not in in_blocks),
            ", ".join(b.name for b in self.partition.blocks),
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.partition is not None
        self._cover_optimizers(trainer)
        if self.federated:
            assert self.server is not None
            self.session = ClientSession(
                self.server,
                self.client_id,
                timeout_s=self.timeout_s,
                link=self.link,
                wire_dtype=self.wire_dtype,
                chunk_kb=self.chunk_kb,
                token=self.token,
                tls=self.tls,
                dist=self._dist,
                leader=self._leader,
            )
            if self._restored is not None:
                self._fingerprint = self._restored.get("fingerprint")
            if self._fingerprint is None:
                self._fingerprint = model_fingerprint(pl_module, self.partition, self.mode)
            self._join(restored=self._restored)
            max_steps = trainer.max_steps
            remaining = (self.rounds - self.round) * self.local_steps
            if max_steps not in (None, -1) and trainer.global_step + remaining > max_steps:
                raise ParaBlockError(
                    f"Trainer(max_steps={max_steps}) stops before the federation's {self.rounds} rounds of "
                    f"{self.local_steps} steps end; set max_steps={self.rounds * self.local_steps} or -1"
                )
        else:
            schedule = self._restored["schedule"] if self._restored else self.schedule_kind
            plan = make_plan(
                self.mode,
                num_blocks=len(self.partition),
                rounds=self.rounds,
                schedule=schedule,
                seed=self.seed,
                keep_optimizer_state=self.keep_optimizer_state,
            )
            self._new_core(plan)
            if self._restored is not None:
                self._restore(self._restored)
        self._restored = None

    def _cover_optimizers(self, trainer: pl.Trainer) -> None:
        if not trainer.optimizers:
            raise ParaBlockError("FederatedBlockStrategy needs an optimizer: return one from configure_optimizers()")
        known = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [p for params in self._block_params for p in params.values() if id(p) not in known]
        if missing:
            opt = trainer.optimizers[0]
            template = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            opt.add_param_group({**template, "params": missing})
            rank_zero_warn(
                f"FederatedBlockStrategy added {len(missing)} block parameters the optimizer did not hold, with the "
                "settings of its first param group. Build the optimizer over the parameters that require grad after "
                "setup (e.g. `AdamW(p for p in self.parameters() if p.requires_grad)`) to choose them yourself."
            )

    def _new_core(self, plan: Plan) -> None:
        self.core = ClientCore(plan, self.client_id, self._block_params, exact_uploads=self.wire_dtype is None)
        self.rounds = plan.rounds

    # -------------------------------------------------------------- joining

    def _join(self, restored: Mapping[str, Any] | None = None) -> None:
        """Join (or rejoin) and adopt the server's state: its plan, every block whose version differs, its next round.

        A client joining late, restarting from a crash, or facing a server
        restarted from an older checkpoint ends up holding exactly the
        server's global blocks and continues at the first round not yet
        aggregated; its hand-offs in flight are dropped (the server either
        has them or rolled them back).
        """
        assert self.session is not None and self._fingerprint is not None and self.partition is not None
        params = {n: p for blk in self._block_params for n, p in blk.items()}
        reply = self.session.join(self._fingerprint, lambda: {n: p.detach().to("cpu", copy=True) for n, p in params.items()})
        if reply.get("mode") not in (None, self.mode):
            raise ParaBlockError(f"client {self.client_id} runs mode={self.mode} but the server runs mode={reply['mode']}")
        participants = reply.get("participants")
        plan = Plan(
            self.mode,
            tuple(int(b) for b in reply["schedule"]),
            len(self.partition),
            tuple(tuple(int(c) for c in p) for p in participants) if participants else None,
            self.keep_optimizer_state,
        )
        old = self.core
        self._new_core(plan)
        assert self.core is not None
        if restored is not None:
            self._restore(restored)
        elif old is not None:
            self.core.versions = list(old.versions)
            self.core.mark_unverified()
        fetched = []
        for b, v in enumerate(int(v) for v in reply.get("versions", [])):
            if v != self.core.versions[b] or not self.core.clean[b]:
                pulled = self.session.fetch(b)
                self.core.adopt(b, pulled.version, pulled.tensors)
                fetched.append(b)
        next_round = int(reply.get("next_round", 0))
        if fetched or next_round != self.core.round:
            self.events.append(
                {"event": "synced", "at": time.time(), "from_round": self.core.round, "to_round": next_round, "fetched_blocks": fetched}
            )
        self.core.restart_at(next_round)
        self._snapshot = None
        self._done = False
        self.session.start_transmitter()
        log.info("client %d joined via %s: %d rounds from round %d", self.client_id, self.session.describe(), self.rounds, next_round)

    # ---------------------------------------------------------------- rounds

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core is not None and self.core.round == 0 and self.core.next_apply == 0:
            self._notify_global(trainer, pl_module, -1)
        if self.active_block is None and not self._done:
            self._advance(trainer, pl_module, end=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Tensor | Mapping[str, Any] | None, batch: Any, batch_idx: int
    ) -> None:
        if self.active_block is None:
            return
        self._count(batch, outputs)
        if trainer.global_step - self._round_start_step >= self.local_steps:
            self._advance(trainer, pl_module, end=True)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, end: bool) -> None:
        """End the open round (if ``end``), apply the aggregates due, then begin the next round or finish.

        A server restart (or a superseded version) noticed on the way makes the
        client rejoin and continue from the server's next round.
        """
        assert self.core is not None
        for _ in range(100):
            try:
                if end:
                    end = False
                    self._end_round(trainer, pl_module)
                while self.active_block is None and not self._done:
                    for r in self.core.awaiting():
                        self._apply(trainer, pl_module, r)
                    if self.core.round >= self.core.plan.rounds:
                        self._finish()
                    elif self.federated and not self.core.participates():
                        update = self.core.skip()
                        self.records.append(
                            {"round": update.round, "block": update.block, "participated": False, "started_at": time.time()}
                        )
                        assert self.session is not None
                        self.session.send(update)
                    else:
                        self._begin_round(trainer, pl_module)
                break
            except (TransmitterError, ResyncNeeded) as exc:
                if isinstance(exc, TransmitterError) and not isinstance(exc.__cause__, ResyncNeeded):
                    raise
                log.warning("client %d: %s; rejoining and adopting the server's state", self.client_id, exc)
                self._join()
        if self._done:
            trainer.should_stop = True

    def _begin_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.core is not None
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            hook = getattr(cb, "on_round_boundary", None)
            if hook is not None:
                hook(trainer, pl_module, self.core.round)
        start = self.core.begin()
        activate(self._block_params, start, trainer.optimizers)
        if self.federated and self.core.plan.staleness and self._wants_global(trainer, start.round - 1):
            self._snapshot = (start.round - 1, {n: p.detach().clone() for n, p in self._block_params[start.block].items()})
        self._round_start_step = trainer.global_step
        self._samples, self._tokens, self._losses = 0, 0, []
        self.records.append({"round": start.round, "block": start.block, "started_at": time.time()})
        self._round_t0 = time.perf_counter()

    def _end_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.core is not None
        compute_s = time.perf_counter() - self._round_t0
        loss = float(torch.stack(self._losses).float().mean()) if self._losses else None
        tokens = int(self._tokens)
        if self._dist is not None:  # one client: its samples and tokens over every rank, its loss averaged
            counts = self._dist.reduce(torch.tensor([float(self._samples), float(tokens)]), reduce_op="sum")
            self._samples, tokens = int(counts[0]), int(counts[1])
            if loss is not None:
                loss = float(self._dist.reduce(torch.tensor(loss), reduce_op="mean"))
        update = self.core.end(samples=self._samples, tokens=tokens, shard=self.shard_size, weighting=self.weighting, loss=loss)
        rec = self.records[-1]
        rec.update(compute_s=compute_s, ended_at=time.time(), loss=loss, samples=self._samples, weight=update.weight)
        log.info(
            "client %d round %d/%d block %d: loss %s, compute %.2f s",
            *(self.client_id, update.round + 1, self.rounds, update.block),
            f"{loss:.4f}" if loss is not None else "n/a",
            compute_s,
        )
        if self.session is not None:
            rec.update(kind=update.kind)
            self.session.send(update)
        else:  # centralized: the round's update is its own aggregate
            self.core.apply(update.round, update.round, self._block_params[update.block])
            self._notify_global(trainer, pl_module, update.round)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, r: int) -> None:
        """Wait for round ``r``'s aggregate, apply it (the core's rebase) and record the transfer."""
        assert self.core is not None and self.session is not None
        t0 = time.perf_counter()
        arrival = self.session.wait(r)
        blocked = time.perf_counter() - t0
        self.core.apply(r, arrival.version, arrival.tensors)
        rec = next(x for x in reversed(self.records) if x["round"] == r)
        rec.update(
            blocked_s=blocked,
            upload_s=arrival.upload_s,
            server_wait_s=arrival.server_wait_s,
            download_s=arrival.download_s,
            bytes_up=arrival.bytes_up,
            bytes_down=arrival.bytes_down,
            version=arrival.version,
            sent_at=arrival.sent_at,
            arrived_at=arrival.arrived_at,
            applied_at=time.time(),
        )
        if arrival.late:
            rec["late"] = True
        if arrival.retries:
            rec["retries"] = arrival.retries
        if self.core.round < self.core.plan.rounds:  # the final model is announced once, by _finish
            self._notify_global(trainer, pl_module, r)

    def _finish(self) -> None:
        """After the last round and its aggregates: fetch any block the server holds newer (a late rejoin)."""
        assert self.core is not None
        if self.session is not None:
            for b, v in enumerate(int(v) for v in self.session.versions()["versions"]):
                if v > self.core.versions[b]:
                    pulled = self.session.fetch(b)
                    self.core.adopt(b, pulled.version, pulled.tensors)
        self._done = True

    # ------------------------------------------------------ the global model

    def _wants_global(self, trainer: pl.Trainer, round_index: int) -> bool:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if hasattr(cb, "on_global_model"):
                wants = getattr(cb, "wants_global_model", None)
                if wants is None or wants(round_index):
                    return True
        return False

    def _notify_global(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int) -> None:
        """Tell the callbacks that want it that the module holds the global model after ``round_index``."""
        assert self.core is not None
        if not self._wants_global(trainer, round_index):
            return
        with self._global_view(round_index) as exact:
            if not exact:
                if not self._warned_view:
                    self._warned_view = True
                    rank_zero_warn(
                        f"client {self.client_id} never holds the global model mid-run here ({self.mode} with "
                        f"{self.core.plan.num_blocks} block(s)); only the final model is evaluated"
                    )
                return
            for cb in trainer.callbacks:  # type: ignore[attr-defined]
                hook = getattr(cb, "on_global_model", None)
                wants = getattr(cb, "wants_global_model", None)
                if hook is not None and (wants is None or wants(round_index)):
                    hook(trainer, pl_module, round_index)

    @contextmanager
    def _global_view(self, round_index: int) -> Iterator[bool]:
        """The module as the global model after ``round_index``; ``False`` when this client cannot show it.

        In ``parablock`` the aggregate of round ``t`` is applied when round
        ``t + 2`` is about to begin, while block ``b_{t+1}`` holds this
        client's unaggregated progress: that block's value when round ``t + 1``
        began (its global value then) is swapped in for the duration.
        """
        assert self.core is not None
        core = self.core
        lagging = {b for q, (b, _) in core.inflight.items() if q > round_index and not core.clean[b]}
        exact_elsewhere = all(c for b, c in enumerate(core.clean) if b not in lagging)
        if not lagging or not exact_elsewhere:
            yield exact_elsewhere
            return
        snap = self._snapshot
        if len(lagging) != 1 or snap is None or snap[0] != round_index:
            yield False
            return
        params = self._block_params[lagging.pop()]
        with torch.no_grad():
            local = {n: p.detach().clone() for n, p in params.items()}
            for n, v in snap[1].items():
                params[n].copy_(v)
            try:
                yield True
            finally:
                for n, v in local.items():
                    params[n].copy_(v)

    # ------------------------------------------------------------ counting

    def _count(self, batch: Any, outputs: Tensor | Mapping[str, Any] | None) -> None:
        try:
            self._samples += extract_batch_size(batch)
        except Exception:
            self._samples += 1
        if self.weighting == "tokens":
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if isinstance(labels, Tensor):
                self._tokens = self._tokens + (labels != -100).sum()
            elif isinstance(mask, Tensor):
                self._tokens = self._tokens + mask.sum()
            elif not self._warned_tokens:
                self._warned_tokens = True
                rank_zero_warn("weighting='tokens' needs batches with `labels` or `attention_mask`; counting samples instead")
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach())

    # ------------------------------------------------------------------- end

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:  # what this client holds at the end, to compare with the server's global and other drivers
            self.final_metrics["blocks_sha256"] = digest({n: p for blk in self._block_params for n, p in blk.items()})
        if not self._done and not self.federated:
            rank_zero_warn(f"training stopped after {self.round} of {self.rounds} rounds; resume from a checkpoint to finish them")
        elif not self._done:
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
        try:
            if self._done:
                self.leave()
        finally:
            self.session.close(cancel_pending=not self._done)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(cancel_pending=True)

    # ----------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        core = self.core
        return {
            "round": core.round if core else 0,
            "round_start_step": self._round_start_step,
            "schedule": list(core.plan.schedule) if core else [],
            "rounds": self.rounds,
            "partition": self.partition.to_dict() if self.partition else None,
            "versions": list(core.versions) if core else [],
            "fingerprint": self._fingerprint,
            "records": [dict(r) for r in self.records],
            "events": [dict(e) for e in self.events],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Resume between rounds: the weights come from the checkpoint; with a server, its global blocks win on rejoin."""
        assert self.partition is not None and self.core is not None
        if state.get("partition") not in (None, self.partition.to_dict()):
            raise ParaBlockError("the checkpoint's block partition differs from this model's; resume with the same blocks settings")
        self.core.load_state_dict(state)
        if not self.federated:
            self.core.clean = [True] * len(self.core.clean)
        self.records = [dict(r) for r in state.get("records", []) if r.get("round", 0) < self.core.round]
        self.events = [dict(e) for e in state.get("events", [])]
        self._done = self.core.round >= self.rounds
        if self.federated:
            self.events.append({"event": "restored", "at": time.time(), "round": self.core.round})
