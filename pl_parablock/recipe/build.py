"""What a run builds from its recipe: the plan, compression, the server optimizer, tokens, the weight bound, loggers.

Each builder reads the sections it needs and asks the registry that owns the
choice (:func:`~pl_parablock.core.codecs.codec_of`,
:func:`~pl_parablock.core.optimizers.make_server_optimizer`); the recipe
was validated before, so a builder does not check again.
"""

from __future__ import annotations

import os
from typing import Any

from pl_parablock.core.codecs import WIRE_DTYPE_CODECS, Compression, codec_of, make_codec
from pl_parablock.core.optimizers import ServerOptimizer, make_server_optimizer
from pl_parablock.core.plan import Plan, make_plan, mode_of
from pl_parablock.recipe.cores import available_cores
from pl_parablock.recipe.profile import resolve_profiles
from pl_parablock.recipe.schema import Recipe

__all__ = [
    "DEFAULT_MIN_UPLOAD_MBPS",
    "TOKEN_ENV",
    "available_cores",
    "client_threads",
    "client_token",
    "compression_of",
    "min_upload_mbps",
    "plan_of",
    "run_loggers",
    "server_optimizer_of",
    "server_token",
    "weight_bound",
]

TOKEN_ENV = "PL_PARABLOCK_TOKEN"


def plan_of(recipe: Recipe, num_blocks: int) -> Plan:
    """The federation's plan for a model of ``num_blocks`` blocks: every driver that reads a recipe builds it here."""
    f, b = recipe.federation, recipe.blocks
    return make_plan(
        recipe.mode,
        num_blocks=num_blocks,
        rounds=f.rounds,
        schedule=mode_of(recipe.mode).schedule(b.schedule),
        seed=recipe.seed,
        clients=f.clients,
        clients_per_round=f.clients_per_round,
        keep_optimizer_state=recipe.train.keep_optimizer_state,
        assignment=b.assignment,
        staleness=f.staleness,
        stale_mix=f.stale_mix,
    )


def compression_of(recipe: Recipe) -> Compression:
    """How the recipe's updates and aggregates travel (``federation.compression``, or the ``wire_dtype`` shorthand)."""
    f = recipe.federation
    c = f.compression
    if c.codec == "none" and f.wire_dtype is not None:
        return Compression(make_codec(WIRE_DTYPE_CODECS[f.wire_dtype]), make_codec("none"), error_feedback=False)
    # every codec takes its own options from the section (Codec.OPTIONS), ignoring the others
    return Compression(codec_of(c.codec, c), codec_of(c.download or c.codec, c), error_feedback=bool(c.error_feedback))


def server_optimizer_of(recipe: Recipe) -> ServerOptimizer:
    """The recipe's server optimizer (``federation.server_optimizer``; its lr defaults to ``federation.server_lr``)."""
    so, f = recipe.federation.server_optimizer, recipe.federation
    betas = (float(so.betas[0]), float(so.betas[1]))
    return make_server_optimizer(so.name, lr=so.lr if so.lr is not None else f.server_lr, betas=betas, tau=so.tau)


def server_token(recipe: Recipe) -> str | dict[int, str] | None:
    """The token(s) the server accepts: PL_PARABLOCK_TOKEN if set, else federation.token."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env
    token = recipe.federation.token
    if isinstance(token, dict):
        return {int(k): str(v) for k, v in token.items()}
    return token  # type: ignore[no-any-return]


def client_token(recipe: Recipe, client_id: int) -> str | None:
    """The token client ``client_id`` presents: PL_PARABLOCK_TOKEN if set, else its federation.token."""
    token = server_token(recipe)
    if isinstance(token, dict):
        return token.get(client_id)
    return token


DEFAULT_MIN_UPLOAD_MBPS = 0.1
"""``federation.min_upload_mbps`` when the recipe declares no uplink: a tenth of a 1 Mbit/s uplink."""


def min_upload_mbps(recipe: Recipe) -> float:
    """The slowest rate an upload holding a turn may have before the server cuts it, Mbit/s (``federation.min_upload_mbps``).

    Unless the recipe sets it: a tenth of the slowest uplink it declares
    (``link.uplink_mbps`` and every client's ``simulation.profile.uplink_mbps``),
    so that an honest client at its declared rate is never cut, with ten
    times its rate to spare for a slower moment; :data:`DEFAULT_MIN_UPLOAD_MBPS`
    when it declares none (the server then cannot know the clients' links;
    the floor only frees turns that an upload at 0.1 Mbit/s or less would
    hold). 0: no floor.
    """
    f = recipe.federation
    if f.min_upload_mbps is not None:
        return float(f.min_upload_mbps)
    declared = [recipe.link.uplink_mbps] if recipe.link.uplink_mbps is not None else []
    try:
        profiles = resolve_profiles(recipe.simulation.profile, max(f.clients, 1), recipe.link, recipe.seed)
    except ValueError:  # a profile the validation refuses: its own key says why
        profiles = []
    declared += [p.uplink_mbps for p in profiles if p.uplink_mbps is not None]
    return min(declared) / 10 if declared else DEFAULT_MIN_UPLOAD_MBPS


def client_threads(recipe: Recipe) -> int:
    """The CPU threads each client computes with: ``train.threads``, else the cores available shared by the clients.

    ``max(1, cores // federation.clients)``, ``cores`` being :func:`available_cores`
    (affinity and CPU quota, not the machine's count): what ``python -m pl_parablock.fit``
    gives each of its local client processes, what its ``--inprocess``
    clients use, and what the simulator uses for the virtual client it runs.
    torch's kernels may sum in another order with another thread count, so
    one default for all three is what lets them end with the same model,
    bitwise, on the same machine.
    """
    return int(recipe.train.threads or max(1, available_cores() // recipe.federation.clients))


def weight_bound(recipe: Recipe) -> float | None:
    """The largest weight the server accepts for one client's update (``federation.max_weight``).

    Unless the recipe sets it: what one client can have seen in a round
    under ``federation.weighting`` (one device per client): ``samples``:
    ``local_steps x accumulate_grad_batches x batch_size``; ``tokens``: that
    times ``max_length``; ``shard``: ``data.num_samples`` for synthetic data,
    else ``None`` (no bound the server can know); ``uniform``: 1.
    """
    f, t = recipe.federation, recipe.train
    if f.max_weight is not None:
        return float(f.max_weight)
    samples = float(t.local_steps * t.accumulate_grad_batches * t.batch_size)
    if f.weighting == "samples":
        return samples
    if f.weighting == "tokens":
        return samples * t.max_length
    if f.weighting == "shard":
        return float(recipe.data.num_samples) if recipe.data.format == "synthetic" else None
    return 1.0


def run_loggers(recipe: Recipe, name: str) -> list[Any]:
    """The Lightning loggers of one member of a run (``client_I`` or ``server``) under ``OUTPUT_DIR/logs/NAME``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    root = os.path.join(recipe.output_dir, "logs")
    out: list[Any] = []
    if recipe.logging.csv:
        out.append(CSVLogger(root, name=name, version=""))
    if recipe.logging.tensorboard:
        out.append(TensorBoardLogger(root, name=name, version="", default_hp_metric=False))
    return out


def evaluator_of(recipe: Recipe, *, launcher: bool) -> str:
    """Who evaluates the global model: ``process`` (an evaluator of its own) or ``client`` (client 0).

    ``eval.evaluator: auto`` is ``process`` where the launcher starts the
    processes itself (``launcher``: the local launcher with client
    processes) and there is a curve (``eval.every`` > 0), else ``client``:
    the final evaluation alone holds no client up.
    """
    chosen = recipe.eval.evaluator
    if chosen == "auto":
        return "process" if launcher and recipe.eval.every > 0 else "client"
    return str(chosen)


def evaluation_points(recipe: Recipe) -> list[int]:
    """The points of the evaluation curve before the final model: ``n`` = rounds aggregated (0: the initial model).

    The initial model and every ``eval.every`` rounds, as client 0 shows
    them: in a pipelined mode a client applies the last ``staleness``
    aggregates together at the end, so a point among them is the final
    one's. Empty when ``eval.every`` is 0 (only the final model).
    """
    every, rounds = recipe.eval.every, recipe.federation.rounds
    if every <= 0:
        return []
    ahead = recipe.federation.staleness if mode_of(recipe.mode).staleness else 0
    return [n for n in range(0, rounds, every) if n < rounds - ahead]
