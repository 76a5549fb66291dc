"""Checkpoint storage of the server: where its checkpoints go, apart from what they hold.

The round state never touches a file: the
:class:`~pl_parablock.server.aggregator.Aggregator` composes a checkpoint
(a JSON-able state and a flat dict of tensors, :func:`compose`) and hands it
to a :class:`CheckpointStore` injected into it, the way torchft's ``Manager``
hands checkpoints to an injected ``CheckpointTransport``. Two stores:

* :class:`DirectoryStore`: the format every release has written
  (:data:`CHECKPOINT_FORMAT`): the tensors go to a new
  ``globals-NNNNNN.safetensors`` file, then ``state.json`` (naming that file)
  is replaced in one rename, so a crash at any point leaves the previous
  checkpoint whole; older tensor files are removed after.
* :class:`MemoryStore`: keeps the last checkpoint in memory (tests, and a
  driver that restarts a server inside one process).

The tensors of a checkpoint are the global values by name, the server
optimizer's state under :data:`OPT_PREFIX` and the broadcast residuals of a
lossy download codec under :data:`RESIDUAL_PREFIX`.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from pl_parablock.core.codecs import NO_COMPRESSION
from pl_parablock.core.optimizers import make_server_optimizer
from pl_parablock.errors import FederationError
from pl_parablock.server.report import describe_compression, describe_optimizer

if TYPE_CHECKING:
    from pl_parablock.server.admission import PlanSettings
    from pl_parablock.server.rounds import Aggregation

__all__ = [
    "CHECKPOINT_FORMAT",
    "OPT_PREFIX",
    "RESIDUAL_PREFIX",
    "CheckpointPolicy",
    "CheckpointStore",
    "DirectoryStore",
    "MemoryStore",
    "check_state",
    "compose",
    "federation_params",
    "split_tensors",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
OPT_PREFIX = "server_optimizer::"
RESIDUAL_PREFIX = "broadcast_residual::"


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the server writes a checkpoint by itself.

    Args:
        every: after every this many rounds, and after the last (0: never;
            :meth:`~pl_parablock.server.aggregator.Aggregator.save_checkpoint`
            still writes one when asked).
        last_round: the federation's last round.
    """

    every: int = 0
    last_round: int = 0

    def due(self, round_index: int | None) -> bool:
        """Whether to write one now: at the initial state (``None``), or after round ``round_index`` closed."""
        if self.every <= 0:
            return False
        return round_index is None or (round_index + 1) % self.every == 0 or round_index == self.last_round


class CheckpointStore(ABC):
    """Where a server's checkpoint is kept; it only reads and writes (the state composes and checks)."""

    where: str
    """Where it keeps the checkpoint, as error messages name it."""

    @abstractmethod
    def save(self, state: dict[str, Any], tensors: Mapping[str, Tensor], upto: int) -> str:
        """Keep ``state`` and ``tensors`` (the rounds up to ``upto`` closed), replacing the last; returns where.

        A failure at any point must leave the previous checkpoint whole.
        """

    @abstractmethod
    def load(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The last checkpoint's state and tensors.

        Raises:
            FederationError: there is none, or it cannot be read back.
        """


class DirectoryStore(CheckpointStore):
    """Checkpoints in a directory: ``state.json`` and the ``globals-*.safetensors`` file it names.

    Args:
        directory: the directory (created when the first checkpoint is written).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.where = directory

    def save(self, state: dict[str, Any], tensors: Mapping[str, Tensor], upto: int) -> str:
        directory = self.directory
        os.makedirs(directory, exist_ok=True)
        name = f"globals-{upto + 1:06d}.safetensors"
        tmp = os.path.join(directory, name + ".tmp")
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp)
        os.replace(tmp, os.path.join(directory, name))
        state = {**state, "globals": name}
        path = os.path.join(directory, "state.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        for old in os.listdir(directory):
            if old.startswith("globals-") and old != name:
                os.remove(os.path.join(directory, old))
        return path

    def load(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        try:
            with open(os.path.join(self.directory, "state.json"), encoding="utf-8") as f:
                state = json.load(f)
            tensors = load_file(os.path.join(self.directory, state["globals"]))
        except Exception as exc:  # any failure to read it back means the checkpoint is unusable
            raise FederationError(
                f"server checkpoint in {self.directory} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                "move it away to start the federation afresh"
            ) from None
        return state, tensors


class MemoryStore(CheckpointStore):
    """The last checkpoint in memory (a deep copy of its state, clones of its tensors)."""

    def __init__(self) -> None:
        self.where = "memory"
        self._kept: tuple[str, dict[str, Tensor]] | None = None

    def save(self, state: dict[str, Any], tensors: Mapping[str, Tensor], upto: int) -> str:
        self._kept = (json.dumps(state), {n: t.detach().clone() for n, t in tensors.items()})
        return self.where

    def load(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if self._kept is None:
            raise FederationError("no server checkpoint was kept in memory yet")
        state, tensors = self._kept
        return json.loads(state), {n: t.clone() for n, t in tensors.items()}


def compose(
    *,
    params: dict[str, Any],
    admission: Mapping[str, Any],
    versions: list[int],
    rounds: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    started_at: float,
) -> dict[str, Any]:
    """A checkpoint's state (its keys in the order every release wrote them).

    Args:
        params: the federation's settings a resumed server must share.
        admission: the model and members (:meth:`~pl_parablock.server.admission.Admission.snapshot`).
        versions: every block's version.
        rounds: the records of the closed rounds.
        rejected: refusals outside rounds.
        started_at: the server's start (wall clock).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "params": params,
        "fingerprint": admission["fingerprint"],
        "initializer": admission["initializer"],
        "versions": versions,
        "rounds": rounds,
        "joined": admission["joined"],
        "left": admission["left"],
        "reports": admission["reports"],
        "rejected": rejected,
        "started_at": started_at,
    }


def federation_params(settings: PlanSettings, aggregation: Aggregation) -> dict[str, Any]:
    """The settings a checkpoint must share with the federation that resumes from it (as :func:`compose` saves them)."""
    return {
        "clients": settings.clients,
        "rounds": settings.rounds,
        "schedule": settings.schedule,
        "seed": settings.seed,
        "server_lr": aggregation.server_lr,
        "server_optimizer": describe_optimizer(aggregation.server_optimizer),
        "mode": settings.mode,
        "assignment": settings.assignment,
        "clients_per_round": settings.clients_per_round,
        "compression": describe_compression(aggregation.compression),
    }


def check_state(state: Mapping[str, Any], params: Mapping[str, Any], where: str) -> None:
    """That a checkpoint's state is of this format and of this federation.

    A setting missing from the checkpoint (written before it was saved) ran
    its default then.

    Args:
        state: the checkpoint's state.
        params: this federation's settings (:func:`federation_params`).
        where: the store's place, for the message.

    Raises:
        FederationError: another format, or another federation's settings
            (naming every one that differs).
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FederationError(f"server checkpoint in {where} has format {state.get('format')}, this version reads {CHECKPOINT_FORMAT}")
    legacy = {
        "assignment": "shared",
        "server_optimizer": describe_optimizer(make_server_optimizer("sgd", lr=params["server_lr"])),
        "compression": describe_compression(NO_COMPRESSION),
    }
    saved = {k: state["params"].get(k, legacy.get(k)) for k in params}
    diff = {k: (saved[k], v) for k, v in params.items() if saved[k] != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in diff.items())
        raise FederationError(f"server checkpoint in {where} belongs to another federation ({what}); use its recipe or another output_dir")


def split_tensors(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """A checkpoint's tensors: the global values, the server optimizer's state (prefix removed), the residuals (prefixed)."""
    opt_state = {k.removeprefix(OPT_PREFIX): t for k, t in tensors.items() if k.startswith(OPT_PREFIX)}
    residuals = {k: t for k, t in tensors.items() if k.startswith(RESIDUAL_PREFIX)}
    values = {k: t for k, t in tensors.items() if not k.startswith((OPT_PREFIX, RESIDUAL_PREFIX))}
    return values, opt_state, residuals
