"""The server's part of the run report: a record per closed round, the refusals, and the server's view of the run.

Functions of the server's state with no file or socket; the
:class:`~pl_parablock.server.aggregator.Aggregator` calls them under its
lock, and :class:`Refusals` keeps the refused updates as the report shows
them. The keys are the report's (the server's part of ``report.json`` and
the checkpoints' round records): add around them, rename none.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from pl_parablock.core.codecs import Compression
from pl_parablock.core.optimizers import ServerOptimizer
from pl_parablock.core.tensors import digest
from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.wire.framing import short

if TYPE_CHECKING:
    from pl_parablock.server.admission import Admission, PlanSettings
    from pl_parablock.server.rounds import Aggregation, Round, Rounds

__all__ = ["MAX_RECORDED_REJECTIONS", "Refusals", "describe_compression", "describe_optimizer", "round_record", "server_report"]

log = logging.getLogger(__name__)
warn = RateLimitedLog(log)

MAX_RECORDED_REJECTIONS = 1000
"""Refusals kept with their reasons per round (and outside rounds); beyond it they are only counted."""


class Refusals:
    """Refused updates as the report shows them: with their reasons up to a bound, all counted.

    Args:
        lock: the federation's lock (it guards the rounds' records too).
        started_at: the server's start (wall clock), the origin of the times.
    """

    def __init__(self, lock: threading.Condition, started_at: float) -> None:
        self._cond = lock
        self.started_at = started_at
        self.outside: list[dict[str, Any]] = []  # refusals outside rounds, recorded with their reasons
        self.outside_count = 0  # also those beyond the recorded ones

    def note(self, record: dict[str, Any], reason: str, rnd: Round | None = None) -> None:
        """Record one refusal in its round (or outside rounds); warn, rate-limited per client.

        At most :data:`MAX_RECORDED_REJECTIONS` refusals are kept with their
        reasons per round (and outside rounds); the rest are counted only.
        """
        record = {k: (v if isinstance(v, int) and not isinstance(v, bool) else short(v, 40)) for k, v in record.items()}
        entry = {**record, "reason": reason, "at": time.time() - self.started_at}
        with self._cond:
            if rnd is not None:
                rnd.refused += 1
                if len(rnd.rejected) < MAX_RECORDED_REJECTIONS:
                    rnd.rejected.append(entry)
            else:
                self.outside_count += 1
                if len(self.outside) < MAX_RECORDED_REJECTIONS:
                    self.outside.append(entry)
        client = record.get("client")
        warn.warning(f"client {client}", "refused update from client %s for round %s: %s", client, record.get("round"), reason)


def describe_optimizer(opt: ServerOptimizer | None) -> dict[str, Any] | None:
    """The server optimizer as the report and the checkpoints name it."""
    if opt is None:
        return None
    return {"name": opt.name, "lr": opt.lr, "betas": [opt.beta1, opt.beta2], "tau": opt.tau}


def describe_compression(compression: Compression) -> dict[str, Any]:
    """The federation's codecs as the report and the checkpoints name them."""
    return {
        "upload": compression.upload.describe(),
        "download": compression.download.describe(),
        "error_feedback": compression.error_feedback,
    }


def round_record(rnd: Round, started_at: float) -> dict[str, Any]:
    """A round's record (times relative to ``started_at``): who was expected, arrived, refused, late; its loss."""
    losses = [(c["weight"], c["loss"]) for c in rnd.clients.values() if c.get("loss") is not None and c.get("weight")]
    total = sum(w for w, _ in losses)
    loss = sum(w * v for w, v in losses) / total if total > 0 else rnd.restored_loss
    return {
        "round": rnd.index,
        "block": rnd.block,
        "blocks": sorted(rnd.steps),
        "expected": len(rnd.expected),
        "expected_clients": list(rnd.expected),
        "arrived": len(rnd.clients),
        "rejected": max(rnd.refused, len(rnd.rejected)),
        "late": rnd.late,
        "aggregation_s": rnd.aggregation_s,
        "closed_at": rnd.closed_at - started_at if rnd.closed_at else None,
        "close_reason": rnd.reason,
        "loss": loss,
        "clients": sorted(rnd.clients),
        "clipped": sorted(c for c, v in rnd.clients.items() if v.get("clipped")),
        "rejections": [dict(r) for r in rnd.rejected],
    }


def server_report(
    *,
    settings: PlanSettings,
    aggregation: Aggregation,
    admission: Admission,
    rounds: Rounds,
    refusals: Refusals,
    resumed_from: int | None,
    evaluator: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The server's view of the run: rounds, rejections, client reports, dropped clients (caller holds the lock)."""
    plan = admission.plan
    return {
        "mode": settings.mode,
        "clients": settings.clients,
        "rounds_planned": settings.rounds,
        "schedule": list(plan.schedule) if plan is not None else [],
        "blocks": admission.partition.to_dict() if admission.partition else [],
        "server_lr": aggregation.server_lr,
        "server_optimizer": describe_optimizer(aggregation.server_optimizer),
        "aggregation": aggregation.rule.name,
        "compression": describe_compression(aggregation.compression),
        "rounds": [round_record(r, rounds.started_at) for r in rounds.closed()],
        "rejected_outside_rounds": list(refusals.outside),
        "rejected_outside_rounds_count": max(refusals.outside_count, len(refusals.outside)),
        "client_reports": {str(k): v for k, v in sorted(admission.reports.items())},
        "joined": sorted(admission.joined),
        "dropped": sorted(admission.joined - admission.left),
        "never_reported": sorted(admission.joined - set(admission.reports)),
        "resumed_from_round": resumed_from,
        "started_at": rounds.started_at,
        "globals_sha256": digest(rounds.global_state()) if admission.ready else None,
        "evaluator": evaluator,
    }
