"""pl_parablock: federated fine-tuning of LLMs by block coordinate descent, with ParaBlock.

Public API::

    from pl_parablock import FederatedBlockStrategy, ParaBlockModule, load_recipe

The names are imported when first used (PEP 562), so ``import pl_parablock``
and a command that needs no model (``python -m pl_parablock.fit --role
server``, the launcher before it starts its clients) do not pay for torch,
Lightning and transformers up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pl_parablock import _compat  # noqa: F401  (0.1's module paths, for one release)

if TYPE_CHECKING:
    from pl_parablock.client.inprocess import InProcessTransport
    from pl_parablock.client.strategy import FederatedBlockStrategy
    from pl_parablock.client.transmitter import Transmitter
    from pl_parablock.client.transport import GrpcTransport, Transport
    from pl_parablock.core.blocks import Block, Partition, make_schedule, partition_model, whole_model_partition
    from pl_parablock.errors import ConfigError, DataError, FederationError, ModelError, ParaBlockError, TransmitterError
    from pl_parablock.model.module import ParaBlockModule
    from pl_parablock.recipe.load import load_recipe
    from pl_parablock.recipe.schema import Recipe
    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.grpc_server import FederationServer
    from pl_parablock.server.service import FederationService
    from pl_parablock.wire.link import Link

__version__ = "0.1.0"

_HOMES = {
    "InProcessTransport": "pl_parablock.client.inprocess",
    "FederatedBlockStrategy": "pl_parablock.client.strategy",
    "Transmitter": "pl_parablock.client.transmitter",
    "GrpcTransport": "pl_parablock.client.transport",
    "Transport": "pl_parablock.client.transport",
    "Block": "pl_parablock.core.blocks",
    "Partition": "pl_parablock.core.blocks",
    "make_schedule": "pl_parablock.core.blocks",
    "partition_model": "pl_parablock.core.blocks",
    "whole_model_partition": "pl_parablock.core.blocks",
    "ConfigError": "pl_parablock.errors",
    "DataError": "pl_parablock.errors",
    "FederationError": "pl_parablock.errors",
    "ModelError": "pl_parablock.errors",
    "ParaBlockError": "pl_parablock.errors",
    "TransmitterError": "pl_parablock.errors",
    "ParaBlockModule": "pl_parablock.model.module",
    "load_recipe": "pl_parablock.recipe.load",
    "Recipe": "pl_parablock.recipe.schema",
    "Aggregator": "pl_parablock.server.aggregator",
    "FederationServer": "pl_parablock.server.grpc_server",
    "FederationService": "pl_parablock.server.service",
    "Link": "pl_parablock.wire.link",
}
"""Where each public name lives: imported from there on first use."""


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pl_parablock' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "Aggregator",
    "Block",
    "ConfigError",
    "DataError",
    "FederatedBlockStrategy",
    "FederationError",
    "FederationServer",
    "FederationService",
    "GrpcTransport",
    "InProcessTransport",
    "Link",
    "ModelError",
    "ParaBlockError",
    "ParaBlockModule",
    "Partition",
    "Recipe",
    "Transmitter",
    "TransmitterError",
    "Transport",
    "__version__",
    "load_recipe",
    "make_schedule",
    "partition_model",
    "whole_model_partition",
]
