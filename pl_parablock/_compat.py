"""The module paths of 0.1, kept for one release: importing one warns and gives the module's new home.

0.2 laid the package out by who runs the code (``core/``, ``server/``,
``client/``, ``wire/``, ``recipe/``, ``model/``). Code that imports an old
path (``from pl_parablock.algorithm import ClientCore``,
``import pl_parablock.federation.transport``) keeps working: the old name
is a module that holds every name of its new home(s) and warns once with
:class:`DeprecationWarning` naming where to import from. The public API
(``from pl_parablock import ...``) never moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

_CORE = ("core.plan", "core.tensors", "core.client", "core.codecs", "core.optimizers", "core.server")

MOVED: dict[str, tuple[str, ...]] = {
    "algorithm": _CORE,
    "aggregate": ("core.aggregate",),
    "blocks": ("core.blocks",),
    "compression": ("core.codecs",),
    # config.py also held names it imported from the core (Codec, CYCLIC_ORDERS): the core's modules come last
    "config": ("recipe.schema", "recipe.load", "recipe.validate", "recipe.build", "recipe.docs", "core.plan", "core.codecs"),
    "module": ("model.module",),
    "models": ("model.build",),
    "metrics": ("model.metrics",),
    "strategy": ("client.strategy",),
    "rounds": ("client.ledger",),
    "session": ("client.session",),
    "transmitter": ("client.transmitter",),
    "evaluation": ("client.evaluation",),
    "checkpoint": ("client.checkpoint",),
    "runner": ("client.runner",),
    "federation": (
        "server.aggregator",
        "server.service",
        "server.grpc_server",
        "client.inprocess",
        "wire.channel",
        "wire.link",
        "client.transport",
    ),
    "federation.aggregator": (
        "server.aggregator",
        "server.admission",
        "server.validation",
        "server.intake",
        "server.rounds",
        "server.checkpoint",
        "server.report",
    ),
    "federation.service": ("server.service",),
    "federation.server": ("server.grpc_server", "server.guards", "server.carriers"),
    "federation._ratelimit": ("server._ratelimit",),
    "federation.inprocess": ("client.inprocess",),
    "federation.transport": ("client.transport",),
    "federation.wire": ("wire.framing",),
    "federation.channel": ("wire.channel",),
    "federation.link": ("wire.link",),
    "federation.dataplane": ("wire.dataplane", "server.dataplane", "client.dataplane"),
    "simulation.profile": ("recipe.profile",),
}
"""Old path (under ``pl_parablock.``) -> its new home(s). ``pl_parablock.client`` (``ClientRounds``) is now a
package; :mod:`pl_parablock.client` forwards its two names with the same warning."""

_PACKAGES = {"federation"}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path of :data:`MOVED` and fills a module with its new homes' names."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("pl_parablock.")
        if not fullname.startswith("pl_parablock.") or old not in MOVED:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, self, is_package=old in _PACKAGES)
        if old in _PACKAGES:
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        homes = [f"pl_parablock.{m}" for m in MOVED[module.__name__.removeprefix("pl_parablock.")]]
        warnings.warn(
            f"{module.__name__} moved in pl_parablock 0.2: import from {' or '.join(homes)}; the old path goes in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        for home in reversed(homes):  # the first home wins a name two of them define
            new = importlib.import_module(home)
            module.__dict__.update({k: v for k, v in vars(new).items() if not (k.startswith("__") and k.endswith("__"))})
        module.__doc__ = f"Moved: see {', '.join(homes)}."


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


install()
