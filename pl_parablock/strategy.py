"""FederatedBlockStrategy: federated block coordinate descent as a Lightning callback.

Round ``t`` on a client: every parameter but block ``b_t`` is frozen, the
optimizer state of the previous block is reset, ``local_steps`` optimizer
steps train the block, and the finished block goes to the transmitter thread,
which uploads it and fetches the server's aggregate. When the aggregate
arrives the block is corrected (rebased): ``theta <- g' + (theta - e)``, the
global value plus the local progress since the hand-off.

``mode="sync"`` waits for round ``t``'s aggregate before round ``t+1``;
``mode="parablock"`` starts round ``t+1`` at once and applies round ``t``'s
aggregate before round ``t+2`` starts (staleness of one round, applied at the
same point of every run, so runs are reproducible); ``mode="fedavg"`` trains
every trainable parameter as one block and waits like ``sync``.

Without a server the same callback runs centralized block coordinate descent
(the BAdam way): the reference the federated modes are checked against.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from typing_extensions import override

from pl_parablock.blocks import Partition, make_schedule, partition_model, whole_model_partition
from pl_parablock.errors import ParaBlockError, ServerRestarted, TransmitterError, TransportError
from pl_parablock.federation.aggregate import rebase
from pl_parablock.federation.channel import TLS
from pl_parablock.federation.link import Link
from pl_parablock.federation.transport import GrpcTransport, Pulled, Transport
from pl_parablock.federation.wire import DTYPES, dtype_name
from pl_parablock.transmitter import Arrival, Handoff, Transmitter

__all__ = ["FederatedBlockStrategy"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Mode = Literal["parablock", "sync", "fedavg"]
Weighting = Literal["samples", "tokens", "uniform"]


def _cpu_copy(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def model_fingerprint(module: nn.Module, partition: Partition, mode: str) -> dict[str, Any]:
    """Names, shapes and dtypes of the block tensors plus a hash of every weight.

    Clients of one federation must agree on all of it; the hash covers the
    frozen weights too, since the global model is assembled from them.
    """
    params = dict(module.named_parameters())
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    tensors = {
        n: {"dtype": dtype_name(params[n].dtype), "shape": list(params[n].shape), "nbytes": params[n].numel() * params[n].element_size()}
        for n in partition.param_names
    }
    return {"mode": mode, "partition": partition.to_dict(), "tensors": tensors, "hash": h.hexdigest()}


class FederatedBlockStrategy(Callback):
    r"""Federated block coordinate descent with the ParaBlock schedule.

    Add it to any ``Trainer`` whose LightningModule holds the model; blocks
    are detected from the module's largest ``nn.ModuleList`` or given as name
    patterns. Rounds count optimizer steps (``trainer.global_step``), so with
    gradient accumulation a round is ``local_steps * accumulate_grad_batches``
    batches.

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
        keep_optimizer_state: keep a block's optimizer state when it goes
            inactive (default: drop it, so only the active block holds state).
        weighting: this client's weight in the aggregate: ``samples`` or
            ``tokens`` seen in the round, or ``uniform``.
        timeout_s: longest single network wait, seconds.
        link: emulated link for a ``"HOST:PORT"`` server.
        wire_dtype: dtype blocks travel in (e.g. ``"bfloat16"``); ``None``: their own.
        chunk_kb: chunk size of streamed blocks, KiB.
        token: the federation's (or this client's) token for a ``"HOST:PORT"``
            server; ``None`` reads ``PL_PARABLOCK_TOKEN`` from the environment.
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
        mode: Mode = "parablock",
        blocks: Sequence[str] | None = None,
        layers_per_block: int = 1,
        embeddings: bool = False,
        head: bool = False,
        rounds: int | None = None,
        schedule: str | Sequence[int] = "ascending",
        seed: int = 0,
        keep_optimizer_state: bool = False,
        weighting: Weighting = "samples",
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
        if mode not in ("parablock", "sync", "fedavg"):
            problems.append(f"mode={mode!r} must be 'parablock', 'sync' or 'fedavg'")
        if not (isinstance(layers_per_block, int) and layers_per_block >= 1):
            problems.append(f"layers_per_block={layers_per_block!r} must be an integer >= 1")
        if client_id < 0:
            problems.append(f"client_id={client_id!r} must be >= 0")
        if server is None and (rounds is None or rounds < 1):
            problems.append(f"rounds={rounds!r}: without a server, give the number of rounds (>= 1)")
        if server is not None and not isinstance(server, (str, Transport)):
            problems.append(f"server={server!r} must be 'HOST:PORT', a Transport or None")
        if weighting not in ("samples", "tokens", "uniform"):
            problems.append(f"weighting={weighting!r} must be 'samples', 'tokens' or 'uniform'")
        if not timeout_s > 0:
            problems.append(f"timeout_s={timeout_s!r} must be > 0")
        if wire_dtype is not None and wire_dtype not in DTYPES:
            problems.append(f"wire_dtype={wire_dtype!r} must be one of {', '.join(DTYPES)} or None")
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
        self.timeout_s = timeout_s
        self.link = link
        self.wire_dtype = wire_dtype
        self.chunk_kb = chunk_kb
        self.token = token
        self.tls = tls

        self.partition: Partition | None = None
        self.schedule: list[int] = []
        self.records: list[dict[str, Any]] = []
        self.final_metrics: dict[str, Any] = {}
        self.round = 0
        self._params: dict[str, nn.Parameter] = {}
        self._block_params: list[dict[str, nn.Parameter]] = []
        self._active: int | None = None
        self._round_open = False
        self._round_start_step = 0
        self._round_t0 = 0.0
        self._start: dict[str, Tensor] | None = None
        self._start_clean = True
        self._start_version = -1
        self._samples = 0
        self._tokens: Tensor | int = 0
        self._losses: list[Tensor] = []
        self._versions: list[int] = []
        self._clean: list[bool] = []
        # round -> (block, the block's value at hand-off, kept only while the block may train again before
        # that round's aggregate is applied: the rebase needs it then; otherwise the upload holds it alone)
        self._inflight: dict[int, tuple[int, dict[str, Tensor] | None]] = {}
        self._next_apply = 0
        self._fingerprint: dict[str, Any] | None = None
        self._instance: str | None = None
        self._participants: list[list[int]] | None = None
        self._done = False
        self.events: list[dict[str, Any]] = []
        self._dist: Any = None
        self._world = 1
        self._leader = True
        self._transport: Transport | None = None
        self._owns_transport = False
        self._transmitter: Transmitter | None = None
        self._restored: dict[str, Any] | None = None
        self._left = False
        self._warned_tokens = False

    # ------------------------------------------------------------ properties

    @property
    def federated(self) -> bool:
        return self.server is not None

    @property
    def round_start_step(self) -> int:
        """``trainer.global_step`` when the current round began."""
        return self._round_start_step

    @property
    def active_block(self) -> int | None:
        """Index of the block being trained, if a round is open."""
        return self._active if self._round_open else None

    # ----------------------------------------------------------------- setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._dist = trainer.strategy
        self._world = trainer.world_size
        self._leader = trainer.is_global_zero
        if self._world > 1 and isinstance(trainer.strategy, DDPStrategy):
            if not trainer.strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise ParaBlockError(
                    "a multi-device client trains one block at a time, so DDP must allow parameters without gradients: "
                    "use Trainer(strategy='ddp_find_unused_parameters_true') or DDPStrategy(find_unused_parameters=True)"
                )
        if self.mode == "fedavg":
            self.partition = whole_model_partition(pl_module)
        else:
            self.partition = partition_model(
                pl_module,
                layers_per_block=self.layers_per_block,
                embeddings=self.embeddings,
                head=self.head,
                patterns=self.block_patterns,
            )
        params = dict(pl_module.named_parameters())
        in_blocks = set(self.partition.param_names)
        for name, p in params.items():
            p.requires_grad_(name in in_blocks)
        self._params = {n: params[n] for n in self.partition.param_names}
        self._block_params = [{n: params[n] for n in b.params} for b in self.partition.blocks]
        n_frozen = sum(p.numel() for n, p in params.items() if n not in in_blocks)
        log.info(
            "client %d: %d blocks over %d parameters (%d frozen, never sent): %s",
            self.client_id,
            len(self.partition),
            sum(p.numel() for p in self._params.values()),
            n_frozen,
            ", ".join(b.name for b in self.partition.blocks),
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.partition is not None
        self._cover_optimizers(trainer)
        self._versions = [-1] * len(self.partition)
        self._clean = [True] * len(self.partition)
        if self._restored is not None:
            self._restore(self._restored)
        if self.federated:
            self._connect(pl_module)
        elif not self.schedule:
            self.schedule = make_schedule(self.schedule_kind, len(self.partition), self.rounds, self.seed)
        max_steps = trainer.max_steps
        remaining = (self.rounds - self.round) * self.local_steps
        if self.federated and max_steps not in (None, -1) and trainer.global_step + remaining > max_steps:
            raise ParaBlockError(
                f"Trainer(max_steps={max_steps}) stops before the federation's {self.rounds} rounds of "
                f"{self.local_steps} steps end; set max_steps={self.rounds * self.local_steps} or -1"
            )

    def _cover_optimizers(self, trainer: pl.Trainer) -> None:
        if not trainer.optimizers:
            raise ParaBlockError("FederatedBlockStrategy needs an optimizer: return one from configure_optimizers()")
        known = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [p for p in self._params.values() if id(p) not in known]
        if missing:
            opt = trainer.optimizers[0]
            template = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            opt.add_param_group({**template, "params": missing})
            rank_zero_warn(
                f"FederatedBlockStrategy added {len(missing)} block parameters the optimizer did not hold, with the "
                "settings of its first param group. Build the optimizer over the parameters that require grad after "
                "setup (e.g. `AdamW(p for p in self.parameters() if p.requires_grad)`) to choose them yourself."
            )

    # -------------------------------------------------------------- joining

    def _lead(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on global rank 0 only and hand its result, or its failure, to every rank.

        A client made of several processes is one federation client: only
        rank 0 talks to the server; the others receive what it got, so every
        rank freezes, rebases and advances identically.
        """
        if self._world == 1:
            return fn()
        payload: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self._leader:
            try:
                payload = ("ok", fn())
            except ServerRestarted as exc:
                payload, error = ("restart", str(exc)), exc
            except TransmitterError as exc:
                kind = "restart" if isinstance(exc.__cause__, ServerRestarted) else "error"
                payload, error = (kind, str(exc)), exc
            except BaseException as exc:
                payload, error = ("error", f"{type(exc).__name__}: {exc}"), exc
        kind, value = self._dist.broadcast(payload, src=0)
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        if error is not None:
            raise error
        if kind == "restart":
            raise ServerRestarted(value)
        raise TransmitterError(f"client {self.client_id} (rank 0): {value}")

    def _connect(self, pl_module: pl.LightningModule) -> None:
        assert self.partition is not None
        if self._leader:
            if isinstance(self.server, Transport):
                self._transport = self.server
            else:
                assert isinstance(self.server, str)
                self._transport = GrpcTransport(
                    self.server,
                    link=self.link,
                    chunk_bytes=self.chunk_kb * 1024,
                    wire_dtype=DTYPES[self.wire_dtype] if self.wire_dtype else None,
                    connect_timeout_s=min(self.timeout_s, 60.0),
                    token=os.environ.get("PL_PARABLOCK_TOKEN") or self.token,
                    tls=self.tls,
                )
                self._owns_transport = True
            if self._fingerprint is None:
                self._fingerprint = model_fingerprint(pl_module, self.partition, self.mode)

        def join_and_upload() -> dict[str, Any]:
            reply = self._join_remote()
            if reply.get("need_state"):
                assert self._transport is not None
                self._transport.upload_state(self.client_id, _cpu_copy(self._params), self.timeout_s)
            return reply

        reply = self._lead(join_and_upload)
        self._adopt(reply)
        self._sync_to(reply)
        where = self._transport.describe() if self._transport is not None else "rank 0"
        log.info(
            "client %d joined via %s: %d rounds, from round %d, schedule %s", self.client_id, where, self.rounds, self.round, self.schedule
        )

    def _join_remote(self) -> dict[str, Any]:
        """Join (or rejoin) the federation, retrying while the server is unreachable (rank 0)."""
        assert self._transport is not None and self._fingerprint is not None
        deadline = time.monotonic() + self.timeout_s
        backoff = 0.5
        while True:
            try:
                reply = self._transport.join(self.client_id, self._fingerprint, self.timeout_s)
                break
            except TransportError as exc:
                if time.monotonic() + backoff > deadline:
                    raise
                log.warning("client %d: cannot join yet (%s); retrying in %.1f s", self.client_id, exc, backoff)
                time.sleep(backoff)
                backoff = min(2 * backoff, 10.0)
        if reply.get("mode") not in (None, self.mode):
            raise ParaBlockError(f"client {self.client_id} runs mode={self.mode} but the server runs mode={reply['mode']}")
        self._transport.instance = reply.get("instance")
        return reply

    def _adopt(self, reply: Mapping[str, Any]) -> None:
        self.schedule = [int(b) for b in reply["schedule"]]
        self.rounds = int(reply["rounds"])
        self._participants = reply.get("participants")
        self._instance = reply.get("instance")

    def _fetch(self, block: int) -> Pulled:
        assert self._transport is not None
        return self._transport.fetch(self.client_id, block, self.timeout_s)

    def _sync_to(self, reply: Mapping[str, Any]) -> None:
        """Adopt the server's state: every block whose global version differs, and its next round.

        A client joining late, restarting from a crash, or facing a server
        restarted from an older checkpoint ends up holding exactly the
        server's global blocks and continues at the first round not yet
        aggregated; its in-flight hand-offs are dropped (the server either
        has them or rolled them back).
        """
        fetched = []
        for b, v in enumerate(int(v) for v in reply.get("versions", [])):
            if v != self._versions[b] or not self._clean[b]:
                pulled = self._lead(partial(self._fetch, b))
                self._copy_in(b, pulled.tensors)
                self._versions[b] = pulled.version
                self._clean[b] = True
                fetched.append(b)
        self._inflight.clear()
        self._round_open = False
        self._start = None
        next_round = int(reply.get("next_round", 0))
        if fetched or next_round != self.round:
            self.events.append(
                {"event": "synced", "at": time.time(), "from_round": self.round, "to_round": next_round, "fetched_blocks": fetched}
            )
        self.round = self._next_apply = next_round
        self._done = False
        if self._leader:
            assert self._transport is not None
            self._transmitter = Transmitter(self._transport, self.client_id, timeout_s=self.timeout_s, instance=self._instance)

    def _resync(self) -> None:
        """The server restarted: rejoin it and adopt its state."""
        log.warning("client %d: the server restarted; rejoining and adopting its state", self.client_id)
        if self._transmitter is not None:
            self._transmitter.close(timeout=5.0, cancel_pending=True)
        self._clean = [False] * len(self._clean)
        reply = self._lead(self._join_remote)
        self._adopt(reply)
        self._sync_to(reply)

    def _send(self, handoff: Handoff) -> None:
        def send() -> None:
            assert self._transmitter is not None
            self._transmitter.send(handoff)

        self._lead(send)

    def _copy_in(self, block: int, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._block_params[block].items():
                p.copy_(tensors[n])

    # ---------------------------------------------------------------- rounds

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._round_open and not self._done:
            self._advance(trainer, end=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Tensor | Mapping[str, Any] | None, batch: Any, batch_idx: int
    ) -> None:
        if not self._round_open:
            return
        self._count(batch, outputs)
        if trainer.global_step - self._round_start_step >= self.local_steps:
            self._advance(trainer, end=True)

    def _advance(self, trainer: pl.Trainer, *, end: bool) -> None:
        """End the open round (if ``end``), then start the next one or finish.

        A server restart noticed on the way makes the client rejoin and
        continue from the server's next round.
        """
        for _ in range(100):
            try:
                if end:
                    end = False
                    self._end_round(trainer)
                self._skip_rounds(trainer)
                if self.round < self.rounds:
                    self._begin_round(trainer)
                else:
                    self._finish_rounds()
                break
            except (TransmitterError, ServerRestarted) as exc:
                if isinstance(exc, TransmitterError) and not isinstance(exc.__cause__, ServerRestarted):
                    raise
                self._resync()
        if self._done:
            trainer.should_stop = True

    def _participates(self, round_index: int) -> bool:
        return self._participants is None or self.client_id in self._participants[round_index]

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

    def _activate(self, trainer: pl.Trainer, block: int) -> None:
        previous = self._active
        for b, params in enumerate(self._block_params):
            for p in params.values():
                p.requires_grad_(b == block)
        if previous is not None and previous != block:
            for p in self._block_params[previous].values():
                p.grad = None
                if not self.keep_optimizer_state:
                    for opt in trainer.optimizers:
                        opt.state.pop(p, None)
        self._active = block

    def _skip_rounds(self, trainer: pl.Trainer) -> None:
        """Rounds this client is not sampled for: no training, only the aggregate."""
        while self.federated and self.round < self.rounds and not self._participates(self.round):
            t, b = self.round, self.schedule[self.round]
            if self.mode == "parablock" and t >= 2:
                self._apply_through(t - 2)
            self.records.append({"round": t, "block": b, "participated": False, "started_at": time.time()})
            self._inflight[t] = (b, _cpu_copy(self._block_params[b]) if self._trains_again_before_apply(t, b) else None)
            self._send(Handoff(t, b, "none", self._versions[b], 0.0, None))
            self.round = t + 1
            if self.mode in ("sync", "fedavg"):
                self._apply_through(t)

    def _begin_round(self, trainer: pl.Trainer) -> None:
        t = self.round
        if self.federated and self.mode == "parablock" and t >= 2:
            self._apply_through(t - 2)
        b = self.schedule[t]
        self._activate(trainer, b)
        if self.federated:
            # Values travel (exact aggregation) only when the block starts from a global value
            # and no earlier round of it is still pending; otherwise the round's delta does.
            pending = any(blk == b for blk, _ in self._inflight.values())
            self._start_clean = self._clean[b] and not pending and self.wire_dtype is None
            self._start_version = self._versions[b]
            self._start = None if self._start_clean else _cpu_copy(self._block_params[b])
        self._round_start_step = trainer.global_step
        self._samples = 0
        self._tokens = 0
        self._losses = []
        self._round_open = True
        self.records.append({"round": t, "block": b, "started_at": time.time()})
        self._round_t0 = time.perf_counter()

    def _end_round(self, trainer: pl.Trainer) -> None:
        t, b = self.round, self._active
        assert b is not None
        compute_s = time.perf_counter() - self._round_t0
        loss = float(torch.stack(self._losses).float().mean()) if self._losses else None
        tokens = int(self._tokens) if isinstance(self._tokens, (int, Tensor)) else 0
        if self._world > 1:  # one client: its samples and tokens over every rank, its loss averaged
            counts = self._dist.reduce(torch.tensor([float(self._samples), float(tokens)]), reduce_op="sum")
            self._samples, tokens = int(counts[0]), int(counts[1])
            if loss is not None:
                loss = float(self._dist.reduce(torch.tensor(loss), reduce_op="mean"))
        weight = {"samples": float(self._samples), "tokens": float(tokens or self._samples), "uniform": 1.0}[self.weighting]
        rec = self.records[-1]
        rec.update(compute_s=compute_s, ended_at=time.time(), loss=loss, samples=self._samples, weight=weight)
        self._round_open = False
        self.round = t + 1
        if self.federated:
            end = _cpu_copy(self._block_params[b])
            if self._start is None:
                kind, payload = "value", end
            else:
                kind, payload = "delta", {n: end[n] - self._start[n] for n in end}
            self._inflight[t] = (b, end if self._trains_again_before_apply(t, b) else None)
            self._clean[b] = False
            rec.update(kind=kind)
            self._send(Handoff(t, b, kind, self._start_version, weight, payload, loss))
        log.info(
            "client %d round %d/%d block %d: loss %s, compute %.2f s",
            self.client_id,
            t + 1,
            self.rounds,
            b,
            f"{loss:.4f}" if loss is not None else "n/a",
            compute_s,
        )
        if self.federated and self.mode in ("sync", "fedavg"):
            self._apply_through(t)

    def _trains_again_before_apply(self, t: int, b: int) -> bool:
        """Whether block ``b`` may train between handing off round ``t`` and applying its aggregate.

        sync and fedavg apply a round's aggregate before the next round
        starts; parablock applies it at the start of round t+2, so only
        round t+1 can train the block meanwhile.
        """
        return self.mode == "parablock" and t + 1 < self.rounds and self.schedule[t + 1] == b

    def _finish_rounds(self) -> None:
        """After the last round: apply every outstanding aggregate, then check nothing is newer."""
        if self.federated:
            self._apply_through(self.rounds - 1)

            def versions() -> dict[str, Any]:
                assert self._transport is not None
                reply = self._transport.versions(self.client_id, self.timeout_s)
                if reply.get("instance") not in (None, self._instance):
                    raise ServerRestarted(f"client {self.client_id}: the server restarted before the last round was confirmed")
                return reply

            reply = self._lead(versions)
            for b, v in enumerate(int(v) for v in reply["versions"]):
                if v > self._versions[b]:
                    pulled = self._lead(partial(self._fetch, b))
                    self._copy_in(b, pulled.tensors)
                    self._versions[b] = pulled.version
                    self._clean[b] = True
        self._active = None
        self._done = True

    def _apply_through(self, round_index: int) -> None:
        """Wait for and apply every aggregate up to ``round_index``, in order."""
        while self._next_apply <= round_index:
            r = self._next_apply
            t0 = time.perf_counter()

            def wait(r: int = r) -> Arrival:
                assert self._transmitter is not None
                return self._transmitter.wait(r)

            arrival = self._lead(wait)
            blocked = time.perf_counter() - t0
            self._apply(arrival)
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
            self._next_apply = r + 1

    def _apply(self, arrival: Arrival) -> None:
        """Rebase block ``arrival.block`` onto its new global value."""
        b, r, g = arrival.block, arrival.round, arrival.tensors
        _, end = self._inflight.pop(r)
        later = [q for q, (blk, _) in self._inflight.items() if blk == b and q > r]
        trained_since = bool(later) or (self._round_open and self._active == b)
        if not trained_since:
            self._copy_in(b, g)
            self._clean[b] = True
        else:
            if end is None:
                raise ParaBlockError(f"client {self.client_id}: block {b} trained again before round {r}'s aggregate arrived")
            with torch.no_grad():
                for n, p in self._block_params[b].items():
                    p.copy_(rebase(p, end[n], g[n]))
            for q in later:
                blk, e_q = self._inflight[q]
                if e_q is not None:
                    self._inflight[q] = (blk, {n: rebase(e_q[n], end[n], g[n]) for n in e_q})
            if self._round_open and self._active == b and self._start is not None:
                self._start = {n: rebase(self._start[n], end[n], g[n]) for n in end}
            self._clean[b] = False
        self._versions[b] = max(self._versions[b], arrival.version)

    # ------------------------------------------------------------------- end

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._done and not self.federated:
            rank_zero_warn(f"training stopped after {self.round} of {self.rounds} rounds; resume from a checkpoint to finish them")
        elif not self._done:
            raise ParaBlockError(
                f"client {self.client_id}: training stopped after {self.round} of {self.rounds} rounds; "
                f"let the Trainer run {self.rounds * self.local_steps} optimizer steps (max_steps=-1 or larger, "
                "max_epochs=-1 or enough epochs)"
            )
        self._active = None

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
        if self._left or self._transport is None:
            return
        self._left = True
        self._transport.leave(self.client_id, self.report(), self.timeout_s)

    def _shutdown(self, *, cancel_pending: bool) -> None:
        if self._transmitter is not None:
            self._transmitter.close(timeout=self.timeout_s if not cancel_pending else 5.0, cancel_pending=cancel_pending)
            self._transmitter = None
        if self._owns_transport and self._transport is not None:
            self._transport.close()
        self._transport = None if self._owns_transport else self._transport

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.federated:
            return
        try:
            if self._done and not self._left:
                self.leave()
        finally:
            self._shutdown(cancel_pending=not self._done)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._shutdown(cancel_pending=True)

    # ----------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "round_open": self._round_open,
            "round_start_step": self._round_start_step,
            "schedule": list(self.schedule),
            "rounds": self.rounds,
            "partition": self.partition.to_dict() if self.partition else None,
            "versions": list(self._versions),
            "fingerprint": self._fingerprint,
            "records": [dict(r) for r in self.records],
            "events": [dict(e) for e in self.events],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.partition is not None
        if state.get("partition") not in (None, self.partition.to_dict()):
            raise ParaBlockError("the checkpoint's block partition differs from this model's; resume with the same blocks settings")
        self.schedule = list(state["schedule"])
        self.rounds = int(state["rounds"])
        self.round = int(state["round"])
        self.records = [dict(r) for r in state.get("records", []) if r.get("round", 0) < self.round]
        self.events = [dict(e) for e in state.get("events", [])]
        self._next_apply = self.round
        self._done = self.round >= self.rounds
        if self.federated:
            # The weights come from the checkpoint; the server's global blocks win on rejoin.
            self._fingerprint = state.get("fingerprint")
            self._versions = [int(v) for v in state.get("versions", self._versions)]
            self._clean = [False] * len(self._clean)
            self.events.append({"event": "restored", "at": time.time(), "round": self.round})
        self._restored = None
