"""One client's rounds, driven for the Lightning callback: the algorithm core, the session, the ledger.

:class:`ClientRounds` is what :class:`~pl_parablock.client.strategy.FederatedBlockStrategy`
calls from its hooks. It sequences the core's steps (apply the aggregates
due, then skip, begin or finish; end a round and hand its update to the
session), rejoins the server when it restarted, and records each round;
every rule of the algorithm is :class:`~pl_parablock.core.client.ClientCore`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from pl_parablock.client.ledger import BatchCounter, GlobalModelView, RoundLedger
from pl_parablock.client.session import ClientSession
from pl_parablock.core.client import ClientCore, activate
from pl_parablock.core.codecs import NO_COMPRESSION, Compression
from pl_parablock.core.plan import Plan
from pl_parablock.errors import ResyncNeeded, TransmitterError

__all__ = ["ClientRounds"]

log = logging.getLogger(__name__)

ROUND_METRICS = (
    "round",
    "block",
    "loss",
    "weight",
    "compute_s",
    "blocked_s",
    "upload_s",
    "server_wait_s",
    "download_s",
    "bytes_up",
    "bytes_down",
)
"""What each finished round sends to the client's loggers (as ``round/<key>``)."""


class ClientRounds:
    """The round loop of one client (one process of it when it spans several).

    Args:
        client_id: this client.
        mode: the federation's mode.
        blocks: the live parameters of every block, by name.
        session: the link to the server; ``None`` for centralized block
            coordinate descent (every round's update is its own aggregate).
        weighting: this client's weight rule.
        shard_size: its number of training records.
        keep_optimizer_state: keep each block's optimizer state across its rounds.
        compression: how updates and aggregates travel (federated clients only).
        dist: the Trainer's strategy when the client spans several processes.
    """

    def __init__(
        self,
        client_id: int,
        mode: str,
        blocks: Sequence[Mapping[str, nn.Parameter]],
        *,
        session: ClientSession | None,
        weighting: str,
        shard_size: int,
        keep_optimizer_state: bool,
        compression: Compression = NO_COMPRESSION,
        dist: Any = None,
    ) -> None:
        self.client_id = client_id
        self.mode = mode
        self.blocks = blocks
        self.session = session
        self.weighting = weighting
        self.shard_size = shard_size
        self.keep_optimizer_state = keep_optimizer_state
        self.compression = compression if session is not None else NO_COMPRESSION
        self.dist = dist
        self.core: ClientCore | None = None
        self.ledger = RoundLedger()
        self.counter = BatchCounter(count_tokens=weighting == "tokens")
        self.view = GlobalModelView(blocks)
        self.round_start_step = 0
        self.done = False

    def use_plan(self, plan: Plan) -> ClientCore:
        self.core = ClientCore(plan, self.client_id, self.blocks, compression=self.compression)
        return self.core

    # -------------------------------------------------------------- joining

    def join(self, fingerprint: Mapping[str, Any], restored: Mapping[str, Any] | None = None) -> None:
        """Join (or rejoin) and adopt the server's state: its plan, every block whose version differs, its next round.

        A client joining late, restarting from a crash, or facing a server
        restarted from an older checkpoint ends up holding exactly the
        server's global blocks and continues at the first round not yet
        aggregated; its hand-offs in flight are dropped (the server either
        has them or rolled them back).
        """
        session = self.session
        assert session is not None
        params = {n: p for blk in self.blocks for n, p in blk.items()}
        # the initial state is sent from the parameters themselves (copied only off the CPU): the upload ends before training goes on
        reply = session.join(fingerprint, lambda: {n: p.detach().to("cpu") for n, p in params.items()})
        old = self.core
        core = self.use_plan(session.plan_of(reply, self.mode, len(self.blocks), self.keep_optimizer_state))
        if restored is not None:
            self.restore(restored, federated=True)
        elif old is not None:
            core.versions = list(old.versions)
            core.mark_unverified()
            core.keep_residuals(old)
        fetched = session.adopt(core, reply)
        next_round = int(reply.get("next_round", 0))
        if fetched or core.round != next_round:
            self.ledger.event("synced", from_round=core.round, to_round=next_round, fetched_blocks=fetched)
        core.restart_at(next_round)
        self.view.forget()
        self.done = False
        # k >= 2: round t + 1 uploads while round t's aggregate is awaited and downloaded (full duplex); k = 1 as the paper
        session.start_transmitter(duplex=core.plan.staleness >= 2)
        log.info("client %d joined via %s: %d rounds from round %d", self.client_id, session.describe(), core.plan.rounds, next_round)

    # ---------------------------------------------------------------- rounds

    def advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fingerprint: Mapping[str, Any] | None, *, end: bool) -> None:
        """End the open round (if ``end``), apply the aggregates due, then begin the next round or finish.

        A server restart (or a superseded version) noticed on the way makes the
        client rejoin and continue from the server's next round.
        """
        core = self.core
        assert core is not None
        for _ in range(100):
            try:
                if end:
                    end = False
                    self._end_round(trainer, pl_module)
                while self.core is not None and self.core.active_block is None and not self.done:
                    core = self.core
                    for r in core.awaiting():
                        self._apply(trainer, pl_module, r)
                    if core.round >= core.plan.rounds:
                        self._finish()
                    elif self.session is not None and not core.participates():
                        t, block = core.round, core.plan.schedule[core.round]
                        update = core.skip()
                        self.ledger.begun(t, block, participated=False)
                        if update is not None:
                            self.session.send(update)
                    else:
                        if core.catching_up and self.session is not None:  # cyclic: each block changed since its last turn, once
                            fetched = self.session.adopt(core, self.session.versions(), newer_only=True)
                            self.ledger.event("caught_up", round=core.round, fetched_blocks=fetched)
                            core.caught_up()
                            self.view.show(trainer, pl_module, core, core.round - 1)
                        self._begin_round(trainer, pl_module)
                break
            except (TransmitterError, ResyncNeeded) as exc:
                if isinstance(exc, TransmitterError) and not isinstance(exc.__cause__, ResyncNeeded):
                    raise
                log.warning("client %d: %s; rejoining and adopting the server's state", self.client_id, exc)
                assert fingerprint is not None
                self.join(fingerprint)
        if self.done:
            trainer.should_stop = True

    def _begin_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.core is not None
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            hook = getattr(cb, "on_round_boundary", None)
            if hook is not None:
                hook(trainer, pl_module, self.core.round)
        start = self.core.begin()
        activate(self.blocks, start, trainer.optimizers)
        if self.session is not None and self.core.plan.staleness:
            self.view.snapshot(trainer.callbacks, start.round - 1, start.block)  # type: ignore[attr-defined]
        self.round_start_step = trainer.global_step
        self.counter.reset()
        self.ledger.begun(start.round, start.block)

    def _end_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.core is not None
        compute_s = time.perf_counter() - self.counter.t0
        samples, tokens, loss = self.counter.totals(self.dist)
        update = self.core.end(samples=samples, tokens=tokens, shard=self.shard_size, weighting=self.weighting, loss=loss)
        self.ledger.ended(update, compute_s=compute_s, samples=samples, federated=self.session is not None)
        shown = f"{loss:.4f}" if loss is not None else "n/a"
        log.info("client %d round %d/%d block %d: loss %s, compute %.2f s", self.client_id, update.round + 1, self.core.plan.rounds,
                 update.block, shown, compute_s)  # fmt: skip
        if self.session is not None:
            self.session.send(update)
        else:  # centralized: the round's update is its own aggregate
            self.core.apply(update.round, update.round, self.blocks[update.block])
            self._log_round(trainer, update.round)
            self.view.show(trainer, pl_module, self.core, update.round)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, r: int) -> None:
        """Wait for round ``r``'s aggregate, apply it (the core's rebase) and record the transfer."""
        assert self.core is not None and self.session is not None
        t0 = time.perf_counter()
        arrival = self.session.wait(r)
        self.ledger.applied(arrival, time.perf_counter() - t0)
        self._log_round(trainer, r)
        value = arrival.tensors
        if arrival.kind == "delta":  # the compressed broadcast D: g + D, as the server formed it
            value = self.core.compressed_aggregate(r, value, arrival.base_versions)
        self.core.apply(r, arrival.version, value)
        if self.core.round < self.core.plan.rounds and not self.core.catching_up:  # the final model is evaluated once, at the end
            self.view.show(trainer, pl_module, self.core, r)

    def _finish(self) -> None:
        """After the last round and its aggregates: fetch any block the server holds newer (a late rejoin)."""
        assert self.core is not None
        if self.session is not None:
            self.session.adopt(self.core, self.session.versions(), newer_only=True)
        self.done = True

    def _log_round(self, trainer: pl.Trainer, round_index: int) -> None:
        """A finished round's record to the Trainer's loggers (round, block, loss, times, bytes), at the current step."""
        if not trainer.loggers:
            return
        rec = next(x for x in reversed(self.ledger.records) if x["round"] == round_index)
        metrics = {f"round/{k}": float(rec[k]) for k in ROUND_METRICS if isinstance(rec.get(k), (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        core = self.core
        return {
            **(core.state_dict() if core else {"round": 0, "versions": []}),
            "round_start_step": self.round_start_step,
            "schedule": list(core.plan.schedule) if core else [],
            "rounds": core.plan.rounds if core else 0,
            "records": [dict(r) for r in self.ledger.records],
            "events": [dict(e) for e in self.ledger.events],
        }

    def restore(self, state: Mapping[str, Any], *, federated: bool) -> None:
        """Resume between rounds: the weights come from the checkpoint; with a server, its global blocks win on rejoin."""
        core = self.core
        assert core is not None
        core.load_state_dict(state)
        if not federated:
            core.clean = [True] * len(core.clean)
        self.ledger.restore(state.get("records", []), state.get("events", []), core.round)
        self.done = core.round >= core.plan.rounds
        if federated:
            residuals = len(core.uplink.residuals) if core.uplink is not None else 0
            self.ledger.event("restored", round=core.round, **({"upload_residual_blocks": residuals} if residuals else {}))
