"""What a client keeps about its rounds besides the algorithm: the ledger, the batch counts, the global-model view.

The Lightning callback owns one of each; none of them decides anything of
the algorithm (that is :mod:`pl_parablock.core`'s), they record it and
show it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from pl_parablock.client.transmitter import Arrival
from pl_parablock.client.transport import Transport
from pl_parablock.core.client import ClientCore, Update
from pl_parablock.core.plan import MODES, WEIGHTINGS
from pl_parablock.errors import ParaBlockError
from pl_parablock.wire.framing import WIRE_DTYPES

__all__ = ["BatchCounter", "GlobalModelView", "RoundLedger", "argument_problems", "cover_optimizers"]

_ARRIVAL_FIELDS = ("upload_s", "server_wait_s", "download_s", "bytes_up", "bytes_down", "version", "sent_at", "arrived_at")


class RoundLedger:
    """Per-round records (timings, bytes, loss, weight) and events (joins, resyncs) of one client: plain data."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def begun(self, round_index: int, block: int, *, participated: bool = True) -> None:
        rec: dict[str, Any] = {"round": round_index, "block": block, "started_at": time.time()}
        if not participated:
            rec["participated"] = False
        self.records.append(rec)

    def ended(self, update: Update, *, compute_s: float, samples: int, federated: bool) -> None:
        rec = self.records[-1]
        rec.update(compute_s=compute_s, ended_at=time.time(), loss=update.loss, samples=samples, weight=update.weight)
        if federated:
            rec["kind"] = update.kind

    def applied(self, arrival: Arrival, blocked_s: float) -> None:
        rec = next(x for x in reversed(self.records) if x["round"] == arrival.round)
        rec.update({k: getattr(arrival, k) for k in _ARRIVAL_FIELDS}, blocked_s=blocked_s, applied_at=time.time())
        if arrival.late:
            rec["late"] = True
        if arrival.retries:
            rec["retries"] = arrival.retries

    def event(self, name: str, **fields: Any) -> None:
        self.events.append({"event": name, "at": time.time(), **fields})

    def restore(self, records: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]], before_round: int) -> None:
        self.records = [dict(r) for r in records if r.get("round", 0) < before_round]
        self.events = [dict(e) for e in events]


class BatchCounter:
    """Samples, tokens (label tokens, else attended tokens) and losses of the open round's batches."""

    def __init__(self, count_tokens: bool) -> None:
        self.count_tokens = count_tokens
        self._warned = False
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.tokens: Tensor | int = 0
        self.losses: list[Tensor] = []
        self.t0 = time.perf_counter()

    def add(self, batch: Any, outputs: Tensor | Mapping[str, Any] | None) -> None:
        try:
            self.samples += extract_batch_size(batch)
        except Exception:
            self.samples += 1
        if self.count_tokens:
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if isinstance(labels, Tensor):
                self.tokens = self.tokens + (labels != -100).sum()
            elif isinstance(mask, Tensor):
                self.tokens = self.tokens + mask.sum()
            elif not self._warned:
                self._warned = True
                rank_zero_warn("weighting='tokens' needs batches with `labels` or `attention_mask`; counting samples instead")
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self.losses.append(loss.detach())

    def totals(self, dist: Any = None) -> tuple[int, int, float | None]:
        """``(samples, tokens, mean loss)``; over every rank of a multi-process client (``dist``: the Trainer's strategy)."""
        loss = float(torch.stack(self.losses).float().mean()) if self.losses else None
        samples, tokens = self.samples, int(self.tokens)
        if dist is not None:
            counts = dist.reduce(torch.tensor([float(samples), float(tokens)]), reduce_op="sum")
            samples, tokens = int(counts[0]), int(counts[1])
            if loss is not None:
                loss = float(dist.reduce(torch.tensor(loss), reduce_op="mean"))
        return samples, tokens, loss


class GlobalModelView:
    """Shows the other callbacks the global model after round ``t`` when (and only when) the client holds it.

    A callback with ``on_global_model(trainer, pl_module, round_index)`` (and
    optionally ``wants_global_model(round_index)``) is called while the
    module's parameters are exactly the global model after ``round_index``.
    In ``parablock`` the aggregate of round ``t`` is applied when round
    ``t + 2`` is about to begin, while block ``b_{t+1}`` holds this client's
    unaggregated progress: that block's value when round ``t + 1`` began (its
    global value then, kept by :meth:`snapshot`) is swapped in meanwhile.
    """

    def __init__(self, blocks: Sequence[Mapping[str, torch.nn.Parameter]]) -> None:
        self.blocks = blocks
        self._snapshot: tuple[int, dict[str, Tensor]] | None = None
        self._warned = False

    @staticmethod
    def wanted(callbacks: Sequence[Any], round_index: int) -> list[Any]:
        out = []
        for cb in callbacks:
            if hasattr(cb, "on_global_model"):
                wants = getattr(cb, "wants_global_model", None)
                if wants is None or wants(round_index):
                    out.append(cb)
        return out

    def snapshot(self, callbacks: Sequence[Any], round_index: int, block: int) -> None:
        """Round ``round_index + 1`` begins on ``block``: keep its value if the model after ``round_index`` will be shown."""
        self._snapshot = None
        if self.wanted(callbacks, round_index):
            self._snapshot = (round_index, {n: p.detach().clone() for n, p in self.blocks[block].items()})

    def forget(self) -> None:
        self._snapshot = None

    def show(self, trainer: Any, pl_module: Any, core: ClientCore, round_index: int) -> None:
        """Call the callbacks that want the global model after ``round_index``, if this client can show it."""
        callbacks = self.wanted(trainer.callbacks, round_index)
        if not callbacks:
            return
        with self._view(core, round_index) as exact:
            if not exact:
                if not self._warned:
                    self._warned = True
                    rank_zero_warn(
                        f"client {core.client_id} never holds the global model mid-run here ({core.plan.mode} with "
                        f"{core.plan.num_blocks} block(s)); only the final model is evaluated"
                    )
                return
            for cb in callbacks:
                cb.on_global_model(trainer, pl_module, round_index)

    @contextmanager
    def _view(self, core: ClientCore, round_index: int) -> Iterator[bool]:
        lagging = {b for q, blocks in core.inflight.items() if q > round_index for b in blocks if not core.clean[b]}
        exact_elsewhere = all(c for b, c in enumerate(core.clean) if b not in lagging)
        snap = self._snapshot
        if not lagging or not exact_elsewhere:
            yield exact_elsewhere
            return
        if len(lagging) != 1 or snap is None or snap[0] != round_index:
            yield False
            return
        params = self.blocks[lagging.pop()]
        with torch.no_grad():
            local = {n: p.detach().clone() for n, p in params.items()}
            for n, v in snap[1].items():
                params[n].copy_(v)
            try:
                yield True
            finally:
                for n, v in local.items():
                    params[n].copy_(v)


def argument_problems(
    server: Any,
    client_id: int,
    *,
    local_steps: int,
    mode: str,
    blocks: Sequence[str] | None,
    layers_per_block: int,
    rounds: int | None,
    weighting: str,
    shard_size: int | None,
    timeout_s: float,
    wire_dtype: str | None,
    chunk_kb: int,
) -> list[str]:
    """What is wrong with :class:`~pl_parablock.client.strategy.FederatedBlockStrategy`'s arguments, each with the allowed range."""
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
    return problems


def cover_optimizers(optimizers: Sequence[torch.optim.Optimizer], blocks: Sequence[Mapping[str, torch.nn.Parameter]]) -> None:
    """Add the block parameters no optimizer holds to the first one (with a warning that says how to choose)."""
    if not optimizers:
        raise ParaBlockError("FederatedBlockStrategy needs an optimizer: return one from configure_optimizers()")
    known = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    missing = [p for params in blocks for p in params.values() if id(p) not in known]
    if missing:
        opt = optimizers[0]
        template = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        opt.add_param_group({**template, "params": missing})
        rank_zero_warn(
            f"FederatedBlockStrategy added {len(missing)} block parameters the optimizer did not hold, with the "
            "settings of its first param group. Build the optimizer over the parameters that require grad after "
            "setup (e.g. `AdamW(p for p in self.parameters() if p.requires_grad)`) to choose them yourself."
        )
