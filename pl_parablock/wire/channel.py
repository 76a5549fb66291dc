"""What both ends of a gRPC federation channel agree on.

The client side (:mod:`pl_parablock.client.transport`) and the server side
(:mod:`pl_parablock.server.grpc_server`) both import this module and neither
imports the other:

* the protocol's names: the gRPC service :data:`SERVICE_NAME` and its
  :data:`METHODS` with their call kinds (the messages themselves are
  described in :mod:`pl_parablock.server.service` and framed by
  :mod:`pl_parablock.wire.framing`; ``Admit`` is the server's own: it
  grants a turn to upload, see :class:`~pl_parablock.server.grpc_server.FederationServer`);
* the channel options of each end (:data:`MESSAGE_OPTIONS`,
  :data:`CLIENT_OPTIONS`, :data:`SERVER_OPTIONS`);
* the bearer token in the ``authorization`` metadata
  (:func:`token_metadata`, :func:`bearer_token`);
* :class:`TLS` files and the credentials made from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from pl_parablock.errors import FederationError

__all__ = [
    "CLIENT_OPTIONS",
    "MESSAGE_OPTIONS",
    "METHODS",
    "SERVER_OPTIONS",
    "SERVICE_NAME",
    "TLS",
    "UPLOADS",
    "UPLOAD_SLOT",
    "bearer_token",
    "token_metadata",
]

SERVICE_NAME = "pl_parablock.Federation"
METHODS = {
    "Join": "unary",
    "UploadState": "stream_unary",
    "Push": "stream_unary",
    "Pull": "unary_stream",
    "Versions": "unary",
    "Leave": "unary",
    "Admit": "unary",
}
UPLOADS = ("Push", "UploadState")
"""The methods whose requests carry blocks: a client asks ``Admit`` for a turn before it opens one."""
UPLOAD_SLOT = "pl-parablock-upload-slot"
"""Metadata key of the turn ``Admit`` granted, sent with the upload that uses it."""

MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
# Clients ping every 30 s so a dead peer is noticed during long polls and
# reconnect quickly after a server restart; the server accepts pings that often.
CLIENT_OPTIONS = [
    *MESSAGE_OPTIONS,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
SERVER_OPTIONS = [
    *MESSAGE_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_AUTHORIZATION = "authorization"
_BEARER = "Bearer "


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries ``token`` (``None``: no token, no metadata)."""
    return ((_AUTHORIZATION, f"{_BEARER}{token}"),) if token else None


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The bearer token of a call's metadata, if any."""
    for key, value in metadata or ():
        if key == _AUTHORIZATION and isinstance(value, str) and value.startswith(_BEARER):
            return value[len(_BEARER) :]
    return None


@dataclass(frozen=True)
class TLS:
    """TLS files. Server: ``cert`` and ``key`` (and ``ca`` to require client
    certificates). Client: ``ca`` to verify the server (its certificate, when
    self-signed), and optionally its own ``cert`` and ``key``."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @staticmethod
    def _read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise FederationError(f"cannot read the TLS {what} {path!r}: {exc.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise FederationError("a TLS server needs federation.tls.cert and federation.tls.key")
        pair = (self._read(self.key, "key"), self._read(self.cert, "certificate"))
        ca = self._read(self.ca, "CA certificate")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca, "CA certificate"),
            private_key=self._read(self.key, "key") if self.cert else None,
            certificate_chain=self._read(self.cert, "certificate") if self.key else None,
        )
