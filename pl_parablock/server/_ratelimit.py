"""Warnings the server logs about its peers, at most a few per peer and minute.

A peer that sends bad requests in a loop must not fill the server's log (or
its disk): :class:`RateLimitedLog` lets ``burst`` messages per key through in
every ``period_s`` window, counts the rest, and says how many it held back
with the next message of that key it lets through. It keeps at most
``max_keys`` keys (the oldest are forgotten), so a peer inventing keys cannot
grow it either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """A logger's warnings, rate-limited per key (a peer, a client).

    Args:
        logger: where the messages go.
        burst: messages per key let through in each window.
        period_s: the window, seconds.
        max_keys: keys remembered at most.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 5, period_s: float = 60.0, max_keys: int = 1024) -> None:
        self.logger = logger
        self.burst = burst
        self.period_s = period_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, list[float]] = OrderedDict()  # key -> [window start, sent, held back]

    def log(self, level: int, key: object, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` used up its burst; returns whether it was logged."""
        now = time.monotonic()
        name = str(key)[:120]
        with self._lock:
            entry = self._keys.get(name)
            if entry is None or now - entry[0] >= self.period_s:
                held = int(entry[2]) if entry is not None else 0
                entry = [now, 0.0, 0.0]
                if held:
                    msg = f"{msg} (and {held} similar messages about {name} held back)"
            self._keys[name] = entry
            self._keys.move_to_end(name)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            if entry[1] >= self.burst:
                entry[2] += 1
                return False
            entry[1] += 1
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: object, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
