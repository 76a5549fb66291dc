"""The client's side of the algorithm (DESIGN §1, §1.1): its round state machine, the rebase, what it hands off.

:class:`ClientCore` decides, for one client, when a round begins and which
aggregates must be in place first (the plan's staleness), what the round's
update is (the end value ``e`` or the delta ``e − s``, compressed with the
client's residual), and how an aggregate ``g'`` lands: :func:`rebase`,
``θ[b] ← g' + (θ[b] − e)``. The Lightning callback, the reference and the
simulator drive it; none decides anything of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pl_parablock.core.codecs import NO_COMPRESSION, Compression, ErrorFeedback, advance
from pl_parablock.core.plan import AlgorithmError, Plan, client_weight
from pl_parablock.core.tensors import cpu_copy
from pl_parablock.errors import ResyncNeeded


def rebase(local: Tensor, end: Tensor, new_global: Tensor, mix: float = 1.0) -> Tensor:
    """Block-level correction: ``new_global + mix · (local − end)``.

    ``end`` is the block's value when it was handed off, ``local`` its value
    now: the result is the aggregate plus the local progress made since the
    hand-off. ``mix`` (``α``, ``federation.stale_mix``) damps that progress,
    as Streaming DiLoCo mixes local and global parameters; at 1 (the
    paper's rebase) no multiplication happens, so the result is bitwise the
    undamped one. Returns a new tensor on ``local``'s device and dtype.
    """
    g = new_global.to(device=local.device, dtype=local.dtype)
    e = end.to(device=local.device, dtype=local.dtype)
    return g + (local - e) if mix == 1.0 else g + mix * (local - e)


# ---------------------------------------------------------------------------------------------------- client


@dataclass
class Update:
    """What a client hands to the transmitter at the end of a round (or for a round it skips)."""

    round: int
    block: int
    kind: str
    base_version: int
    weight: float
    tensors: dict[str, Tensor] | None = field(repr=False)
    loss: float | None = None
    codec: str = "none"
    """The codec ``tensors`` are parts of (:mod:`pl_parablock.core.codecs`); ``none``: the tensors themselves."""
    encoder: ErrorFeedback | None = field(default=None, repr=False)
    """Set while ``tensors`` is still the plain delta: :meth:`encode` compresses it (off the training thread)."""

    def encode(self) -> None:
        """Compress ``tensors`` into ``codec``'s parts, ``Q(Δ + r)``, updating the sender's residual; once, in hand-off order.

        The transmitter calls it before the upload, so the codec's work does
        not stall training; the reference and the simulator at once.
        """
        if self.encoder is not None and self.tensors is not None:
            self.tensors = self.encoder.compress(self.block, self.tensors)[0]
        self.encoder = None


@dataclass(frozen=True)
class RoundStart:
    """Round ``round`` begins: train ``block`` alone; with ``fresh_optimizer_state``, drop its optimizer state first."""

    round: int
    block: int
    fresh_optimizer_state: bool


@dataclass
class _Open:
    round: int
    block: int
    start: dict[str, Tensor] | None  # s, kept only when a delta will be sent
    start_version: int


class ClientCore:
    """One client's round state machine over the live tensors of its blocks.

    The driver calls, in this order for every round ``t``: :meth:`awaiting`
    (the rounds whose aggregates it must deliver first, each through
    :meth:`apply`), then :meth:`skip` if the client is not sampled for ``t``,
    else :meth:`begin`, ``K`` optimizer steps, and :meth:`end`; after the last
    round, :meth:`awaiting` again until :attr:`finished`. The core mutates the
    block tensors in place (under ``no_grad``) only in :meth:`apply` and
    :meth:`adopt`.

    Args:
        plan: the federation's plan.
        client_id: this client.
        blocks: the live tensors of every block, by name (e.g. the module's
            parameters); index = block.
        compression: how updates and aggregates travel. A lossless upload
            lets a client that started from the global send its end value;
            a lossy one always sends the compressed delta ``Q(Δ + r)``,
            keeping the residual ``r`` of each block (on the CPU). A lossy
            download makes the client keep, for every block its live
            tensors do not hold exactly, a CPU copy of the block's global
            value, so that it can form ``g + D`` as the server does.

    Raises:
        AlgorithmError: a call out of order (an aggregate applied early, late,
            twice, or of another version than the round's).
    """

    def __init__(
        self, plan: Plan, client_id: int, blocks: Sequence[Mapping[str, Tensor]], *, compression: Compression = NO_COMPRESSION
    ) -> None:
        if len(blocks) != plan.num_blocks:
            raise AlgorithmError(f"the plan has {plan.num_blocks} blocks, the client {len(blocks)}")
        self.plan = plan
        self.client_id = client_id
        self.blocks = [dict(b) for b in blocks]
        self.compression = compression
        self.exact_uploads = not compression.lossy_upload
        self.uplink = ErrorFeedback(compression.upload, compression.error_feedback) if compression.lossy_upload else None
        # block -> its exact global value, where the live tensors do not hold it (lossy downloads only)
        self.globals: list[dict[str, Tensor] | None] = [None] * plan.num_blocks
        self.round = 0
        self.next_apply = 0
        self.versions = [-1] * plan.num_blocks
        self.clean = [True] * plan.num_blocks  # the block holds exactly its global value of `versions[b]`
        # round -> {block the round moves: this client's hand-off value e of it, kept only if the rebase needs it}
        self.inflight: dict[int, dict[int, dict[str, Tensor] | None]] = {}
        self.open: _Open | None = None
        self.catching_up = False  # cyclic: blocks changed since this client's last turn are still to be fetched

    # ------------------------------------------------------------ queries

    @property
    def finished(self) -> bool:
        """Every round trained (or skipped) and every aggregate applied."""
        return self.round >= self.plan.rounds and self.next_apply >= self.plan.rounds and self.open is None

    @property
    def active_block(self) -> int | None:
        return self.open.block if self.open is not None else None

    def awaiting(self) -> list[int]:
        """Rounds whose aggregates must be applied, in this order, before the next step."""
        if self.open is not None:
            return []
        return list(range(self.next_apply, self.plan.applied_before(self.round) + 1))

    def participates(self) -> bool:
        """Whether this client trains the next round."""
        return self.plan.participates(self.client_id, self.round)

    # ------------------------------------------------------------ round steps

    def _check_ready(self) -> int:
        t = self.round
        if self.open is not None:
            raise AlgorithmError(f"client {self.client_id}: round {self.open.round} is still open")
        if t >= self.plan.rounds:
            raise AlgorithmError(f"client {self.client_id}: all {self.plan.rounds} rounds are done")
        if self.awaiting():
            raise AlgorithmError(
                f"client {self.client_id}: round {t} cannot begin before the aggregate of round {self.next_apply} is applied"
            )
        return t

    def begin(self) -> RoundStart:
        """Open round ``t``: block ``b_t`` trains from ``s``, its current value."""
        t = self._check_ready()
        if not self.participates():
            raise AlgorithmError(f"client {self.client_id} is not sampled for round {t}; call skip()")
        if self.catching_up:
            raise AlgorithmError(f"client {self.client_id}: fetch the blocks changed since its last turn before round {t}")
        b = self.plan.block_for(self.client_id, t)
        pending = any(b in blocks for blocks in self.inflight.values())
        from_global = self.clean[b] and not pending and self.exact_uploads
        self.open = _Open(t, b, None if from_global else cpu_copy(self.blocks[b]), self.versions[b])
        if self.compression.lossy_download and self.clean[b] and self.globals[b] is None:
            self.globals[b] = self.open.start if self.open.start is not None else cpu_copy(self.blocks[b])
        return RoundStart(t, b, fresh_optimizer_state=not self.plan.keep_optimizer_state)

    def end(self, *, samples: int, tokens: int, shard: int, weighting: str, loss: float | None = None) -> Update:
        """Close the open round: the update ``e`` or ``e − s`` with its weight ``w_i``."""
        if self.open is None:
            raise AlgorithmError(f"client {self.client_id}: no round is open")
        o, self.open = self.open, None
        e = cpu_copy(self.blocks[o.block])
        codec = "none"
        if o.start is None:
            kind, payload = "value", e
        else:
            kind, payload = "delta", {n: e[n] - o.start[n] for n in e}
            if self.uplink is not None:
                codec = self.compression.upload.name  # compressed by Update.encode, in hand-off order
        self.inflight[o.round] = self._handed(o.round, own=(o.block, e))
        self.clean[o.block] = False
        self.round = o.round + 1
        weight = client_weight(weighting, samples=samples, tokens=tokens, shard=shard)
        return Update(o.round, o.block, kind, o.start_version, weight, payload, loss, codec, self.uplink if codec != "none" else None)

    def skip(self) -> Update | None:
        """A round this client is not sampled for: nothing trains; its aggregate is fetched and applied in turn.

        ``cyclic``: only the round just before the client's next turn (or the
        last round) is fetched (the client waits for its turn, or the end);
        the blocks other rounds changed are fetched once each, before its
        turn or at the end (:attr:`catching_up`).
        Returns ``None`` when nothing is to be fetched.
        """
        t = self._check_ready()
        if self.participates():
            raise AlgorithmError(f"client {self.client_id} is sampled for round {t}; call begin()")
        b = self.plan.block_for(self.client_id, t)
        if self.plan.relay:
            self.catching_up = True
            if not self.plan.participates(self.client_id, t + 1) and t + 1 < self.plan.rounds:
                self.round = self.next_apply = t + 1
                return None
        self.inflight[t] = self._handed(t)
        self.round = t + 1
        return Update(t, b, "none", self.versions[b], 0.0, None)

    def _handed(self, t: int, own: tuple[int, dict[str, Tensor]] | None = None) -> dict[int, dict[str, Tensor] | None]:
        """What round ``t`` leaves in flight: each block it moves, with this client's value ``e`` where the rebase will need it."""
        out: dict[int, dict[str, Tensor] | None] = {}
        for blk in self.plan.blocks_of(t):
            if not self.plan.trains_again_before_apply(t, blk, self.client_id):
                out[blk] = None
            elif own is not None and own[0] == blk:
                out[blk] = own[1]
            else:
                out[blk] = cpu_copy(self.blocks[blk])
        return out

    def global_value(self, block: int) -> dict[str, Tensor] | None:
        """The exact global value of ``block`` at :attr:`versions` ``[block]`` as this client holds it, or ``None`` if unknown."""
        kept = self.globals[block]
        if kept is not None:
            return kept
        if self.clean[block] and not (self.open is not None and self.open.block == block):
            return self.blocks[block]
        return None

    def compressed_aggregate(self, round_index: int, delta: Mapping[str, Tensor], base_versions: Mapping[int, int]) -> dict[str, Tensor]:
        """The aggregate ``g' = g + D`` of ``round_index`` from its decoded broadcast ``D`` (every block the round moves).

        Raises:
            ResyncNeeded: this client does not hold the version of a block
                ``D`` applies to (it must adopt the server's values).
        """
        out: dict[str, Tensor] = {}
        for b in self.plan.blocks_of(round_index):
            base = base_versions.get(b)
            g = self.global_value(b)
            if g is None or base != self.versions[b]:
                held = self.versions[b] if g is not None else "no exact copy"
                raise ResyncNeeded(
                    f"client {self.client_id}: the aggregate of round {round_index} applies to version {base} of block {b}; "
                    f"this client holds {held}"
                )
            for n, t in g.items():
                if n not in delta or tuple(delta[n].shape) != tuple(t.shape):
                    raise ResyncNeeded(f"client {self.client_id}: the aggregate of round {round_index} lacks tensor {n!r} of its shape")
                out[n] = advance(t, delta[n])
        return out

    def apply(self, round_index: int, version: int, new_global: Mapping[str, Tensor]) -> None:
        """Apply the aggregate ``g'`` of ``round_index`` (version ``round_index`` exactly) by the rebase."""
        if round_index != self.next_apply:
            raise AlgorithmError(
                f"client {self.client_id}: aggregate of round {round_index} applied out of turn (next is {self.next_apply})"
            )
        if round_index not in self.inflight:
            raise AlgorithmError(f"client {self.client_id}: round {round_index} was never handed off")
        if version != round_index:
            raise AlgorithmError(f"client {self.client_id}: asked for version {round_index} of the block, got version {version}")
        keep = self.compression.lossy_download
        for b, end in self.inflight.pop(round_index).items():
            later = [q for q, blocks in self.inflight.items() if b in blocks and q > round_index]
            trained = [q for q in later if self.plan.participates(self.client_id, q) and self.plan.block_for(self.client_id, q) == b]
            if not trained and not (self.open is not None and self.open.block == b):
                # untouched since the hand-off: the aggregate replaces it, and so do later hand-offs kept of it
                self._copy_in(b, new_global)
                self.clean[b] = True
                self.globals[b] = None
                for q in later:
                    if self.inflight[q][b] is not None:
                        self.inflight[q][b] = cpu_copy(self.blocks[b])
            else:
                if end is None:
                    raise AlgorithmError(f"client {self.client_id}: block {b} trained again before round {round_index}'s aggregate arrived")
                with torch.no_grad():
                    for n, p in self.blocks[b].items():
                        p.copy_(rebase(p, end[n], new_global[n], self.plan.mix))
                for q in later:
                    e_q = self.inflight[q][b]
                    if e_q is not None:
                        self.inflight[q][b] = {n: rebase(e_q[n], end[n], new_global[n], self.plan.mix) for n in e_q}
                if self.open is not None and self.open.block == b and self.open.start is not None:
                    self.open.start = {n: rebase(self.open.start[n], end[n], new_global[n], self.plan.mix) for n in end}
                self.clean[b] = False
                if keep:
                    self.globals[b] = {n: new_global[n].detach().to("cpu", copy=True) for n in self.blocks[b]}
            self.versions[b] = version
        self.next_apply = round_index + 1

    # ------------------------------------------------------------ joining

    def adopt(self, block: int, version: int, new_global: Mapping[str, Tensor]) -> None:
        """Hold the server's current global value of ``block`` (join, rejoin, resync)."""
        self._copy_in(block, new_global)
        self.versions[block] = version
        self.clean[block] = True
        self.globals[block] = None

    def caught_up(self) -> None:
        """``cyclic``: the blocks changed since this client's last turn are now held (:meth:`adopt`)."""
        self.catching_up = False

    def restart_at(self, next_round: int) -> None:
        """Continue from the server's first round not yet aggregated (its blocks adopted); hand-offs in flight are dropped."""
        self.catching_up = False
        self.inflight.clear()
        self.open = None
        self.round = self.next_apply = next_round

    def mark_unverified(self) -> None:
        """The blocks may not hold their global values (restored from a checkpoint, server restarted)."""
        self.clean = [False] * self.plan.num_blocks
        self.globals = [None] * self.plan.num_blocks

    def _copy_in(self, block: int, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.blocks[block].items():
                p.copy_(tensors[n])

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from (between rounds), with the upload residuals ``r`` of error feedback.

        The residuals are those after the last hand-off the transmitter
        compressed: what the codec dropped so far, which a restarted client
        adds to its next update of each block instead of losing it.
        """
        state: dict[str, Any] = {"round": self.round, "versions": list(self.versions)}
        if self.uplink is not None and self.uplink.enabled:
            state["upload_residuals"] = self.uplink.state_tensors()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.restart_at(int(state["round"]))
        self.versions = [int(v) for v in state.get("versions", self.versions)]
        self.mark_unverified()
        if self.uplink is not None and self.uplink.enabled and state.get("upload_residuals"):
            self.uplink.load_state_tensors(state["upload_residuals"])

    def keep_residuals(self, previous: ClientCore) -> None:
        """Take ``previous``'s upload residuals (a rejoin builds a new core; what the codec dropped is not lost)."""
        if self.uplink is not None and previous.uplink is not None and self.uplink.codec.name == previous.uplink.codec.name:
            self.uplink.residuals = previous.uplink.residuals


def activate(blocks: Sequence[Mapping[str, Tensor]], start: RoundStart, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Step 1 of a round on the live parameters: block ``start.block`` alone trains.

    Every other block is frozen and its gradients dropped; with
    ``start.fresh_optimizer_state`` every block's optimizer state is dropped,
    so the active block's is created fresh by its first step and only the
    active block ever holds optimizer state (BAdam's memory saving).
    """
    for b, params in enumerate(blocks):
        for p in params.values():
            p.requires_grad_(b == start.block)
            if b != start.block:
                p.grad = None
    if start.fresh_optimizer_state:
        for opt in optimizers:
            for params in blocks:
                for p in params.values():
                    opt.state.pop(p, None)
