"""Server optimizers (FedOpt, DESIGN §1.1): per block, ``x_b ← x_b − opt(−Δ_agg)``.

``sgd`` at lr 1 is FedAvg, bitwise; ``momentum``, ``adam``, ``yogi`` and
``adagrad`` keep their state per block (on the server and in its
checkpoints). Each works on float64 pieces of a tensor, the way the round's
sums are formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from pl_parablock.core.plan import AlgorithmError


class ServerOptimizer:
    """A server optimizer per block (FedOpt, Reddi et al., *Adaptive Federated Optimization*): ``x_b <- x_b - opt(-Δ_agg)``.

    ``Δ_agg`` is the round's weighted mean delta of block ``b``. Each block
    has its own state (created at its first round, kept on the server and in
    its checkpoints). Subclasses define :meth:`update` on one float64 piece.

    Args:
        lr: the server learning rate ``η``.
        betas: ``(β1, β2)``: momentum and second-moment decay.
        tau: the adaptivity ``τ`` (adaptive optimizers).
    """

    name = ""
    slots: tuple[str, ...] = ()

    def __init__(self, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.tau = tau
        self.state: dict[int, dict[str, dict[str, Tensor]]] = {}

    def initial(self, slot: str, like: Tensor) -> Tensor:
        return torch.zeros(like.shape, dtype=torch.float64)

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        """The new value of piece ``g`` (float64, may be modified in place) given the mean delta and the state's pieces."""
        raise NotImplementedError

    def step_for(self, block: int, current: Mapping[str, Tensor]) -> Callable[[str, int, Tensor, Tensor], Tensor]:
        """The piecewise step of ``block``'s round (its state created on first use)."""
        per_name = self.state.setdefault(block, {})
        for name, t in current.items():
            if name not in per_name:
                per_name[name] = {slot: self.initial(slot, t) for slot in self.slots}

        def step(name: str, start: int, g: Tensor, delta: Tensor) -> Tensor:
            pieces = {slot: v.view(-1)[start : start + g.numel()] for slot, v in per_name[name].items()}
            return self.update(g, delta, pieces)

        return step

    def state_tensors(self) -> dict[str, Tensor]:
        """The state as flat named tensors (``"<block>/<name>/<slot>"``), for a checkpoint."""
        return {f"{b}/{n}/{slot}": t for b, names in self.state.items() for n, slots in names.items() for slot, t in slots.items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        self.state = {}
        for key, t in tensors.items():
            b, rest = key.split("/", 1)
            name, slot = rest.rsplit("/", 1)
            self.state.setdefault(int(b), {}).setdefault(name, {})[slot] = t.to(torch.float64)


class ServerSGD(ServerOptimizer):
    """``x + η Δ``; ``η = 1`` is FedAvg (and, with value updates, the exact weighted mean)."""

    name = "sgd"

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        return g.add_(delta, alpha=self.lr)


def plain_step(server_lr: float, optimizer: ServerOptimizer | None) -> tuple[float, ServerOptimizer | None]:
    """``(η_g, optimizer)`` of a round's step: plain SGD is ``g + lr · Δ`` at its own lr, the aggregation's exact path
    (no optimizer object); any other optimizer steps itself, and ``server_lr`` is the plain step's otherwise."""
    if isinstance(optimizer, ServerSGD):
        return optimizer.lr, None
    return server_lr, optimizer


class ServerMomentum(ServerOptimizer):
    """FedAvgM: ``m <- β1 m + Δ``, ``x + η m``."""

    name = "momentum"
    slots = ("m",)

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        m = state["m"].mul_(self.beta1).add_(delta)
        return g.add_(m, alpha=self.lr)


class ServerAdam(ServerOptimizer):
    """FedAdam: ``m <- β1 m + (1-β1) Δ``, ``v <- β2 v + (1-β2) Δ²``, ``x + η m / (√v + τ)`` (``v`` starts at ``τ²``)."""

    name = "adam"
    slots = ("m", "v")

    def initial(self, slot: str, like: Tensor) -> Tensor:
        return torch.full(like.shape, self.tau**2 if slot == "v" else 0.0, dtype=torch.float64)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        m = state["m"].mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = self.second_moment(state["v"], delta * delta)
        return g.add_(m / (v.sqrt() + self.tau), alpha=self.lr)


class ServerYogi(ServerAdam):
    """FedYogi: as FedAdam with ``v <- v - (1-β2) Δ² sign(v - Δ²)``."""

    name = "yogi"

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))


class ServerAdagrad(ServerAdam):
    """FedAdagrad: as FedAdam with ``v <- v + Δ²``."""

    name = "adagrad"

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v.add_(d2)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (ServerSGD, ServerMomentum, ServerAdam, ServerYogi, ServerAdagrad)
}
"""The server optimizers by name (``federation.server_optimizer.name``)."""


def make_server_optimizer(name: str, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3) -> ServerOptimizer:
    if name not in SERVER_OPTIMIZERS:
        raise AlgorithmError(f"unknown server optimizer {name!r}; use {', '.join(SERVER_OPTIMIZERS)}")
    return SERVER_OPTIMIZERS[name](lr=lr, betas=betas, tau=tau)
