"""pl_parablock: federated fine-tuning of LLMs by block coordinate descent, with ParaBlock.

Public API::

    from pl_parablock import FederatedBlockStrategy, ParaBlockModule, load_recipe
"""

from pl_parablock import _compat  # noqa: F401  (0.1's module paths, for one release)
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
