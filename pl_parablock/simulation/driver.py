"""The simulator's round loop: the algorithm core over virtual clients, the server's step, the clock, the report.

Round ``t``: the executor runs the round's sampled clients on the shared
model (each applies the aggregates it awaits, trains ``K`` steps, ends the
round, in client-id order); the clock times their computes and uploads and
closes the round; the updates that arrived in time are checked and added
in client-id order (:class:`~pl_parablock.simulation.aggregation.ServerRound`:
the server's checks, clipping and aggregation rule), as the reference and
the server do; each block's aggregate is installed (compressed with the
server's residual when the download codec is lossy) and the shared model
takes it. So for the same recipe the final global model is the
process federation's, bitwise (with ``round_timeout_s``, which updates are
late depends on the measured compute times, as in a real run).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from pl_parablock.core.aggregate import PiecePool, rule_of
from pl_parablock.core.blocks import freeze_to_blocks, partition_model, whole_model_partition
from pl_parablock.core.client import Update
from pl_parablock.core.plan import mode_of
from pl_parablock.core.tensors import digest
from pl_parablock.errors import ConfigError
from pl_parablock.model.build import build_model, save_merged
from pl_parablock.model.module import ParaBlockModule
from pl_parablock.recipe.build import client_threads, compression_of, plan_of, server_optimizer_of, weight_bound
from pl_parablock.recipe.profile import resolve_profiles
from pl_parablock.recipe.schema import Recipe
from pl_parablock.server.validation import MAX_WEIGHT, UpdateLimits
from pl_parablock.simulation.aggregation import ServerRound
from pl_parablock.simulation.clock import RoundClose, SimClock
from pl_parablock.simulation.virtual import ClientShards, RoundExecutor, RoundResult, ServerBlocks, SharedModelExecutor, VirtualClient
from pl_parablock.simulation.workers import Group, Placement, Solo, rss_mb

__all__ = ["SimulationResult", "device_of", "run_simulation"]

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """The end of a simulation: the global blocks, the server's view (as :meth:`Aggregator.report` gives it) and timings.

    ``wall_s`` is the simulated clock's; ``real_s`` the simulator's own run
    time, ``loop_s`` that of its round loop alone (training, switching
    clients, aggregating), in which ``steps`` optimizer steps trained on
    ``tokens`` label tokens.
    """

    globals: dict[str, Tensor]
    server: dict[str, Any]
    wall_s: float
    real_s: float
    final: dict[str, Any] = field(default_factory=dict)
    peak_clients_in_memory: int = 0
    skipped_downloads: int = 0
    skipped_bytes_down: int = 0
    loop_s: float = 0.0
    tokens: int = 0
    steps: int = 0
    workers: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Sent:
    """One client's round result as rank 0 needs it (no tensors): what the clock, the record and the report read."""

    client_id: int
    compute_s: float
    nbytes: int
    samples: int
    tokens: int
    block: int
    weight: float
    kind: str
    loss: float | None
    shard: int

    @classmethod
    def of(cls, r: RoundResult, shard: int) -> _Sent:
        u = r.update
        return cls(r.client_id, r.compute_s, _nbytes(u.tensors), r.samples, r.tokens, u.block, u.weight, u.kind, u.loss, shard)


def _check(recipe: Recipe) -> None:
    t = recipe.train
    problems = []
    if t.precision not in ("32-true", "32"):
        problems.append(
            f"`train.precision` is {t.precision!r}; the simulator runs 32-true only: its local steps are plain PyTorch steps "
            "(as the reference's), which do not reproduce Lightning's mixed-precision scaling and casts, so the model "
            "would not be the federation's"
        )
    if t.accumulate_grad_batches != 1:
        problems.append(
            f"`train.accumulate_grad_batches` is {t.accumulate_grad_batches}; the simulator runs 1 only: its plain "
            "PyTorch steps do not reproduce Lightning's accumulation (loss scaling and step boundaries), so the model "
            "would not be the federation's"
        )
    if problems:
        raise ConfigError(problems)


RELEASE_EVERY = 1
"""Rounds between two returns of freed heap memory to the system (:func:`release_freed_memory`)."""


def release_freed_memory() -> bool:
    """Give the heap memory freed since the last call back to the system (glibc's ``malloc_trim``); ``False`` elsewhere.

    Every round builds and drops its clients' cores, batches and sums; glibc keeps what they freed in its arenas,
    so without this a long simulation's resident memory creeps up round after round (0.3 MB a round on the
    quickstart's model, 100 clients, 10 a round, 150 rounds) although nothing is kept. With it every round: 0.008 MB
    a round (the report's own records), for 4.5 ms a call; every 10 rounds left 0.1 MB a round.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only: other C libraries have no malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC: Any = None


def device_of(accelerator: str) -> torch.device:
    """The one device of ``train.accelerator`` (``auto``: the GPU when there is one)."""
    a = accelerator.lower()
    if a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if a == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def _nbytes(tensors: dict[str, Tensor] | None) -> int:
    return sum(t.numel() * t.element_size() for t in (tensors or {}).values())


def run_simulation(
    recipe: Recipe,
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    executor: Callable[..., RoundExecutor] | None = None,
    group: Group | None = None,
    device: torch.device | None = None,
) -> SimulationResult:
    """Simulate ``recipe``'s federation: virtual clients on one shared model, a simulated clock.

    ``executor`` builds the :class:`~pl_parablock.simulation.virtual.RoundExecutor`
    from the arguments :class:`~pl_parablock.simulation.virtual.SharedModelExecutor`
    takes (the default: that one, sequential on one shared model).

    ``group`` places this process among several workers
    (:class:`~pl_parablock.simulation.workers.Workers`): it trains only the
    clients it owns, and rank 0 alone runs the clock, evaluates, saves the
    model and reports (another worker's result holds the globals and its
    ``workers`` figures only). Default: one process, every client.

    Client 0's duties of a real run (evaluating the global model every
    ``eval.every`` rounds and at the end, saving it to ``OUTPUT_DIR/model``)
    are done on the shared model, which holds the global after every round.

    Raises:
        ConfigError: a setting the simulator does not run (``train.precision``, gradient accumulation), with why.
        FederationError: the server refused an update (past ``federation.max_update_norm``, not finite): a real
            client stops there too.
    """
    _check(recipe)
    t_real = time.perf_counter()
    f, tr = recipe.federation, recipe.train
    torch.set_num_threads(client_threads(recipe))  # a local process client's: the same model as `fit` gives, bitwise
    group = group or Solo()
    device = device or device_of(tr.accelerator)
    model, tokenizer = build_model(recipe.model, recipe.seed)
    module = ParaBlockModule(model, tokenizer, lr=tr.lr, weight_decay=tr.weight_decay)
    module.to(device)
    b = recipe.blocks
    if mode_of(recipe.mode).whole_model:
        partition = whole_model_partition(module)
    else:
        partition = partition_model(module, layers_per_block=b.layers_per_block, embeddings=b.embeddings, head=b.head, patterns=b.patterns)
    blocks = freeze_to_blocks(module, partition)
    optimizer = module.configure_optimizers()
    module.train()
    plan = plan_of(recipe, len(partition))
    server_optimizer = server_optimizer_of(recipe)  # its state per block lives here, as on the server
    shards = ClientShards(recipe, tokenizer)
    # every worker reads and encodes the pooled data (or client 0's evals) alike; what its own clients' files skip is its own
    read_skipped_at_start, encode_skipped_at_start = len(shards.read_skipped), len(shards.encode_skipped)
    compression = compression_of(recipe)
    delta_downloads = compression.lossy_download and mode_of(recipe.mode).delta_downloads
    # the values the last k rounds replaced (a pipelined client still holds them); with g + D downloads one round more:
    # the round a client applies, whose D it adds to the value it holds
    server = ServerBlocks(
        [{n: p.detach().to("cpu", copy=True) for n, p in blk.items()} for blk in blocks],
        keep=plan.staleness + (1 if delta_downloads else 0),
        compression=compression,
    )
    rule = rule_of(f.aggregation)
    max_weight = 1.0 if f.weighting == "uniform" else float(weight_bound(recipe) or MAX_WEIGHT)  # the server's bound
    limits = UpdateLimits(f.weighting, max_weight, f.max_update_norm, f.clip_norm, compression)
    build = executor or SharedModelExecutor
    runner: RoundExecutor = build(
        module,
        blocks,
        optimizer,
        plan,
        shards,
        local_steps=tr.local_steps,
        weighting=f.weighting,
        gradient_clip_val=tr.gradient_clip_val,
        compression=compression,
        device=device,
    )
    clients = [VirtualClient(i) for i in range(f.clients)]
    window = max(plan.staleness, 1)
    placement = Placement(f.clients, group.size, window, balanced=recipe.simulation.placement == "balanced")
    moved_clients = moved_bytes = 0
    clock = SimClock(
        resolve_profiles(recipe.simulation.profile, f.clients, recipe.link, recipe.seed),
        staleness=plan.staleness,
        round_timeout_s=f.round_timeout_s,
        min_clients=f.min_clients,
        bandwidth_mbps=recipe.simulation.bandwidth_mbps,
    )
    evaluation = _evaluation(recipe, tokenizer, shards.evals) if group.is_root else None
    curve: list[dict[str, Any]] = []
    if evaluation is not None and recipe.eval.every > 0:
        curve.append({"round": 0, **evaluation.evaluate(module.model)})
    rounds: list[dict[str, Any]] = []
    reports: dict[int, dict[str, Any]] = {}
    shard_sizes: dict[int, int] = {}
    rss: list[list[float]] = []  # per round, each worker's resident memory at the round's start, freed memory returned
    peak = tokens = steps = 0
    results: list[_Sent] = []
    live: set[int] = set()  # this worker's clients holding a core: those sampled last round
    eval_s = 0.0
    t_loop = time.perf_counter()
    pool = PiecePool()  # the round sums' buffers, reused round after round (one thread)
    for t in range(plan.rounds):
        if t and t % RELEASE_EVERY == 0:
            release_freed_memory()
        kept_mb = rss_mb()  # what the run keeps between rounds (the round's own buffers come and go)
        block = plan.schedule[t]
        sampled = plan.participants[t] if plan.participants is not None else range(f.clients)
        moves = placement.place(t, sampled)
        chosen = {i for i in sampled if placement.trains(i, group.rank)}
        # a client not sampled is retired once no round it trained is still in its window (t >= last + k): nothing of
        # its is needed before it is sampled again, when its core is rebuilt; until then its core skips the round
        for i in [i for i in live if i not in chosen and t >= clients[i].last_trained + window]:
            clients[i].retire()
            live.discard(i)
        if moves:
            moved_clients += len(moves)
            moved_bytes += group.move(moves, lambda i: clients[i].export(shards), lambda i, state: _arrive(clients, i, state, shards))
        ups: dict[int, Update] = {}

        def train(
            t: int = t, chosen: set[int] = chosen, ups: dict[int, Update] = ups, kept_mb: float = kept_mb
        ) -> tuple[list[_Sent], int, float]:
            for i in sorted(chosen):
                c = clients[i]
                if c.core is None:
                    runner.materialize(c, t, server)
                    live.add(i)
            held = len(live)
            results = runner.run_round(t, [clients[i] for i in sorted(chosen | live)], server)
            for r in results:
                r.update.encode()
                ups[r.client_id] = r.update
            return [_Sent.of(r, shards.shard_size(r.client_id)) for r in results], held, kept_mb

        gathered, error = group.gather(train)
        t0 = time.perf_counter()
        moved = plan.blocks_of(t)
        close: RoundClose | None = None
        sent_by: dict[int, _Sent] = {}
        if gathered is not None and error is None:
            peak = max(peak, sum(held for _, held, _ in gathered))
            rss.append([mb for _, _, mb in gathered])
            sent_by = {m.client_id: m for part, _, _ in gathered for m in part}
            results = [sent_by[i] for i in sorted(sent_by)]
            tokens += sum(r.tokens for r in results)
            steps += len(results) * tr.local_steps
            close = clock.upload(t, {r.client_id: r.compute_s for r in results}, {r.client_id: r.nbytes for r in results})
        on_time: list[int] = group.share(list(close.on_time) if close is not None else [], error)

        def start(t: int = t, moved: Sequence[int] = moved) -> ServerRound:
            return ServerRound(
                t,
                moved,
                rule=rule,
                limits=limits,
                server_lr=f.server_lr,
                optimizer=server_optimizer,
                trim_fraction=f.trim_fraction,
                pool=pool,
            )

        def add(step: ServerRound, run: Sequence[int], ups: dict[int, Update] = ups) -> None:
            for i in run:  # client-id order, as the reference and the server add them
                u = ups[i]
                assert u.tensors is not None
                step.add(i, u.block, u.tensors, u.weight, u.kind, u.codec, server.current(u.block))

        step, error = group.chain(placement.runs(on_time), start, add)
        # a block nobody trained keeps its value; rank 0 closes the blocks (the server optimizer's state lives there)
        news = {m: step.close(m, server.current(m)) for m in moved} if step is not None and error is None else {}
        news = group.share(news, error)
        problems = []
        for m in moved:
            problems.append(server.install(t, m, news[m]))
            runner.install(m, server.current(m))
        if not group.is_root:
            continue
        assert close is not None and step is not None
        arrived = list(on_time)
        problem = "; ".join(p for p in problems if p)
        aggregation_s = time.perf_counter() - t0
        sim_agg = recipe.simulation.aggregation_s if recipe.simulation.aggregation_s is not None else aggregation_s
        sent = [server.broadcast(m, t) for m in moved] if delta_downloads else []
        if sent and all(x is not None for x in sent):
            bytes_down = sum(_nbytes(x[1]) for x in sent if x is not None)  # the compressed D of every block the round moved
        else:
            bytes_down = sum(_nbytes(server.current(m)) for m in moved)
        clock.deliver(t, sim_agg, bytes_down)
        record = _round_record(t, block, list(moved), list(sampled), arrived, close, problem, sim_agg, sent_by, step.clipped)
        rounds.append(record)
        for r in results:
            rep = reports.setdefault(r.client_id, {"rounds": [], "events": [], "final": {}})
            shard_sizes[r.client_id] = r.shard
            rep["rounds"].append(dict(round=t, block=r.block, samples=r.samples, weight=r.weight, kind=r.kind, loss=r.loss, version=t))
        if progress is not None:
            progress(record)
        last = plan.rounds - 1 - plan.staleness  # parablock: the point of the second-to-last round comes with the final one
        if evaluation is not None and recipe.eval.every > 0 and (t + 1) % recipe.eval.every == 0 and t < last:
            t_eval = time.perf_counter()
            curve.append({"round": t + 1, **evaluation.evaluate(module.model)})
            eval_s += time.perf_counter() - t_eval
    loop_s = time.perf_counter() - t_loop - eval_s
    globals_ = {n: v for blk in server.state.values for n, v in blk.items()}
    downlink = server.state.downlink
    mine: dict[str, Any] = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_sha256": digest({**globals_, **(downlink.state_tensors("residual/") if downlink is not None else {})}),
        "read_skipped": len(shards.read_skipped) - read_skipped_at_start,
        "encode_skipped": len(shards.encode_skipped) - encode_skipped_at_start,
        "client_bytes_moved": moved_bytes,
    }
    ends, _ = group.gather(lambda: mine)
    if ends is None:  # another worker than rank 0: it only trained its clients
        return SimulationResult(globals_, {}, 0.0, time.perf_counter() - t_real, workers=mine)
    workers = {
        "workers": group.size,
        "peak_rss_mb": [e["peak_rss_mb"] for e in ends],
        "state_sha256": [e["state_sha256"] for e in ends],
        "rss_mb_per_round": rss,
        "clients_moved": moved_clients,  # to balance the rounds (simulation/workers.py: Placement); the same count on every worker
        "client_bytes_moved": sum(e["client_bytes_moved"] for e in ends),
    }
    wall = clock.finish()
    _merge_clock(reports, clock.records)
    final = _final(recipe, module, evaluation, curve, plan.rounds)
    final["trainable_params"] = sum(p.numel() for blk in blocks for p in blk.values())
    final["peak_rss_mb"] = mine["peak_rss_mb"]  # the one process of every virtual client (with workers: rank 0's)
    if group.size > 1:
        final["peak_rss_mb_per_worker"] = workers["peak_rss_mb"]
    for i, rep in reports.items():
        rep["shard_size"] = shard_sizes[i]
        rep["final"] = {"client_data": {"shard_size": shard_sizes[i], "read_skipped": 0, "encode_skipped": 0}}
    if reports:
        first = reports[min(reports)]
        first["final"].update(final)
        skipped = read_skipped_at_start + sum(e["read_skipped"] for e in ends)
        first["final"]["client_data"].update(
            read_skipped=skipped, encode_skipped=encode_skipped_at_start + sum(e["encode_skipped"] for e in ends)
        )
    view = {
        "mode": recipe.mode,
        "clients": f.clients,
        "rounds_planned": f.rounds,
        "schedule": list(plan.schedule),
        "blocks": partition.to_dict(),
        "server_lr": f.server_lr,
        "aggregation": f.aggregation,
        "rounds": rounds,
        "rejected_outside_rounds": [],
        "client_reports": {str(k): v for k, v in sorted(reports.items())},
        "joined": list(range(f.clients)),
        "dropped": [],
        "resumed_from_round": None,
        "started_at": 0.0,
        "globals_sha256": digest(globals_),
    }
    return SimulationResult(
        globals_,
        view,
        wall,
        time.perf_counter() - t_real,
        final,
        peak,
        clock.skipped_downloads,
        clock.skipped_bytes_down,
        loop_s,
        tokens,
        steps,
        workers,
    )


def _arrive(clients: list[VirtualClient], client: int, state: dict[str, Any], shards: ClientShards) -> None:
    clients[client] = VirtualClient.restore(client, state, shards)


def _round_record(
    t: int,
    block: int,
    moved: list[int],
    sampled: list[int],
    arrived: list[int],
    close: RoundClose,
    problem: str,
    aggregation_s: float,
    updates: dict[int, _Sent],
    clipped: list[int],
) -> dict[str, Any]:
    """The server's record of a round, as the aggregator writes it (the loss: the arrived updates' weighted mean)."""
    losses = [(updates[i].weight, float(loss)) for i in arrived if (loss := updates[i].loss) is not None and updates[i].weight]
    total = sum(w for w, _ in losses)
    return {
        "round": t,
        "block": block,
        "blocks": moved,
        "expected": len(sampled),
        "expected_clients": sampled,
        "arrived": len(arrived),
        "rejected": 1 if problem else 0,
        "late": len(close.late),
        "aggregation_s": aggregation_s,
        "closed_at": close.closed_at,
        "close_reason": close.reason,
        "loss": sum(w * v for w, v in losses) / total if total > 0 else None,
        "clients": arrived,
        "clipped": sorted(clipped),
        "rejections": [{"round": t, "block": block, "reason": problem, "at": close.closed_at}] if problem else [],
    }


def _merge_clock(reports: dict[int, dict[str, Any]], timed: dict[int, list[dict[str, Any]]]) -> None:
    keys = ("started_at", "ended_at", "compute_s", "sent_at", "upload_s", "server_wait_s", "download_s", "arrived_at", "applied_at")
    for i, recs in timed.items():
        by_round = {r["round"]: r for r in recs}
        for rec in reports.get(i, {}).get("rounds", []):
            clocked = by_round.get(rec["round"])
            if clocked is not None:
                rec.update({k: clocked[k] for k in (*keys, "blocked_s", "bytes_up", "bytes_down") if k in clocked})
                if clocked.get("late"):
                    rec["late"] = True


def _evaluation(recipe: Recipe, tokenizer: Any, records: list[dict[str, Any]]) -> Any:
    if not records:
        return None
    from pl_parablock.client.evaluation import GlobalEvaluation

    t = recipe.train
    return GlobalEvaluation(
        cast(Any, None),  # only its evaluate() is used: the simulator knows when the shared model holds the global
        records,
        tokenizer,
        batch_size=t.batch_size,
        max_length=t.max_length,
        max_new_tokens=recipe.eval.max_new_tokens,
        model_dir=None,
        on_error=recipe.data.on_error,
    )


def _final(recipe: Recipe, module: ParaBlockModule, evaluation: Any, curve: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if evaluation is not None:
        metrics.update(evaluation.evaluate(module.model))
        metrics["eval_samples"] = len(evaluation.records)
        if recipe.eval.every > 0:
            curve.append({"round": rounds, **{k: v for k, v in metrics.items() if k != "eval_samples"}})
    model_dir = os.path.join(recipe.output_dir, "model")
    module.save_pretrained(model_dir)
    metrics["model_dir"] = os.path.abspath(model_dir)
    pe = recipe.model.peft
    if module.is_peft:
        metrics["model_format"] = "peft_adapter"
        if pe.merge:
            merged = os.path.join(recipe.output_dir, "merged_model")
            save_merged(recipe.model, recipe.seed, model_dir, merged, tokenizer=module.tokenizer)
            metrics["merged_model_dir"] = os.path.abspath(merged)
    else:
        metrics["model_format"] = "full"
    if curve:
        metrics["eval_curve"] = list(curve)
    return metrics
