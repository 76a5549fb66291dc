"""pl_parablock: federated fine-tuning of LLMs by block coordinate descent, with ParaBlock.

Public API::

    from pl_parablock import FederatedBlockStrategy, ParaBlockModule, load_recipe
"""

from pl_parablock.blocks import Block, Partition, make_schedule, partition_model, whole_model_partition
from pl_parablock.config import Recipe, load_recipe
from pl_parablock.errors import ConfigError, DataError, FederationError, ModelError, ParaBlockError, TransmitterError
from pl_parablock.federation import Aggregator, FederationServer, FederationService, GrpcTransport, InProcessTransport, Link, Transport
from pl_parablock.module import ParaBlockModule
from pl_parablock.strategy import FederatedBlockStrategy
from pl_parablock.transmitter import Transmitter

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
