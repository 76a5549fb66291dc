"""The recipe: schema, loading, overrides and validation.

A recipe is a YAML file whose keys follow the dataclasses below. The schema's
defaults are the offline quickstart, so a recipe only writes what it changes.
Command-line overrides use OmegaConf's dotlist form (``train.lr=1e-4``).

Every problem in a recipe (an unknown key, a wrong type, an impossible value,
a missing file) is collected and reported at once in one :class:`ConfigError`
that names each key.

Example::

    >>> from pl_parablock.recipe.schema import load_recipe
    >>> recipe = load_recipe(None, ["mode=sync", "federation.clients=2"])
    >>> recipe.mode, recipe.federation.clients
    ('sync', 2)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pl_parablock.core.aggregate import AGGREGATIONS
from pl_parablock.core.blocks import SCHEDULES
from pl_parablock.core.codecs import CODECS, WIRE_DTYPE_CODECS, Codec, Compression, make_codec
from pl_parablock.core.optimizers import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer
from pl_parablock.core.plan import ASSIGNMENTS, CYCLIC_ORDERS, MODES, WEIGHTINGS
from pl_parablock.data.formats import DATA_FORMATS, ROW_FORMAT_CHOICES
from pl_parablock.errors import ConfigError
from pl_parablock.model.build import DTYPES
from pl_parablock.simulation.profile import DISTRIBUTIONS, profile_problems
from pl_parablock.wire.framing import WIRE_DTYPES

# The vocabularies are the modules' that implement them, imported above (modes and weightings: the
# algorithm core; schedules; parameter and wire dtypes; data and row formats; aggregation rules).
PARTITIONS = ("iid", "dirichlet", "natural")
ON_ERROR = ("raise", "skip")
PEFT_METHODS = ("lora", "ffa_lora")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


def _quickstart_model() -> dict[str, Any]:
    """A small Llama-architecture causal LM that trains on a CPU in minutes."""
    return {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1.0e-5,
        "tie_word_embeddings": False,
    }


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-5`` is a float (as in YAML 1.2 and OmegaConf), not a string.

    Free-form sections such as ``model.config`` are passed on as read, so a
    string there would reach transformers instead of the number meant.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class PeftSection:
    """Parameter-efficient fine-tuning: LoRA adapters instead of the full weights."""

    method: str | None = field(
        default=None,
        metadata=_help(
            "null: train the model's own weights | lora: LoRA adapters (A and B trained and sent) | "
            "ffa_lora: FFA-LoRA (A frozen at its seeded random init, only B trained and sent)."
        ),
    )
    r: int = field(default=8, metadata=_help("LoRA rank."))
    alpha: int = field(default=16, metadata=_help("LoRA alpha; the update is scaled by alpha / r."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the adapters' input during training."))
    target_modules: Any = field(
        default=None,
        metadata=_help(
            "Modules that get adapters: a list of module names (e.g. [q_proj, v_proj]), 'all-linear', "
            "or null for peft's default for the architecture."
        ),
    )
    merge: bool = field(
        default=False,
        metadata=_help("Also save the base model with the adapters merged in, as a full model, in OUTPUT_DIR/merged_model."),
    )


@dataclass
class ModelSection:
    """Which causal LM to fine-tune."""

    config: dict[str, Any] | None = field(
        default_factory=_quickstart_model,
        metadata=_help(
            "Hugging Face config of a model built from scratch (needs `model_type`); "
            "`vocab_size` defaults to the offline tokenizer's. Exclusive with `path`."
        ),
    )
    path: str | None = field(
        default=None,
        metadata=_help("Local directory of a Hugging Face causal LM (config.json + weights). Set `model.config=null` to use it."),
    )
    tokenizer: str | None = field(
        default=None,
        metadata=_help(
            "Tokenizer directory; default: the project's offline byte-level tokenizer "
            "for `config`, the checkpoint's own tokenizer for `path`."
        ),
    )
    dtype: str = field(default="float32", metadata=_help("Parameter dtype: " + " | ".join(DTYPES)))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in the backward pass to save memory."))
    peft: PeftSection = field(default_factory=PeftSection)


@dataclass
class BlocksSection:
    """How the trainable parameters are split into blocks, and the order they train in."""

    layers_per_block: int = field(default=1, metadata=_help("Consecutive decoder layers per block."))
    schedule: Any = field(
        default="ascending",
        metadata=_help(
            "Active block per round: ascending | descending | random (a seeded "
            "permutation per sweep) | an explicit list of block indices, repeated."
        ),
    )
    embeddings: bool = field(default=False, metadata=_help("Make the input embeddings a block of their own."))
    head: bool = field(default=False, metadata=_help("Make the LM head a block of its own."))
    assignment: str = field(
        default="shared",
        metadata=_help(
            "shared: every client trains the round's block b_t | staggered: client i trains (b_t + i) mod M, so several "
            "blocks move each round (each aggregated over the clients that trained it; sync and parablock)."
        ),
    )
    patterns: list[str] | None = field(
        default=None,
        metadata=_help(
            "Explicit blocks: one regular expression per block, matched in full "
            "against parameter names. Replaces the layer-based partition."
        ),
    )


@dataclass
class TrainSection:
    """Local training of each client."""

    local_steps: int = field(default=5, metadata=_help("Optimizer steps per round (K)."))
    lr: float = field(default=3.0e-4, metadata=_help("AdamW learning rate."))
    batch_size: int = field(default=8, metadata=_help("Sequences per batch."))
    max_length: int = field(default=128, metadata=_help("Tokens per sequence; longer examples are truncated."))
    packing: bool = field(
        default=False,
        metadata=_help(
            "false: one example per row, truncated to max_length and padded to the batch; "
            "true: examples (each truncated to max_length first) packed whole into rows of max_length "
            "tokens, each attending only to itself."
        ),
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    keep_optimizer_state: bool = field(
        default=False,
        metadata=_help(
            "Keep each block's optimizer state across its rounds (default: a block's state is created fresh at the "
            "start of every round it trains in, in every mode, so only the active block holds state)."
        ),
    )
    accumulate_grad_batches: int = field(default=1, metadata=_help("Batches per optimizer step; rounds count optimizer steps."))
    gradient_clip_val: float | None = field(default=None, metadata=_help("Clip the gradient norm to this value."))
    precision: str = field(default="32-true", metadata=_help("Lightning precision: " + " | ".join(PRECISIONS)))
    accelerator: str = field(default="auto", metadata=_help("Lightning accelerator of each client."))
    threads: int | None = field(
        default=None,
        metadata=_help("CPU threads per client process; default: the machine's cores shared among local clients."),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=_help(
            "Save the client's Lightning checkpoint (model, optimizer, rounds) every N rounds to "
            "OUTPUT_DIR/checkpoints/client_I.ckpt; a restarted client resumes from it. 0: never."
        ),
    )


@dataclass
class TLSSection:
    """TLS files. Server: cert and key. Clients: ca (the server's certificate or its CA)."""

    cert: str | None = field(default=None, metadata=_help("Server certificate (PEM); with `key`, the server serves TLS only."))
    key: str | None = field(default=None, metadata=_help("Server private key (PEM)."))
    ca: str | None = field(
        default=None, metadata=_help("CA certificate (PEM) clients verify the server with; a self-signed server's own certificate.")
    )


@dataclass
class ServerOptimizerSection:
    """The server's optimizer per block (FedOpt, Reddi et al., Adaptive Federated Optimization)."""

    name: str = field(
        default="sgd",
        metadata=_help(
            "sgd | momentum (FedAvgM) | adam | yogi | adagrad: x_b <- x_b - opt(-mean delta), state per block on the server "
            "and in its checkpoints; sgd with lr 1 is FedAvg, bitwise."
        ),
    )
    lr: float | None = field(default=None, metadata=_help("Server learning rate; null: `federation.server_lr`."))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99], metadata=_help("[beta1, beta2]: momentum and second-moment decay."))
    tau: float = field(default=1.0e-3, metadata=_help("Adaptivity tau of adam, yogi and adagrad (second moments start at tau^2)."))


@dataclass
class CompressionSection:
    """How updates travel up and aggregates down: a codec with error feedback (the global stays exact)."""

    codec: str = field(
        default="none",
        metadata=_help(
            "Codec of the uploads (and of the downloads unless `download` says otherwise): "
            + " | ".join(CODECS)
            + ". A lossy codec sends each update as a compressed delta Q(delta + residual); the server broadcasts "
            "Q(aggregate delta + its residual) and every holder applies g + D, so the server and all clients hold the same "
            "global bitwise."
        ),
    )
    error_feedback: bool = field(
        default=True,
        metadata=_help(
            "Keep each sender's compression error per block (client: on the CPU; server: per block) and add it to the next send."
        ),
    )
    download: str | None = field(
        default=None, metadata=_help("Codec of the server's broadcasts: " + " | ".join(CODECS) + "; null: the same as `codec`.")
    )
    group: int = field(default=128, metadata=_help("int8, fp8, int4, topk: values per absmax scale."))
    fraction: float = field(default=0.01, metadata=_help("topk: share of each tensor's values sent, in (0, 1]."))


@dataclass
class FederationSection:
    """The federation: clients, rounds and the server."""

    clients: int = field(default=4, metadata=_help("Number of clients."))
    rounds: int = field(default=12, metadata=_help("Global rounds; one active block per round."))
    server_lr: float = field(default=1.0, metadata=_help("Server learning rate (eta_g); 1.0 is FedAvg."))
    weighting: str = field(
        default="samples",
        metadata=_help(
            "Client weight in the aggregate: samples | tokens seen in the round, shard (the client's number of training "
            "records, FedAvg's usual weight) | uniform."
        ),
    )
    min_clients: int | None = field(
        default=None,
        metadata=_help("Quorum to close a round at `round_timeout_s`; default: all clients."),
    )
    round_timeout_s: float | None = field(
        default=None,
        metadata=_help("Close a round after this many seconds if `min_clients` arrived; null: wait for all."),
    )
    timeout_s: float = field(
        default=600.0,
        metadata=_help("Longest any single network wait may take before the run stops with an error."),
    )
    wire_dtype: str | None = field(
        default=None,
        metadata=_help(
            "Dtype the uploads travel in: " + " | ".join(WIRE_DTYPES) + "; null: the parameters' own. "
            "A shorthand for `compression: {codec: bf16 | fp16, error_feedback: false, download: none}`: bfloat16 halves "
            "the upload bytes (updates then travel as deltas), downloads carry the exact global."
        ),
    )
    chunk_kb: int = field(default=1024, metadata=_help("Size of one streamed chunk, KiB."))
    receive_window_kb: int | None = field(
        default=None,
        metadata=_help(
            "Server: HTTP/2 receive window of each upload, KiB. null: gRPC's adaptive window (BDP probing: at least 4 MiB, "
            "growing to twice the bandwidth-delay product, so one upload keeps up with a 1 Gbit/s link at 100 ms). A number "
            "fixes it (bounds the server's buffer per upload to about two windows) and caps one upload at a window per round "
            "trip: 1024 KiB at 100 ms is 84 Mbit/s."
        ),
    )
    data_port: int | None = field(
        default=0,
        metadata=_help(
            "Server: port of the data plane, where blocks (updates, aggregates, the initial state) travel as plain TCP "
            "frames beside gRPC (TLS with federation.tls), several times faster than gRPC's Python bindings; clients "
            "learn it when they join and keep to gRPC if they cannot reach it. 0: any free port; null: none (one port, "
            "gRPC only: for a firewall that opens one)."
        ),
    )
    max_uploads: int | None = field(
        default=None,
        metadata=_help(
            "Server: uploads (updates, initial state) it reads at once; the others wait their turn before they send anything. "
            "Each upload read buffers up to its receive window in the server. null: 4, or federation.clients when fewer; "
            "raise it when many clients upload over links slower than the server's (their rates add up only when admitted "
            "together)."
        ),
    )
    token: Any = field(
        default=None,
        metadata=_help(
            "Shared secret every client presents; or a mapping client id -> that client's own token. "
            "The environment variable PL_PARABLOCK_TOKEN, when set, wins. null: no authentication."
        ),
    )
    compression: CompressionSection = field(default_factory=CompressionSection)
    tls: TLSSection = field(default_factory=TLSSection)
    server_optimizer: ServerOptimizerSection = field(default_factory=ServerOptimizerSection)
    gather_s: float = field(
        default=60.0,
        metadata=_help(
            "Before every client has joined once, the server asks updates to retry until this many seconds after the first "
            "join, so that a client starting late still starts at round 0 like the others; 0: no wait."
        ),
    )
    clients_per_round: int | None = field(
        default=None, metadata=_help("Clients sampled (seeded) to train each round; the others only fetch the aggregate.")
    )
    checkpoint_every: int = field(
        default=0,
        metadata=_help("Write the server checkpoint (OUTPUT_DIR/server) every N rounds; a restarted server resumes from it. 0: never."),
    )
    aggregation: str = field(
        default="mean",
        metadata=_help("mean (weighted FedAvg) | trimmed_mean | median (coordinate-wise over the round's deltas, for untrusted clients)."),
    )
    trim_fraction: float = field(default=0.1, metadata=_help("Share of values trimmed at each end by trimmed_mean."))
    clip_norm: float | None = field(default=None, metadata=_help("Scale every client's delta down to this L2 norm."))
    max_update_norm: float | None = field(default=None, metadata=_help("Refuse updates whose delta has a larger L2 norm."))
    max_weight: float | None = field(
        default=None,
        metadata=_help(
            "Server: refuse an update whose weight is larger. null: what one client can see in a round, from the recipe: "
            "samples: train.local_steps x train.accumulate_grad_batches x train.batch_size; tokens: that x train.max_length; "
            "shard: data.num_samples (synthetic data; with data files give it: the largest shard); uniform: exactly 1. "
            "Raise it for a client spanning several devices."
        ),
    )
    idle_timeout_s: float = field(
        default=60.0,
        metadata=_help(
            "Server: cut a call whose peer sent nothing for this long while the server waits for its next message "
            "(a half-open or stalled stream). Must exceed the time one chunk takes on the slowest client's link."
        ),
    )
    max_calls: int | None = field(
        default=None,
        metadata=_help("Server: calls served at once; the rest are refused at once (the client retries). null: 6 x clients + 16."),
    )
    max_calls_per_peer: int | None = field(
        default=None,
        metadata=_help(
            "Server: calls of one peer at once (a client id when every client has its own token, else a host). "
            "null: 8 per client id, 4 x clients + 4 per host."
        ),
    )


@dataclass
class LinkSection:
    """Emulated network link of every client (for experiments on one machine)."""

    uplink_mbps: float | None = field(default=None, metadata=_help("Upload rate, Mbit/s; null: no emulation."))
    downlink_mbps: float | None = field(default=None, metadata=_help("Download rate, Mbit/s; null: no emulation."))
    latency_ms: float = field(default=0.0, metadata=_help("One-way latency added to each transfer, ms."))


@dataclass
class PartitionSection:
    """How the training data is split among clients."""

    kind: str = field(
        default="iid",
        metadata=_help(
            "iid | dirichlet (skew over `label`) | natural (each client trains on its own file: "
            "data.client_paths[i], or data.path given to that client)."
        ),
    )
    alpha: float | None = field(default=None, metadata=_help("Dirichlet concentration; smaller is more skewed."))
    label: str = field(
        default="category",
        metadata=_help("Record field (data column) the Dirichlet skew is drawn over, e.g. category or source."),
    )


@dataclass
class DataSection:
    """Training data."""

    format: str = field(
        default="synthetic",
        metadata=_help(
            "Data format: synthetic (generated offline) | alpaca (JSON/JSONL of instruction/input/output) | "
            "gsm8k (JSONL of question/answer with a final '#### N') | chat (JSONL of `messages`) | "
            "hf (a Hugging Face `datasets` data set from local files or a save_to_disk directory)."
        ),
    )
    path: str | None = field(
        default=None,
        metadata=_help(
            "Data file (JSON or JSONL; for hf also CSV, Parquet, Arrow, or a save_to_disk directory); "
            "not used by synthetic. With partition.kind=natural on several machines, each client's own file."
        ),
    )
    client_paths: list[str] | None = field(
        default=None,
        metadata=_help("partition.kind=natural on one machine: one data file per client, in client order."),
    )
    partition: PartitionSection = field(default_factory=PartitionSection)
    num_samples: int = field(default=2000, metadata=_help("Records the synthetic generator makes for training."))
    on_error: str = field(
        default="raise",
        metadata=_help(
            "A bad record (malformed line, missing field, chat template failure): raise (stop with "
            "file and line) | skip (drop it, count it, report the count)."
        ),
    )
    columns: dict[str, str] | None = field(
        default=None,
        metadata=_help(
            "Field names of the rows when they differ from the format's, as {format field: your column}, "
            "e.g. {question: problem, answer: solution}."
        ),
    )
    split: str = field(default="train", metadata=_help("hf: the split of a saved DatasetDict to train on."))
    row_format: str = field(
        default="auto",
        metadata=_help(
            "hf: how rows read: " + " | ".join(ROW_FORMAT_CHOICES) + " (auto: chat if there is a messages column, "
            "gsm8k with question/answer, alpaca with instruction/output)."
        ),
    )


@dataclass
class EvalSection:
    """Evaluation of the global model."""

    every: int = field(
        default=0,
        metadata=_help("Evaluate the global model every N rounds on client 0 (a curve in report.json); 0: only at the end."),
    )
    path: str | None = field(
        default=None,
        metadata=_help("Held-out file in `data.format`; default: a held-out part of the data."),
    )
    split: str | None = field(
        default=None,
        metadata=_help("hf: evaluate on this split (of eval.path, else of data.path), e.g. test."),
    )
    max_samples: int = field(default=200, metadata=_help("Evaluation records at most."))
    max_new_tokens: int = field(default=24, metadata=_help("Greedy tokens generated per math question for exact match."))


@dataclass
class LoggingSection:
    """Lightning loggers: each client's and the server's records under OUTPUT_DIR/logs/."""

    csv: bool = field(
        default=True,
        metadata=_help("CSV logs: OUTPUT_DIR/logs/client_I/metrics.csv (loss, lr, round, block, blocked time, bytes) and logs/server/."),
    )
    tensorboard: bool = field(
        default=False,
        metadata=_help(
            "TensorBoard event files in the same folders (`tensorboard --logdir OUTPUT_DIR/logs`); needs tensorboard installed."
        ),
    )


@dataclass
class ProfileSection:
    """Each virtual client's compute speed and link in the simulator's clock (python -m pl_parablock.simulate)."""

    compute_factor: Any = field(
        default=1.0,
        metadata=_help(
            "Multiplier on the measured step time: a number (every client), a list (one per client), or a seeded "
            "distribution {distribution: " + " | ".join(DISTRIBUTIONS) + ", median: 1.0, spread: 0.5} (spread: sigma of log)."
        ),
    )
    uplink_mbps: Any = field(
        default=None,
        metadata=_help("Upload rate, Mbit/s: number, list per client (null entries: unlimited) or distribution; null: link.uplink_mbps."),
    )
    downlink_mbps: Any = field(
        default=None,
        metadata=_help("Download rate, Mbit/s: number, list per client or distribution; null: link.downlink_mbps."),
    )
    latency_ms: Any = field(
        default=None,
        metadata=_help("One-way latency per transfer, ms: number, list per client or distribution; null: link.latency_ms."),
    )
    csv: str | None = field(
        default=None,
        metadata=_help(
            "CSV file, one row per client in client order, with a header naming some of client, compute_factor, "
            "uplink_mbps, downlink_mbps, latency_ms; its columns win over the keys above."
        ),
    )


@dataclass
class SimulationSection:
    """The simulator (python -m pl_parablock.simulate): virtual clients on one model, and a simulated clock."""

    profile: ProfileSection = field(default_factory=ProfileSection)
    aggregation_s: float | None = field(
        default=None,
        metadata=_help("Server time to aggregate one round in the simulated clock; null: the measured time of the simulator's own step."),
    )
    bandwidth_mbps: float | None = field(
        default=None,
        metadata=_help("Total server bandwidth, Mbit/s each way, shared max-min fairly by a round's transfers; null: unlimited."),
    )


@dataclass
class Recipe:
    """A whole run. Defaults are the offline quickstart."""

    mode: str = field(
        default="parablock",
        metadata=_help(
            "parablock | sync | fedavg | cyclic (FedCyBGD: clients in turn, each training its block of the model the "
            "previous one left; blocks.schedule then assigns client i in epoch e: ascending (i + e) mod M | descending | random)"
        ),
    )
    seed: int = field(default=0, metadata=_help("Seed of model init, data and schedule."))
    output_dir: str = field(default="runs/quickstart", metadata=_help("Where report.json and model/ go."))
    model: ModelSection = field(default_factory=ModelSection)
    blocks: BlocksSection = field(default_factory=BlocksSection)
    train: TrainSection = field(default_factory=TrainSection)
    federation: FederationSection = field(default_factory=FederationSection)
    link: LinkSection = field(default_factory=LinkSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)


# ---------------------------------------------------------------------------
# loading


def _first_line(exc: OmegaConfBaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _leaves(base: DictConfig, value: Any, prefix: str) -> list[tuple[str, Any]]:
    """Flatten a user mapping into (dotted key, value) pairs.

    Recursion stops at keys whose schema node is not a section (a free-form
    dict such as ``model.config`` is one leaf and replaces the default).
    """
    node = OmegaConf.select(base, prefix, throw_on_missing=False) if prefix else base
    is_section = isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))
    if isinstance(value, dict) and (is_section or not prefix):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(_leaves(base, v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, value)]


def _assign(cfg: DictConfig, key: str, value: Any, problems: list[str]) -> None:
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        merge = isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))
        OmegaConf.update(cfg, key, value, merge=merge)
    except OmegaConfBaseException as exc:
        problems.append(f"`{key}`: {_first_line(exc)}")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{item}` is not of the form key=value (e.g. train.lr=1e-4)")
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))
    assert isinstance(parsed, dict)
    return key.strip(), parsed["v"]


def load_recipe(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Recipe:
    """Load, merge and validate a recipe.

    Args:
        path: YAML recipe; ``None`` starts from the schema defaults (the quickstart).
        overrides: OmegaConf dotlist items such as ``["mode=sync", "train.lr=1e-4"]``.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        ConfigError: listing every problem found, each naming its key.
    """
    source = str(path) if path is not None else None
    user: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"recipe file `{path}` not found; pass the path of a YAML recipe such as recipes/quickstart.yaml")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.load(f, Loader=_RecipeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("the top level must be a mapping of keys (mode:, model:, ...)", source)
        user = loaded

    cfg = OmegaConf.structured(Recipe)
    problems: list[str] = []
    for key, value in _leaves(cfg, user, ""):
        _assign(cfg, key, value, problems)
    for item in overrides or []:
        key, value = _parse_override(item)
        _assign(cfg, key, value, problems)
    if problems:
        raise ConfigError(problems, source)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            [f"`{key}` must be given (the recipe leaves it as ???): add {key}=... to the command line" for key in missing], source
        )
    recipe = OmegaConf.to_object(cfg)
    assert isinstance(recipe, Recipe)
    problems = validate(recipe)
    if problems:
        raise ConfigError(problems, source)
    return recipe


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference_rows(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every recipe key, from the schema itself."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows.extend(reference_rows(type(default), key + "."))
            continue
        kind = str(f.type).replace(" | ", " or ")
        rows.append((key, kind, _show(default), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """The recipe reference as a Markdown table (the README embeds it; a test keeps them equal)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in reference_rows():
        cell = default if len(default) <= 40 else "see below"
        lines.append(f"| `{key}` | `{kind}` | `{cell}` | {meaning.replace('|', '&#124;')} |")
    lines.append("")
    lines.append(f"Default `model.config` (the quickstart model): `{_show(ModelSection().config)}`.")
    return "\n".join(lines)


TOKEN_ENV = "PL_PARABLOCK_TOKEN"


def compression_of(recipe: Recipe) -> Compression:
    """How the recipe's updates and aggregates travel (``federation.compression``, or the ``wire_dtype`` shorthand)."""
    f = recipe.federation
    c = f.compression
    if c.codec == "none" and f.wire_dtype is not None:
        return Compression(make_codec(WIRE_DTYPE_CODECS[f.wire_dtype]), make_codec("none"), error_feedback=False)
    return Compression(codec_of(c.codec, c), codec_of(c.download or c.codec, c), error_feedback=bool(c.error_feedback))


def codec_of(name: str, section: Any) -> Codec:
    """The codec ``name`` with the options of ``federation.compression`` it takes."""
    options: dict[str, Any] = {}
    if name in ("int8", "fp8", "int4", "topk"):
        options["group"] = section.group
    if name == "topk":
        options["fraction"] = section.fraction
    return make_codec(name, **options)


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


def to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML (all keys, resolved), e.g. to record it next to a run."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data."""
    out = OmegaConf.to_container(OmegaConf.structured(recipe))
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# validation


def _one_of(problems: list[str], key: str, value: Any, allowed: Collection[str]) -> None:
    if value not in allowed:
        problems.append(f"`{key}` is {value!r}; allowed: {', '.join(allowed)}")


def _at_least(problems: list[str], key: str, value: float | int | None, low: float, strict: bool = False) -> None:
    if value is None:
        return
    bad = value <= low if strict else value < low
    if bad:
        rel = ">" if strict else ">="
        problems.append(f"`{key}` is {value}; it must be {rel} {low}")


def _tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


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


def _validate_cyclic(p: list[str], recipe: Recipe) -> None:
    """FedCyBGD's relay: one client a round, in turn; its trained block replaces the global block."""
    f, b = recipe.federation, recipe.blocks
    if not (isinstance(b.schedule, str) and b.schedule in CYCLIC_ORDERS):
        p.append(f"`blocks.schedule` is {b.schedule!r}; mode=cyclic assigns blocks {' | '.join(CYCLIC_ORDERS)}")
    if f.clients_per_round is not None:
        p.append("`federation.clients_per_round` is set but mode=cyclic visits every client in turn; remove it")
    if f.server_lr != 1.0 or f.server_optimizer.name != "sgd" or f.server_optimizer.lr not in (None, 1.0):
        p.append(
            "`federation.server_optimizer` / `federation.server_lr`: mode=cyclic replaces the global block with the trained "
            "one; use sgd at lr 1"
        )
    if f.aggregation != "mean":
        p.append(f"`federation.aggregation` is {f.aggregation!r}; mode=cyclic has one update a round (use mean)")


def validate(recipe: Recipe) -> list[str]:
    """Semantic checks of a typed recipe; returns one line per problem."""
    p: list[str] = []
    if recipe.logging.tensorboard and not _tensorboard_installed():
        p.append('`logging.tensorboard` needs tensorboard (or tensorboardX), not installed: pip install "pl_parablock[tensorboard]"')
    _one_of(p, "mode", recipe.mode, MODES)
    _at_least(p, "seed", recipe.seed, 0)
    if not recipe.output_dir:
        p.append("`output_dir` is empty; name a directory for report.json and model/")

    m = recipe.model
    if m.config is not None and m.path is not None:
        p.append("`model.config` and `model.path` are exclusive: set model.config=null to load model.path")
    elif m.config is None and m.path is None:
        p.append("set `model.config` (build from a config) or `model.path` (load a local checkpoint)")
    if m.config is not None and not m.config.get("model_type"):
        p.append("`model.config` needs a `model_type` (e.g. llama, qwen2, mistral, gpt2)")
    if m.path is not None and not os.path.isfile(os.path.join(m.path, "config.json")):
        p.append(f"`model.path` {m.path!r} is not a model directory (no config.json there); save one with save_pretrained")
    if m.tokenizer is not None and not os.path.isdir(m.tokenizer):
        p.append(f"`model.tokenizer` {m.tokenizer!r} is not a directory")
    _one_of(p, "model.dtype", m.dtype, DTYPES)
    _validate_peft(p, recipe)

    b = recipe.blocks
    _at_least(p, "blocks.layers_per_block", b.layers_per_block, 1)
    if recipe.mode == "cyclic":
        _validate_cyclic(p, recipe)
    _one_of(p, "blocks.assignment", b.assignment, ASSIGNMENTS)
    if b.assignment == "staggered" and recipe.mode not in ("sync", "parablock"):
        p.append(f"`blocks.assignment` is staggered but mode={recipe.mode} has one block a round; use shared")
    if b.assignment == "staggered" and recipe.federation.aggregation != "mean":
        p.append(f"`blocks.assignment` is staggered: federation.aggregation={recipe.federation.aggregation} does not support it; use mean")
    if isinstance(b.schedule, str):
        _one_of(p, "blocks.schedule", b.schedule, SCHEDULES)
    elif isinstance(b.schedule, list):
        if not b.schedule or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in b.schedule):
            p.append(f"`blocks.schedule` list {b.schedule!r} must hold block indices >= 0")
    else:
        p.append(f"`blocks.schedule` is {b.schedule!r}; give {', '.join(SCHEDULES)} or a list of block indices")
    if b.patterns is not None:
        if not b.patterns:
            p.append("`blocks.patterns` is empty; give one regular expression per block, or null")
        for i, pat in enumerate(b.patterns):
            try:
                re.compile(pat)
            except re.error as exc:
                p.append(f"`blocks.patterns[{i}]` {pat!r} is not a regular expression: {exc}")

    t = recipe.train
    _at_least(p, "train.local_steps", t.local_steps, 1)
    _at_least(p, "train.lr", t.lr, 0.0, strict=True)
    _at_least(p, "train.batch_size", t.batch_size, 1)
    _at_least(p, "train.max_length", t.max_length, 8)
    _at_least(p, "train.weight_decay", t.weight_decay, 0.0)
    _at_least(p, "train.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    _at_least(p, "train.gradient_clip_val", t.gradient_clip_val, 0.0, strict=True)
    _one_of(p, "train.precision", t.precision, PRECISIONS)
    _at_least(p, "train.threads", t.threads, 1)
    _at_least(p, "train.checkpoint_every", t.checkpoint_every, 0)

    f = recipe.federation
    _at_least(p, "federation.clients", f.clients, 1)
    _at_least(p, "federation.rounds", f.rounds, 1)
    _at_least(p, "federation.server_lr", f.server_lr, 0.0, strict=True)
    _at_least(p, "federation.gather_s", f.gather_s, 0.0)
    so = f.server_optimizer
    _one_of(p, "federation.server_optimizer.name", so.name, SERVER_OPTIMIZERS)
    _at_least(p, "federation.server_optimizer.lr", so.lr, 0.0, strict=True)
    _at_least(p, "federation.server_optimizer.tau", so.tau, 0.0, strict=True)
    if len(so.betas) != 2 or not all(0.0 <= b < 1.0 for b in so.betas):
        p.append(f"`federation.server_optimizer.betas` is {list(so.betas)}; give two numbers in [0, 1), e.g. [0.9, 0.99]")
    if so.name != "sgd" and f.aggregation != "mean":
        p.append(
            f"`federation.server_optimizer.name` is {so.name!r} but federation.aggregation={f.aggregation} forms the new "
            "global directly from robust statistics a server optimizer cannot follow; use aggregation=mean or server_optimizer sgd"
        )
    _one_of(p, "federation.weighting", f.weighting, WEIGHTINGS)
    if f.min_clients is not None and not 1 <= f.min_clients <= max(f.clients, 1):
        p.append(f"`federation.min_clients` is {f.min_clients}; it must be between 1 and federation.clients ({f.clients})")
    _at_least(p, "federation.round_timeout_s", f.round_timeout_s, 0.0, strict=True)
    _at_least(p, "federation.timeout_s", f.timeout_s, 0.0, strict=True)
    if f.wire_dtype is not None:
        _one_of(p, "federation.wire_dtype", f.wire_dtype, WIRE_DTYPES)
    c = f.compression
    _one_of(p, "federation.compression.codec", c.codec, CODECS)
    if c.download is not None:
        _one_of(p, "federation.compression.download", c.download, CODECS)
    _at_least(p, "federation.compression.group", c.group, 1)
    if isinstance(c.fraction, bool) or not isinstance(c.fraction, (int, float)) or not 0.0 < c.fraction <= 1.0:
        p.append(f"`federation.compression.fraction` is {c.fraction!r}; the share of values topk sends must be in (0, 1], e.g. 0.01")
    if f.wire_dtype not in (None, "float32") and c.codec != "none":
        p.append(
            f"`federation.wire_dtype` ({f.wire_dtype}) and `federation.compression.codec` ({c.codec}) both set how uploads "
            "travel; keep `compression` alone"
        )
    _at_least(p, "federation.chunk_kb", f.chunk_kb, 1)
    if f.chunk_kb > 32768:
        p.append(f"`federation.chunk_kb` is {f.chunk_kb}; at most 32768 (32 MiB) fits a message")
    _at_least(p, "federation.receive_window_kb", f.receive_window_kb, 64)
    if f.receive_window_kb is not None and f.receive_window_kb > 1 << 20:
        p.append(f"`federation.receive_window_kb` is {f.receive_window_kb}; at most 1048576 (1 GiB), or null for gRPC's adaptive window")
    if f.token is not None:
        if isinstance(f.token, dict):
            for k, v in f.token.items():
                if not (str(k).isdigit() and isinstance(v, str) and v):
                    p.append(f"`federation.token` maps {k!r} to a bad token; give client id -> non-empty token string")
            values = [v for v in f.token.values() if isinstance(v, str)]
            if len(set(values)) != len(values):
                p.append("`federation.token` gives two clients the same token; give each client its own (a token names its client)")
        elif not (isinstance(f.token, str) and f.token):
            p.append("`federation.token` must be a non-empty string, a mapping client id -> token, or null")
    tls = f.tls
    if (tls.cert is None) != (tls.key is None):
        p.append("`federation.tls.cert` and `federation.tls.key` go together (the server needs both)")
    for key in ("cert", "key", "ca"):
        path = getattr(tls, key)
        if path is not None and not os.path.isfile(path):
            p.append(f"`federation.tls.{key}` {path!r} is not a file")
    if f.clients_per_round is not None and not 1 <= f.clients_per_round <= max(f.clients, 1):
        p.append(f"`federation.clients_per_round` is {f.clients_per_round}; it must be between 1 and federation.clients ({f.clients})")
    if f.clients_per_round is not None and f.min_clients is not None and f.min_clients > f.clients_per_round:
        p.append(f"`federation.min_clients` ({f.min_clients}) exceeds federation.clients_per_round ({f.clients_per_round})")
    _at_least(p, "federation.checkpoint_every", f.checkpoint_every, 0)
    _one_of(p, "federation.aggregation", f.aggregation, AGGREGATIONS)
    if not 0.0 <= f.trim_fraction < 0.5:
        p.append(f"`federation.trim_fraction` is {f.trim_fraction}; it must be in [0, 0.5)")
    _at_least(p, "federation.clip_norm", f.clip_norm, 0.0, strict=True)
    _at_least(p, "federation.max_update_norm", f.max_update_norm, 0.0, strict=True)
    if f.max_weight is not None and not 1.0 <= f.max_weight <= 2.0**53:
        p.append(f"`federation.max_weight` is {f.max_weight}; it must be between 1 and 2**53 (9.0e15), or null")
    if not (math.isfinite(f.idle_timeout_s) and f.idle_timeout_s > 0):
        p.append(f"`federation.idle_timeout_s` is {f.idle_timeout_s}; it must be a number of seconds > 0")
    _at_least(p, "federation.max_calls", f.max_calls, 4)
    _at_least(p, "federation.max_calls_per_peer", f.max_calls_per_peer, 2)
    if f.max_uploads is not None and not 1 <= f.max_uploads <= 65536:
        p.append(f"`federation.max_uploads` is {f.max_uploads}; it must be between 1 and 65536, or null (4, fewer with fewer clients)")
    if f.data_port is not None and (isinstance(f.data_port, bool) or not 0 <= f.data_port <= 65535):
        p.append(f"`federation.data_port` is {f.data_port!r}; give a port (1-65535), 0 for any free one, or null for no data plane")

    ln = recipe.link
    _at_least(p, "link.uplink_mbps", ln.uplink_mbps, 0.0, strict=True)
    _at_least(p, "link.downlink_mbps", ln.downlink_mbps, 0.0, strict=True)
    _at_least(p, "link.latency_ms", ln.latency_ms, 0.0)

    _validate_data(p, recipe)

    sim = recipe.simulation
    p.extend(profile_problems(sim.profile, max(f.clients, 1), ln, recipe.seed))
    _at_least(p, "simulation.aggregation_s", sim.aggregation_s, 0.0)
    _at_least(p, "simulation.bandwidth_mbps", sim.bandwidth_mbps, 0.0, strict=True)

    e = recipe.eval
    _at_least(p, "eval.every", e.every, 0)
    _at_least(p, "eval.max_samples", e.max_samples, 1)
    _at_least(p, "eval.max_new_tokens", e.max_new_tokens, 1)
    if e.path is not None:
        _data_path(p, "eval.path", e.path, recipe.data.format)
    if e.split is not None and recipe.data.format != "hf":
        p.append(f"`eval.split` is {e.split!r} but splits exist only for data.format=hf; set eval.split=null")
    return p


# Field names of each row format, which `data.columns` may rename.
ROW_FIELDS = {
    "alpaca": ("instruction", "input", "output", "category"),
    "gsm8k": ("question", "answer", "category"),
    "chat": ("messages", "answer", "category"),
}
HF_FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


def _data_path(p: list[str], key: str, path: str, fmt: str) -> None:
    if not os.path.exists(path):
        p.append(f"`{key}` {path!r} does not exist")
    elif fmt == "hf":
        if os.path.isfile(path) and not path.endswith(HF_FILE_TYPES):
            p.append(f"`{key}` {path!r}: data.format=hf reads {', '.join(HF_FILE_TYPES)} files or a save_to_disk directory")
    elif not os.path.isfile(path):
        p.append(f"`{key}` {path!r} is a directory; data.format={fmt} reads one JSON or JSONL file")


def _validate_data(p: list[str], recipe: Recipe) -> None:
    d, clients = recipe.data, recipe.federation.clients
    _one_of(p, "data.format", d.format, DATA_FORMATS)
    _one_of(p, "data.partition.kind", d.partition.kind, PARTITIONS)
    _one_of(p, "data.on_error", d.on_error, ON_ERROR)
    _one_of(p, "data.row_format", d.row_format, ROW_FORMAT_CHOICES)
    natural = d.partition.kind == "natural"
    if d.format == "synthetic":
        if natural:
            p.append("`data.partition.kind` is natural but data.format=synthetic has no files; natural needs one data file per client")
        if d.num_samples < max(clients, 1):
            p.append(f"`data.num_samples` is {d.num_samples}; each of the {clients} clients needs at least one record")
    elif natural and d.client_paths is not None:
        if len(d.client_paths) != clients:
            p.append(f"`data.client_paths` names {len(d.client_paths)} files for {clients} clients; give one file per client")
        for i, path in enumerate(d.client_paths):
            _data_path(p, f"data.client_paths[{i}]", path, d.format)
    elif d.path is None:
        what = "this client's data file (or data.client_paths, one file per client)" if natural else "the data file"
        p.append(f"`data.path` is required for data.format={d.format}; give {what}")
    else:
        _data_path(p, "data.path", d.path, d.format)
    if d.client_paths is not None and not natural:
        p.append(f"`data.client_paths` is set but data.partition.kind is {d.partition.kind}; set data.partition.kind=natural")
    if d.partition.kind == "dirichlet" and (d.partition.alpha is None or d.partition.alpha <= 0):
        p.append(f"`data.partition.alpha` is {d.partition.alpha}; dirichlet needs alpha > 0 (e.g. 0.5)")
    if not d.partition.label:
        p.append("`data.partition.label` is empty; name the record field the Dirichlet skew is drawn over (e.g. category)")
    if d.format != "hf" and d.row_format != "auto":
        p.append(f"`data.row_format` is {d.row_format!r} but only data.format=hf reads it; set data.format=hf or remove it")
    if d.columns is not None:
        fields = sorted({f for fs in ROW_FIELDS.values() for f in fs})
        for name, column in d.columns.items():
            if name not in fields:
                p.append(f"`data.columns.{name}`: {name!r} is not a field of any row format (fields: {', '.join(fields)})")
            if not column:
                p.append(f"`data.columns.{name}` is empty; name the column of your data that holds {name!r}")


def _validate_peft(p: list[str], recipe: Recipe) -> None:
    pe = recipe.model.peft
    if pe.method is None:
        if pe.merge:
            p.append("`model.peft.merge` is true but model.peft.method is null; merging needs adapters (method lora or ffa_lora)")
        return
    _one_of(p, "model.peft.method", pe.method, PEFT_METHODS)
    _at_least(p, "model.peft.r", pe.r, 1)
    _at_least(p, "model.peft.alpha", pe.alpha, 1)
    if not 0.0 <= pe.dropout < 1.0:
        p.append(f"`model.peft.dropout` is {pe.dropout}; it must be in [0, 1)")
    tm = pe.target_modules
    ok = tm is None or tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) and x for x in tm))
    if not ok:
        p.append(f"`model.peft.target_modules` is {tm!r}; give a list of module names (e.g. [q_proj, v_proj]), 'all-linear' or null")
    b = recipe.blocks
    for key, on in (("embeddings", b.embeddings), ("head", b.head)):
        if on:
            p.append(
                f"`blocks.{key}` is true but with model.peft.method={pe.method} only the adapters train "
                f"(the {key} {'stays' if key == 'head' else 'stay'} frozen); set blocks.{key}=false"
            )
