"""Virtual clients and the executor that trains them on one shared model.

A virtual client holds only what the algorithm needs between its rounds
(:class:`VirtualClient`): its data shard (indices into one tokenization of
the pooled data) and position in it, its RNG state, the blocks it holds that
differ from the global (the block it trained and whose aggregate it has not
applied yet), and its optimizer state when the recipe keeps it — all on the
CPU. Its :class:`~pl_parablock.core.client.ClientCore` exists only while it
has something in flight: a client not sampled for a round needs nothing
until it is sampled again, when its core is rebuilt in exactly the state the
core reaches by skipping those rounds (see :meth:`SharedModelExecutor.materialize`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pl_parablock.core.client import ClientCore, RoundStart, Update, activate
from pl_parablock.core.codecs import NO_COMPRESSION, Compression, decode_broadcast
from pl_parablock.core.plan import AlgorithmError, Plan, mode_of
from pl_parablock.core.server import GlobalState
from pl_parablock.data import ClientData, client_data, client_shares, collate, encode_record, pack_examples
from pl_parablock.data.module import EpochShuffle, adds_bos
from pl_parablock.errors import DataError
from pl_parablock.model.module import ParaBlockModule
from pl_parablock.model.steps import plain_steps

__all__ = ["ClientShards", "RoundExecutor", "RoundResult", "ServerBlocks", "SharedModelExecutor", "VirtualClient"]

Example = dict[str, list[int]]


# ---------------------------------------------------------------------------------------------------- data


class ClientShards:
    """Every client's training examples, from one tokenization of the pooled data.

    ``iid`` and ``dirichlet``: the pooled records are read and tokenized once;
    a client's shard is a list of indices (the same records, in the same
    order, as its own process would read). ``natural``: a client's file is
    read and tokenized the first time the client trains. Packing is done per
    client, when it trains, as its own data module does.
    """

    def __init__(self, recipe: Any, tokenizer: Any) -> None:
        self.recipe = recipe
        self.tokenizer = tokenizer
        t, d = recipe.train, recipe.data
        self.max_length = t.max_length
        self.batch_size = t.batch_size
        self.seed = recipe.seed
        self.packing = t.packing
        self.on_error = d.on_error
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token")
        self.pad = int(pad)
        self._bos = adds_bos(tokenizer)
        self.natural = d.partition.kind == "natural"
        self.read_skipped: list[str] = []
        self.encode_skipped: list[str] = []
        self._own: dict[int, list[Example | None]] = {}
        self._counted: set[int] = set()  # clients whose file another worker read and counted (they moved here)
        if self.natural:
            first = self._client_data(0, evaluate=True)
            self.evals = first.evals
            self._sizes: list[int] | None = None
            self._shares: list[list[int]] = []
            self._pool: list[Example | None] = []
        else:
            pooled = self._client_data(None, evaluate=True)
            self.evals = pooled.evals
            self.read_skipped = list(pooled.skipped)
            self._shares = client_shares(d, pooled.train, clients=recipe.federation.clients, seed=recipe.seed)
            self._sizes = [len(s) for s in self._shares]
            self._pool = [self._encode(r) for r in pooled.train]
            for i, share in enumerate(self._shares):
                if not share:
                    raise DataError(f"client {i}'s share of the data is empty; use fewer clients or more data")

    def _client_data(self, client: int | None, *, evaluate: bool) -> ClientData:
        r = self.recipe
        return client_data(r.data, client, clients=r.federation.clients, seed=r.seed, evaluation=r.eval, evaluate=evaluate)

    def _encode(self, record: dict[str, Any]) -> Example | None:
        try:
            return encode_record(self.tokenizer, record, self.max_length, bos=self._bos)
        except DataError as exc:
            if self.on_error != "skip":
                raise
            self.encode_skipped.append(str(exc))
            return None

    def shard_size(self, client: int) -> int:
        """The client's number of training records (FedAvg's ``shard`` weight)."""
        if self._sizes is not None:
            return self._sizes[client]
        return len(self._natural(client))

    def _natural(self, client: int) -> list[Example | None]:
        if client not in self._own:
            data = self._client_data(client, evaluate=False)
            encode_skipped = len(self.encode_skipped)
            self._own[client] = [self._encode(r) for r in data.train]
            if client in self._counted:  # another worker read this file first and counted what it skipped
                del self.encode_skipped[encode_skipped:]
            else:
                self.read_skipped.extend(data.skipped)
        return self._own[client]

    def release(self, client: int) -> bool:
        """Forget the client's own file (it moves to another worker); whether its skipped records were counted here."""
        read = self._own.pop(client, None) is not None or client in self._counted
        self._counted.discard(client)
        return read

    def adopt(self, client: int, *, counted: bool) -> None:
        """The client moved here: with ``counted``, its file's skipped records were counted by another worker already."""
        if counted:
            self._counted.add(client)

    def examples(self, client: int) -> list[Example]:
        """The client's dataset as its data module builds it (encoded, then packed when ``train.packing``)."""
        encoded = self._natural(client) if self.natural else [self._pool[j] for j in self._shares[client]]
        out = [e for e in encoded if e is not None]
        if not out:
            raise DataError(f"client {client}'s data shard is empty: all {len(encoded)} records were skipped")
        if self.packing:
            out = pack_examples(out, self.max_length, self.pad, self.seed)
        return out


@functools.lru_cache(maxsize=64)
def _order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    sampler = EpochShuffle(size, seed)
    sampler.set_epoch(epoch)
    return tuple(iter(sampler))


# ---------------------------------------------------------------------------------------------------- clients


@dataclass
class VirtualClient:
    """What one virtual client keeps between its rounds, all off the device.

    Attributes:
        client_id: the client.
        epoch: the epoch of its data order it is in.
        position: the next example of that epoch.
        rng: its torch RNG state after its last round (``None``: as built).
        cuda_rng: the same, of the CUDA device when it trains on one.
        core: its algorithm core, while it has a round in flight.
        held: CPU values of the blocks it holds that differ from the global (its unaggregated block).
        optimizer_state: per parameter name, its optimizer state (``train.keep_optimizer_state`` only).
        last_trained: the last round it trained (``-1``: none).
        residuals: its upload residuals per block (error feedback of a lossy upload codec, DESIGN §1.1: what the codec
            dropped from its updates so far, added to its next update of the block), on the CPU. Its core's
            :class:`~pl_parablock.core.codecs.ErrorFeedback` works on this very dict, so it outlives the core: a
            retired client keeps them, and its next core goes on from them, as the real client's one core does.
    """

    client_id: int
    epoch: int = 0
    position: int = 0
    rng: Tensor | None = None
    cuda_rng: Tensor | None = None
    core: ClientCore | None = None
    held: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    optimizer_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_trained: int = -1
    residuals: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def batches(self, examples: Sequence[Example], batch_size: int, seed: int, pad: int) -> Iterator[dict[str, Tensor]]:
        """Its batches from where it stopped: the data loader's order (a seeded permutation per epoch)."""
        n = len(examples)
        while True:
            order = _order(n, seed, self.epoch)
            idx = order[self.position : self.position + batch_size]
            self.position += len(idx)
            if self.position >= n:
                self.epoch, self.position = self.epoch + 1, 0
            yield collate([examples[j] for j in idx], pad)

    def export(self, shards: ClientShards) -> dict[str, Any]:
        """Its state, to go on in another worker process (:meth:`restore`); this copy is dropped (it holds nothing after).

        Only a client with nothing in flight moves (no core, no held blocks).
        """
        if self.core is not None or self.held:
            raise AlgorithmError(f"client {self.client_id} has a round in flight; it cannot move to another worker")
        state = {
            "epoch": self.epoch,
            "position": self.position,
            "rng": self.rng,
            "cuda_rng": self.cuda_rng,
            "optimizer_state": self.optimizer_state,
            "last_trained": self.last_trained,
            "residuals": self.residuals,
            "data_read": shards.release(self.client_id),
        }
        self.rng = self.cuda_rng = None
        self.optimizer_state, self.residuals = {}, {}
        return state

    @classmethod
    def restore(cls, client_id: int, state: dict[str, Any], shards: ClientShards) -> VirtualClient:
        """The client as :meth:`export` gave it."""
        shards.adopt(client_id, counted=bool(state["data_read"]))
        return cls(
            client_id,
            epoch=int(state["epoch"]),
            position=int(state["position"]),
            rng=state["rng"],
            cuda_rng=state["cuda_rng"],
            optimizer_state=state["optimizer_state"],
            last_trained=int(state["last_trained"]),
            residuals=state["residuals"],
        )

    def retire(self) -> None:
        """Nothing in flight any more: drop the core and the held blocks (it holds the global when next sampled).

        Its upload residuals stay (:attr:`residuals`): they are its own, not the global's.
        """
        self.core = None
        self.held = {}


# ---------------------------------------------------------------------------------------------------- server


class ServerBlocks:
    """The server's global blocks (a :class:`~pl_parablock.core.server.GlobalState`) and what a lagging client may still need.

    At round ``t`` every round before it is closed; a pipelined client
    (``parablock``, staleness ``k``) holds the aggregates up to round
    ``t − 1 − k``. So besides the current values, the values that the last
    ``keep`` rounds replaced are kept (references, no copies: at most one
    block per round, or the round's blocks when staggered), and, with a
    lossy download codec, the compressed broadcasts ``D`` of those rounds
    with the version each applies to (the client forms ``g + D`` from the
    version it holds, as a real client does). The state compresses the
    broadcasts with the server's own residual per block (DESIGN §1.1 "The
    global is exact").
    """

    def __init__(self, blocks: Sequence[Mapping[str, Tensor]], keep: int = 1, compression: Compression = NO_COMPRESSION) -> None:
        self.state = GlobalState(blocks, compression=compression)
        self.keep = max(1, keep)
        self.previous: list[tuple[int, int, dict[str, Tensor], int]] = []  # (block, version, values, the round that replaced it)
        self.broadcasts: dict[tuple[int, int], tuple[int, dict[str, Tensor]]] = {}  # (block, version) -> (base version, parts of D)

    @property
    def num_blocks(self) -> int:
        return len(self.state.values)

    def current(self, block: int) -> dict[str, Tensor]:
        return self.state.values[block]

    def is_current(self, block: int, version: int) -> bool:
        return self.state.versions[block] == version

    def _kept(self, block: int, version: int) -> dict[str, Tensor] | None:
        return next((values for b, v, values, _ in self.previous if (b, v) == (block, version)), None)

    def holds(self, block: int, version: int) -> bool:
        """Whether version ``version`` of ``block`` is still held."""
        return self.state.versions[block] == version or self._kept(block, version) is not None

    def value(self, block: int, version: int) -> dict[str, Tensor]:
        """Version ``version`` of ``block`` (the current one, or one the last rounds replaced)."""
        if self.state.versions[block] == version:
            return self.state.values[block]
        kept = self._kept(block, version)
        if kept is not None:
            return kept
        raise AlgorithmError(f"version {version} of block {block} is no longer held (the block is at {self.state.versions[block]})")

    def broadcast(self, block: int, version: int) -> tuple[int, dict[str, Tensor]] | None:
        """The compressed ``D`` that made version ``version`` of ``block`` and the version it applies to; ``None``: not kept."""
        return self.broadcasts.get((block, version))

    def after(self, block: int, round_index: int) -> tuple[int, dict[str, Tensor]]:
        """The version and value ``block`` had once round ``round_index`` was aggregated."""
        if self.state.versions[block] <= round_index:
            return self.state.versions[block], self.state.values[block]
        for b, v, values, _ in reversed(self.previous):  # the newest replaced value at or before the round
            if b == block and v <= round_index:
                return v, values
        raise AlgorithmError(f"block {block} after round {round_index} is no longer held")

    def install(self, round_index: int, block: int, new: dict[str, Tensor]) -> str:
        """Round ``round_index``'s aggregate becomes the block's value; returns ``''`` or why it was refused.

        With a lossy download codec the value becomes ``g + D`` (the
        state's broadcast, compressed with the server's residual) and ``D``
        is kept for the clients that apply the round later.
        """
        self.previous.append((block, self.state.versions[block], self.state.values[block], round_index))
        problem = self.state.install(round_index, block, new)
        sent = self.state.broadcast_at(block, round_index)
        if sent is not None:
            self.broadcasts[(block, round_index)] = sent
        oldest = round_index - self.keep + 1  # what the next rounds may still ask for
        self.previous = [e for e in self.previous if e[3] >= oldest]
        for key in [k for k in self.broadcasts if k[1] < oldest]:
            del self.broadcasts[key]
        return problem


# ---------------------------------------------------------------------------------------------------- executor


@dataclass
class RoundResult:
    """One sampled client's round: its update, measured compute time, samples and tokens."""

    client_id: int
    update: Update
    compute_s: float
    samples: int
    tokens: int


class RoundExecutor(Protocol):
    """What the driver asks of an executor: the contract a sequential, a multi-device or a Ray executor fulfils."""

    def materialize(self, client: VirtualClient, round_index: int, server: ServerBlocks) -> None:
        """Give ``client`` (sampled for ``round_index``, nothing in flight) its core."""

    def run_round(self, round_index: int, clients: Sequence[VirtualClient], server: ServerBlocks) -> list[RoundResult]:
        """Round ``round_index`` of the sampled ``clients``; their results in client-id order."""

    def install(self, block: int, values: Mapping[str, Tensor]) -> None:
        """The round's aggregate is the block's new global value."""


class SharedModelExecutor:
    """Runs a round's sampled clients one after another on one shared model instance.

    Before client ``i`` trains, the shared block parameters are made what
    ``i`` holds (the global blocks, its own unaggregated block, the previous
    version of a block whose aggregate it has not applied yet); its core,
    bound to the shared parameters, applies the aggregates it awaits, begins
    the round, and ``K`` steps run as Lightning's automatic optimization
    does them (``training_step``, ``zero_grad``, ``backward``, optional norm
    clipping, ``step``) on its batches, with its RNG and (when kept) its
    optimizer state; its core ends the round. Then the blocks it holds
    apart from the global go back to the CPU and the shared parameters to
    the global.

    Room to grow: several devices or machines. A Ray-based executor replaces
    this one without touching the core: the driver only calls the
    :class:`RoundExecutor` methods, and ``run_simulation(recipe,
    executor=...)`` takes another. It would start one Ray actor per device,
    each building the model once (``build_model`` with the recipe's seed, as
    the driver does) and holding its own ``SharedModelExecutor``.
    ``run_round`` would send each actor a share of the round's clients — a
    :class:`VirtualClient` is plain data on the CPU (its core holds the
    plan, versions and CPU copies; on the actor it is rebound to that
    actor's parameters, ``core.blocks = executor.blocks``) — together with
    the round's :class:`ServerBlocks` (one ``ray.put`` per round), run
    ``SharedModelExecutor.run_round`` there, and return the clients' new
    states with the :class:`RoundResult` list merged in client-id order:
    the driver adds the updates to the round's step in that order, so the
    global stays bitwise the same whatever the split. ``install`` would
    copy the aggregate into the driver's model (which is evaluated and
    saved) and into every actor's. The data shards are index lists into the
    pooled tokenization, which each actor builds once.
    """

    def __init__(
        self,
        module: ParaBlockModule,
        blocks: Sequence[Mapping[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        plan: Plan,
        shards: ClientShards,
        *,
        local_steps: int,
        weighting: str,
        gradient_clip_val: float | None,
        compression: Compression,
        device: torch.device,
    ) -> None:
        self.module = module
        self.blocks = [dict(b) for b in blocks]
        self.optimizer = optimizer
        self.plan = plan
        self.shards = shards
        self.local_steps = local_steps
        self.weighting = weighting
        self.gradient_clip_val = gradient_clip_val
        self.compression = compression
        self.device = device
        self.initial_rng = torch.get_rng_state()
        self.initial_cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        # a lossy download codec: a client forms each aggregate as g + D from the broadcast (not in a relay, which replaces)
        self.delta_downloads = compression.lossy_download and mode_of(plan.mode).delta_downloads
        self._decoded: dict[int, dict[str, Tensor]] = {}  # round -> its decoded broadcast D (every holder decodes it bitwise alike)

    # ------------------------------------------------------------ shared parameters

    def _copy(self, block: int, values: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.blocks[block].items():
                p.copy_(values[n])

    def install(self, block: int, values: Mapping[str, Tensor]) -> None:
        """The shared parameters take the block's new global value."""
        self._copy(block, values)

    # ------------------------------------------------------------ clients

    def materialize(self, client: VirtualClient, round_index: int, server: ServerBlocks) -> None:
        """Give a client with nothing in flight the core it would have reached by skipping every round since its last.

        It holds the global after the last round its mode has applied before
        ``round_index`` (``round_index − 1``; ``parablock``: ``round_index − 2``,
        and round ``round_index − 1``, which it did not train, skipped). The
        core is rebuilt through its join path (:meth:`~pl_parablock.core.client.ClientCore.restart_at`,
        :meth:`~pl_parablock.core.client.ClientCore.adopt`) and then skips the
        rounds between, as the real client's core did.
        """
        plan = self.plan
        core = ClientCore(plan, client.client_id, self.blocks, compression=self.compression)
        if core.uplink is not None:
            core.uplink.residuals = client.residuals  # its own upload residuals, kept while it had no core
        first = max(0, round_index - plan.staleness)
        if round_index > 0:
            core.restart_at(first)
            for b in range(plan.num_blocks):
                version, values = server.after(b, first - 1)
                # the shared parameters hold the current global: adopting it from them copies nothing
                core.adopt(b, version, self.blocks[b] if server.is_current(b, version) else values)
            for _ in range(first, round_index):
                core.skip()
        client.core = core
        client.held = {
            b: {n: p.detach().to("cpu", copy=True) for n, p in self.blocks[b].items()} for b in range(plan.num_blocks) if not core.clean[b]
        }

    def run_round(self, round_index: int, clients: Sequence[VirtualClient], server: ServerBlocks) -> list[RoundResult]:
        """Round ``round_index`` of each client (in client-id order): its sampled ones train, the others skip."""
        results = []
        for c in sorted(clients, key=lambda c: c.client_id):
            result = self._run_one(c, server)
            if result is not None:
                results.append(result)
        return results

    def _run_one(self, c: VirtualClient, server: ServerBlocks) -> RoundResult | None:
        core = c.core
        if core is None:
            raise AlgorithmError(f"client {c.client_id} has no core; materialize it first")
        touched: set[int] = set()
        awaiting = core.awaiting()
        # the blocks an aggregate it awaits replaces; unless it forms the aggregate as g + D, their old value is never read
        replaced = set() if self.delta_downloads else {b for r in awaiting for b in self.plan.blocks_of(r)}
        for b in range(self.plan.num_blocks):  # the client's own view of the model
            if not core.clean[b]:
                self._copy(b, c.held[b])
                touched.add(b)
            elif not server.is_current(b, core.versions[b]):
                if b in replaced and not server.holds(b, core.versions[b]):
                    continue  # an aggregate it awaits replaces this old value before anything reads it
                self._copy(b, server.value(b, core.versions[b]))
                touched.add(b)
        for r in awaiting:
            core.apply(r, r, self._aggregate(core, r, server))
            touched.update(self.plan.blocks_of(r))
        result = None
        if core.participates():
            start = core.begin()
            touched.add(start.block)
            result = self._train(c, start)
            c.last_trained = start.round
        else:
            core.skip()
        c.held = {
            b: {n: p.detach().to("cpu", copy=True) for n, p in self.blocks[b].items()}
            for b in range(self.plan.num_blocks)
            if not core.clean[b]
        }
        for b in touched:
            self._copy(b, server.current(b))
        return result

    def _aggregate(self, core: ClientCore, round_index: int, server: ServerBlocks) -> dict[str, Tensor]:
        """Round ``round_index``'s aggregate of every block it moved, as the client receives it.

        With a lossy download codec, the client forms ``g + D`` from the
        round's broadcast and the global it holds
        (:meth:`~pl_parablock.core.client.ClientCore.compressed_aggregate`),
        as a real client does and as the reference does; ``D`` is decoded
        once per round (decoding is deterministic: every holder decodes the
        same tensor bitwise). Otherwise (or when the server kept its
        previous value, a refused aggregate, and sent no ``D``) the server's
        values.
        """
        blocks = self.plan.blocks_of(round_index)
        if self.delta_downloads:
            sent = [server.broadcast(b, round_index) for b in blocks]
            if all(x is not None for x in sent):
                delta = self._decoded.get(round_index)
                if delta is None:
                    parts = {n: t for x in sent if x is not None for n, t in x[1].items()}
                    shapes = {n: tuple(t.shape) for b in blocks for n, t in server.current(b).items()}
                    delta = decode_broadcast(self.compression, parts, shapes)
                    self._decoded = {round_index: delta}  # the clients of a round all apply the same round
                bases = {b: x[0] for b, x in zip(blocks, sent) if x is not None}
                return core.compressed_aggregate(round_index, delta, bases)
        return {n: t for b in blocks for n, t in server.value(b, round_index).items()}

    def _train(self, c: VirtualClient, start: RoundStart) -> RoundResult:
        """``K`` local steps of block ``start.block`` on the client's batches, then its update."""
        assert c.core is not None
        activate(self.blocks, start, [self.optimizer])
        block = self.blocks[start.block]
        if not start.fresh_optimizer_state:
            for n, p in block.items():
                if n in c.optimizer_state:
                    self.optimizer.state[p] = {
                        k: v.to(p.device) if isinstance(v, Tensor) and v.dim() else v for k, v in c.optimizer_state[n].items()
                    }
        torch.set_rng_state(c.rng if c.rng is not None else self.initial_rng)
        if self.initial_cuda_rng is not None:
            torch.cuda.set_rng_state(c.cuda_rng if c.cuda_rng is not None else self.initial_cuda_rng, self.device)
        examples = self.shards.examples(c.client_id)
        batches = c.batches(examples, self.shards.batch_size, self.shards.seed, self.shards.pad)
        t0 = time.perf_counter()
        on_device = ({k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches)
        samples, tokens, loss_value = plain_steps(self.module, self.optimizer, on_device, self.local_steps, self.gradient_clip_val)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_s = time.perf_counter() - t0
        c.rng = torch.get_rng_state()
        if self.initial_cuda_rng is not None:
            c.cuda_rng = torch.cuda.get_rng_state(self.device)
        if not start.fresh_optimizer_state:
            c.optimizer_state.update(
                {
                    n: {k: v.to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in self.optimizer.state[p].items()}
                    for n, p in block.items()
                    if p in self.optimizer.state
                }
            )
        for p in block.values():
            self.optimizer.state.pop(p, None)
            p.grad = None
        update = c.core.end(
            samples=samples, tokens=int(tokens), shard=self.shards.shard_size(c.client_id), weighting=self.weighting, loss=loss_value
        )
        return RoundResult(c.client_id, update, compute_s, samples, int(tokens))
