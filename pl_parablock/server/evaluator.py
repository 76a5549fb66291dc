"""The evaluator's place on the server: the global model after the rounds it evaluates, held for it within a bound.

An evaluator (``python -m pl_parablock.fit RECIPE --role evaluator``) reads
the whole global model after round ``n`` (``n`` rounds aggregated; 0: the
initial model) block by block, evaluates it while training goes on, and
leaves with its report. It is not a client: no round waits for it, it
counts in no quorum and in no end-of-run wait for clients, and it reads no
version a client must pull.

:class:`EvaluatorDesk` keeps, as rounds close, the global after each
round of :attr:`~EvaluatorDesk.points` until the evaluator has read it:
references to block values that are never modified (no copy), so holding
them costs only the blocks replaced since. That cost is bounded
(``eval.hold_models`` copies of the model's blocks): an evaluator that
falls behind (or died) loses its oldest held points, and is answered with
the next one it can have, the newest at worst. The federation's lock guards it (the
:class:`~pl_parablock.server.aggregator.Aggregator`'s, re-entrant).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from pl_parablock.server.validation import RefusedError

if TYPE_CHECKING:
    from pl_parablock.server.admission import Admission
    from pl_parablock.server.rounds import Rounds

__all__ = ["EvaluatorDesk"]

log = logging.getLogger(__name__)

Blocks = list[dict[str, Tensor]]


def _nbytes(blocks: Blocks, skip: set[int] | None = None) -> int:
    seen: set[int] = set(skip or ())
    total = 0
    for block in blocks:
        for t in block.values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class EvaluatorDesk:
    """The global model after chosen rounds, held until the evaluator reads it; the evaluator's report.

    Args:
        lock: the federation's lock.
        points: hold the global after these numbers of rounds aggregated
            (``eval.every``'s points before the final model) for an
            evaluator; empty: hold nothing until an evaluator reads.
        hold_models: the most the held points may keep alive beyond the
            current global, in copies of the model's blocks (``eval.hold_models``).
        rounds: the server's rounds (the global and the rounds aggregated).
        admission: the server's admission (whether the initial state arrived).
    """

    def __init__(
        self,
        lock: threading.Condition,
        points: Collection[int] = (),
        hold_models: float = 2.0,
        *,
        rounds: Rounds | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._cond = lock
        self._rounds = rounds
        self._admission = admission
        self.configure(points, hold_models)
        self.held: dict[int, Blocks] = {}
        self.dropped: list[int] = []  # points let go before the evaluator asked for a later one (it may have read them)
        self.report: dict[str, Any] | None = None
        self.seen: float | None = None  # when the evaluator last read (time.time())
        self.left = False

    def configure(self, points: Collection[int], hold_models: float = 2.0) -> None:
        """Which points to hold for an evaluator, and within which bound (before the first round closes)."""
        if not hold_models > 0:
            raise ValueError(f"hold_models must be > 0, not {hold_models}")
        self.points = frozenset(points)
        self.hold_models = float(hold_models)

    def _current(self) -> tuple[int, Blocks] | None:
        """The rounds aggregated and the global's block values now; ``None`` before the initial state (caller holds the lock)."""
        if self._rounds is None or self._admission is None or not self._admission.ready:
            return None
        return self._rounds.next_round(), self._rounds.state.values

    def reached(self, rounds_done: int, values: Blocks) -> None:
        """``rounds_done`` rounds are aggregated and ``values`` is the global (caller holds the lock)."""
        if rounds_done in self.points and not self.left:
            self.held[rounds_done] = list(values)
        self._bound(values)

    def _bound(self, values: Blocks) -> None:
        """Drop the oldest held points while they keep more than ``hold_models`` models' bytes beyond the current global alive."""
        current = {id(t) for block in values for t in block.values()}
        limit = self.hold_models * _nbytes(values)
        while len(self.held) > 1 and _nbytes([b for held in self.held.values() for b in held], current) > limit:
            oldest = min(self.held)
            del self.held[oldest]
            self.dropped.append(oldest)
            log.warning(
                "the evaluator is behind: the global after %d rounds is let go (eval.hold_models); if it has not read it, "
                "it gets a later point",
                oldest,
            )

    def read(self, after: int, block: int) -> tuple[int, dict[str, Tensor]] | None:
        """Block ``block`` of the global after ``after`` rounds, or after the next point it can have; ``None``: not yet.

        Call it once ``after`` rounds are aggregated. Returns the point read
        and the block's tensors: the held point closest at or after
        ``after``; if none is held, the current global, held from now until
        the evaluator asks for a later point (so that all of its blocks
        come from one model). ``None`` before the initial state or before
        ``after`` rounds are aggregated.

        Raises:
            RefusedError: ``block`` is not a block of the model.
        """
        with self._cond:
            now = self._current()
            if now is None or now[0] < after:
                return None
            rounds_done, values = now
            if not 0 <= block < len(values):
                raise RefusedError(f"block {block} is outside 0..{len(values) - 1}", "invalid")
            self.seen = time.time()
            for n in [n for n in self.held if n < after]:
                del self.held[n]
            ahead = [n for n in self.held if n >= after]
            if ahead:
                point = min(ahead)
            else:
                point = rounds_done
                self.held[point] = list(values)
                self._bound(values)
            return point, self.held[point][block]

    def blocks(self) -> int:
        """Blocks of the model (0 before the initial state)."""
        with self._cond:
            now = self._current()
            return len(now[1]) if now is not None else 0

    def leave(self, report: Mapping[str, Any] | None) -> None:
        """The evaluator is done: keep its report, hold nothing more."""
        with self._cond:
            self.report = dict(report) if report else {}
            self.held.clear()
            self.left = True
            self._cond.notify_all()

    def summary(self) -> dict[str, Any] | None:
        """The evaluator's part of the server report (caller holds the lock); ``None`` when no evaluator read."""
        if self.seen is None and self.report is None:
            return None
        return {"report": self.report, "left": self.left, "dropped_points": list(self.dropped)}
