"""A federation's server side, its client side, and what they share.

* shared: :mod:`~pl_parablock.federation.wire` (framing of the messages),
  :mod:`~pl_parablock.federation.channel` (protocol names, gRPC options,
  token metadata, :class:`TLS`), :mod:`~pl_parablock.aggregate`
  (the arithmetic of aggregation and rebasing);
* client side: :mod:`~pl_parablock.federation.transport` (:class:`Transport`,
  :class:`GrpcTransport`), :mod:`~pl_parablock.federation.link` (the emulated link);
* server side: :mod:`~pl_parablock.federation.aggregator` (the global state),
  :mod:`~pl_parablock.federation.service` (the protocol's handlers),
  :mod:`~pl_parablock.federation.server` (the gRPC server);
* :mod:`~pl_parablock.federation.inprocess` (:class:`InProcessTransport`)
  joins both sides in one process.

Neither side imports the other (``tests/unit/test_layout.py`` checks it);
this package re-exports both, so importing it loads the server side.
"""

from pl_parablock.aggregate import RoundAccumulator
from pl_parablock.algorithm import rebase
from pl_parablock.federation.aggregator import Aggregator, RefusedError
from pl_parablock.federation.channel import TLS
from pl_parablock.federation.inprocess import InProcessTransport
from pl_parablock.federation.link import Link
from pl_parablock.federation.server import FederationServer, tune_server_memory
from pl_parablock.federation.service import FederationService
from pl_parablock.federation.transport import GrpcTransport, Pulled, Pushed, Transport

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
