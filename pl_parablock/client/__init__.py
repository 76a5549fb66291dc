"""What only a client process runs: the Lightning callback, its rounds and session, the transmitter, the transport.

A client module never imports :mod:`pl_parablock.server` (``tests/unit/test_layout.py`` checks it).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED_NAMES = {"ClientRounds": "pl_parablock.client.rounds", "ROUND_METRICS": "pl_parablock.client.rounds"}


def __getattr__(name: str) -> Any:
    """``from pl_parablock.client import ClientRounds`` (0.1's module ``pl_parablock/client.py``) still works, with a warning."""
    if name in _MOVED_NAMES:
        warnings.warn(
            f"pl_parablock.client.{name} moved in pl_parablock 0.2: import it from {_MOVED_NAMES[name]}; the old path goes in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED_NAMES[name]), name)
    raise AttributeError(f"module 'pl_parablock.client' has no attribute {name!r}")
