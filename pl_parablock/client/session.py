"""A client's link to the federation: join, retry, resync, the transmitter thread, leave, shutdown.

:class:`ClientSession` owns everything a client does on the network, as
torchft's Manager owns its transport; the Lightning callback only calls it.
A client made of several processes (a multi-device client) is one
federation client: only global rank 0 talks to the server, and
:meth:`ClientSession.lead` hands rank 0's result, or its failure, to every
rank, so every rank freezes, rebases and advances identically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from pl_parablock.client.transmitter import Arrival, Transmitter
from pl_parablock.client.transport import GrpcTransport, Pulled, Transport
from pl_parablock.core.blocks import Partition
from pl_parablock.core.client import ClientCore, Update
from pl_parablock.core.codecs import NO_COMPRESSION, Compression
from pl_parablock.core.plan import Plan
from pl_parablock.errors import ParaBlockError, ResyncNeeded, ServerRestarted, TransmitterError, TransportError
from pl_parablock.recipe.build import TOKEN_ENV
from pl_parablock.wire.framing import dtype_name
from pl_parablock.wire.link import Link

if TYPE_CHECKING:
    from pl_parablock.wire.channel import TLS

__all__ = ["TOKEN_ENV", "ClientSession", "model_fingerprint"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def model_fingerprint(module: nn.Module, partition: Partition, mode: str) -> dict[str, Any]:
    """Names, shapes and dtypes of the block tensors plus a hash of every weight.

    Clients of one federation must agree on all of it; the hash covers the
    frozen weights too, since the global model is assembled from them.
    """
    params = dict(module.named_parameters())
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    tensors = {
        n: {"dtype": dtype_name(params[n].dtype), "shape": list(params[n].shape), "nbytes": params[n].numel() * params[n].element_size()}
        for n in partition.param_names
    }
    return {"mode": mode, "partition": partition.to_dict(), "tensors": tensors, "hash": h.hexdigest()}


class ClientSession:
    """One client's connection to the federation server.

    Args:
        server: ``"HOST:PORT"`` or a :class:`~pl_parablock.client.transport.Transport`.
        client_id: this client's id.
        timeout_s: longest single network wait, seconds.
        link: emulated link (a ``"HOST:PORT"`` server only).
        compression: the federation's codecs (see :class:`~pl_parablock.core.codecs.Compression`).
        delta_downloads: ask for compressed broadcasts of the aggregates
            (when the download codec is lossy; not in cyclic mode).
        chunk_kb: chunk size of streamed blocks, KiB.
        token: the federation's (or this client's) token; ``None`` reads
            ``PL_PARABLOCK_TOKEN`` from the environment. An explicit token wins.
        tls: CA certificate (and optional client certificate) of a TLS server.
        dist: the Trainer's strategy (its ``broadcast``) when the client
            spans several processes; ``None`` for one process.
        leader: whether this process is global rank 0.
    """

    def __init__(
        self,
        server: str | Transport,
        client_id: int,
        *,
        timeout_s: float,
        link: Link | None = None,
        compression: Compression = NO_COMPRESSION,
        delta_downloads: bool = True,
        chunk_kb: int = 1024,
        token: str | None = None,
        tls: TLS | None = None,
        dist: Any = None,
        leader: bool = True,
    ) -> None:
        self.server = server
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.dist = dist
        self.leader = leader
        self.instance: str | None = None
        self.transport: Transport | None = None
        self._owns_transport = False
        self._transmitter: Transmitter | None = None
        self._left = False
        if not leader:
            return
        if isinstance(server, Transport):
            self.transport = server
            server.compression = compression  # the client's codecs, whoever built the transport
            server.delta_downloads = delta_downloads and compression.lossy_download
        else:
            self.transport = GrpcTransport(
                server,
                link=link,
                chunk_bytes=chunk_kb * 1024,
                compression=compression,
                delta_downloads=delta_downloads,
                connect_timeout_s=min(timeout_s, 60.0),
                token=token if token is not None else os.environ.get(TOKEN_ENV),
                tls=tls,
            )
            self._owns_transport = True

    def describe(self) -> str:
        return self.transport.describe() if self.transport is not None else "rank 0"

    def lead(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on global rank 0 only and hand its result, or its failure, to every rank."""
        if self.dist is None:
            return fn()
        payload: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.leader:
            try:
                payload = ("ok", fn())
            except ResyncNeeded as exc:
                payload, error = ("resync", str(exc)), exc
            except TransmitterError as exc:
                kind = "resync" if isinstance(exc.__cause__, ResyncNeeded) else "error"
                payload, error = (kind, str(exc)), exc
            except BaseException as exc:
                payload, error = ("error", f"{type(exc).__name__}: {exc}"), exc
        kind, value = self.dist.broadcast(payload, src=0)
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        if error is not None:
            raise error
        if kind == "resync":
            raise ServerRestarted(value)
        raise TransmitterError(f"client {self.client_id} (rank 0): {value}")

    # ------------------------------------------------------------ joining

    def join(self, fingerprint: Mapping[str, Any], initial_state: Callable[[], Mapping[str, Tensor]]) -> dict[str, Any]:
        """Join (or rejoin), retrying while the server is unreachable; upload the initial state if asked.

        Returns the server's reply (schedule, rounds, participants, versions,
        next round, instance) on every rank.
        """

        def join_and_upload() -> dict[str, Any]:
            assert self.transport is not None
            self.close_transmitter(cancel_pending=True)
            deadline = time.monotonic() + self.timeout_s
            backoff = 0.5
            while True:
                try:
                    reply = self.transport.join(self.client_id, fingerprint, self.timeout_s)
                    break
                except TransportError as exc:
                    if time.monotonic() + backoff > deadline:
                        raise
                    log.warning("client %d: cannot join yet (%s); retrying in %.1f s", self.client_id, exc, backoff)
                    time.sleep(backoff)
                    backoff = min(2 * backoff, 10.0)
            self.transport.instance = reply.get("instance")
            if reply.get("need_state"):
                self.transport.upload_state(self.client_id, initial_state(), self.timeout_s)
            return reply

        reply = self.lead(join_and_upload)
        self.instance = reply.get("instance")
        return reply

    def plan_of(self, reply: Mapping[str, Any], mode: str, num_blocks: int, keep_optimizer_state: bool) -> Plan:
        """The federation's plan, from the server's join reply (the server owns the schedule and the sampling)."""
        if reply.get("mode") not in (None, mode):
            raise ParaBlockError(f"client {self.client_id} runs mode={mode} but the server runs mode={reply['mode']}")
        participants = reply.get("participants")
        return Plan(
            mode,
            tuple(int(b) for b in reply["schedule"]),
            num_blocks,
            tuple(tuple(int(c) for c in p) for p in participants) if participants else None,
            keep_optimizer_state,
            str(reply.get("assignment", "shared")),
            int(reply.get("clients", 1)),
            int(reply.get("staleness", 1)),
            float(reply.get("stale_mix", 1.0)),
        )

    def adopt(self, core: ClientCore, reply: Mapping[str, Any], *, newer_only: bool = False) -> list[int]:
        """Fetch and hold the server's global value of every block whose version differs (or is newer); returns them.

        A client joining late, restarting from a crash, or facing a server
        restarted from an older checkpoint so holds exactly the server's
        global blocks; its hand-offs in flight are then dropped by
        :meth:`~pl_parablock.core.client.ClientCore.restart_at` (the server
        either has them or rolled them back).
        """
        fetched = []
        for b, v in enumerate(int(v) for v in reply.get("versions", [])):
            stale = v > core.versions[b] if newer_only else (v != core.versions[b] or not core.clean[b])
            if stale:
                pulled = self.fetch(b)
                core.adopt(b, pulled.version, pulled.tensors)
                fetched.append(b)
        return fetched

    def fetch(self, block: int) -> Pulled:
        """The current global value of ``block`` (every rank)."""

        def fetch() -> Pulled:
            assert self.transport is not None
            return self.transport.fetch(self.client_id, block, self.timeout_s)

        return self.lead(fetch)

    def versions(self) -> dict[str, Any]:
        """The server's block versions; raises :class:`ServerRestarted` if another instance answers."""

        def versions() -> dict[str, Any]:
            assert self.transport is not None
            reply = self.transport.versions(self.client_id, self.timeout_s)
            if reply.get("instance") not in (None, self.instance):
                raise ServerRestarted(f"client {self.client_id}: the server restarted before the last round was confirmed")
            return reply

        return self.lead(versions)

    # ------------------------------------------------------------ rounds

    def start_transmitter(self, *, duplex: bool = False) -> None:
        """A new transmitter (rank 0); ``duplex``: one thread per direction (``federation.staleness`` >= 2)."""
        if self.leader:
            assert self.transport is not None
            self._transmitter = Transmitter(self.transport, self.client_id, timeout_s=self.timeout_s, instance=self.instance, duplex=duplex)

    def send(self, update: Update) -> None:
        """Hand an update (or a fetch-only round) to the transmitter thread; returns at once."""

        def send() -> None:
            assert self._transmitter is not None
            self._transmitter.send(update)

        self.lead(send)

    def wait(self, round_index: int) -> Arrival:
        """Block until the aggregate of ``round_index`` has arrived (every rank)."""

        def wait() -> Arrival:
            assert self._transmitter is not None
            return self._transmitter.wait(round_index)

        return self.lead(wait)

    # ------------------------------------------------------------ leaving

    def leave(self, report: Mapping[str, Any]) -> None:
        """Tell the server this client is done, with its report; idempotent (rank 0)."""
        if self._left or self.transport is None:
            return
        self._left = True
        self.transport.leave(self.client_id, report, self.timeout_s)

    def close_transmitter(self, *, cancel_pending: bool) -> None:
        if self._transmitter is not None:
            self._transmitter.close(timeout=self.timeout_s if not cancel_pending else 5.0, cancel_pending=cancel_pending)
            self._transmitter = None

    def close(self, *, cancel_pending: bool) -> None:
        """Stop the transmitter (after its queued hand-offs unless ``cancel_pending``) and close an owned transport."""
        self.close_transmitter(cancel_pending=cancel_pending)
        if self._owns_transport and self.transport is not None:
            self.transport.close()
            self.transport = None
