"""The server's part of the run report: a record per closed round, and the server's view of the run.

Pure functions of the server's state (no lock, file or socket); the
:class:`~pl_parablock.server.aggregator.Aggregator` calls them under its
lock. The keys are the report's (``report.json``'s ``server`` part and the
checkpoints' round records): add around them, rename none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pl_parablock.core.blocks import Partition
from pl_parablock.core.codecs import Compression
from pl_parablock.core.optimizers import ServerOptimizer

if TYPE_CHECKING:
    from pl_parablock.server.rounds import Round

__all__ = ["MAX_RECORDED_REJECTIONS", "describe_compression", "describe_optimizer", "round_record", "server_report"]

MAX_RECORDED_REJECTIONS = 1000
"""Refusals kept with their reasons per round (and outside rounds); beyond it they are only counted."""


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
    mode: str,
    clients: int,
    rounds_planned: int,
    schedule: Sequence[int],
    partition: Partition | None,
    server_lr: float,
    server_optimizer: ServerOptimizer | None,
    aggregation: str,
    compression: Compression,
    rounds: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    refused_outside: int,
    client_reports: Mapping[int, Any],
    joined: set[int],
    left: set[int],
    resumed_from: int | None,
    started_at: float,
    globals_sha256: str | None,
) -> dict[str, Any]:
    """The server's view of the run: rounds, rejections, client reports, dropped clients."""
    return {
        "mode": mode,
        "clients": clients,
        "rounds_planned": rounds_planned,
        "schedule": list(schedule),
        "blocks": partition.to_dict() if partition else [],
        "server_lr": server_lr,
        "server_optimizer": describe_optimizer(server_optimizer),
        "aggregation": aggregation,
        "compression": describe_compression(compression),
        "rounds": rounds,
        "rejected_outside_rounds": list(rejected),
        "rejected_outside_rounds_count": max(refused_outside, len(rejected)),
        "client_reports": {str(k): v for k, v in sorted(client_reports.items())},
        "joined": sorted(joined),
        "dropped": sorted(joined - left),
        "resumed_from_round": resumed_from,
        "started_at": started_at,
        "globals_sha256": globals_sha256,
    }
