"""Server side and transports of a federation."""

from pl_parablock.aggregate import RoundAccumulator
from pl_parablock.algorithm import rebase
from pl_parablock.federation.aggregator import Aggregator, RefusedError
from pl_parablock.federation.link import Link
from pl_parablock.federation.server import TLS, FederationServer, tune_server_memory
from pl_parablock.federation.service import FederationService
from pl_parablock.federation.transport import GrpcTransport, InProcessTransport, Pulled, Pushed, Transport

__all__ = [
    "TLS",
    "Aggregator",
    "FederationServer",
    "FederationService",
    "GrpcTransport",
    "InProcessTransport",
    "Link",
    "Pulled",
    "Pushed",
    "RefusedError",
    "RoundAccumulator",
    "Transport",
    "rebase",
    "tune_server_memory",
]
