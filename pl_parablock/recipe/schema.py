"""The recipe's schema: one dataclass per section, every key with its help text, and :class:`Recipe`.

A recipe is a YAML file whose keys follow the dataclasses below. The schema's
defaults are the offline quickstart, so a recipe only writes what it changes.
The rest of the recipe wing works from these classes:

* :mod:`pl_parablock.recipe.load`: YAML, command-line overrides (OmegaConf's
  dotlist form, ``train.lr=1e-4``) and :func:`~pl_parablock.recipe.load.load_recipe`;
* :mod:`pl_parablock.recipe.validate`: every problem at once, one line naming each key;
* :mod:`pl_parablock.recipe.build`: what a run builds from a recipe (compression,
  server optimizer, tokens, loggers);
* :mod:`pl_parablock.recipe.docs`: the recipe reference, generated from the help texts here;
* :mod:`pl_parablock.recipe.profile`: ``simulation.profile``'s values per client.

A vocabulary is its owner's (the core's modes, schedules, codecs and rules,
the parameter dtypes, the wire dtypes, the data formats); this module
imports what its help texts list. It imports nothing of the model or the
simulator, which import it.

Example::

    >>> from pl_parablock.recipe.load import load_recipe
    >>> recipe = load_recipe(None, ["mode=sync", "federation.clients=2"])
    >>> recipe.mode, recipe.federation.clients
    ('sync', 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pl_parablock.core.codecs import CODEC_OPTIONS, CODECS
from pl_parablock.core.tensors import PARAMETER_DTYPES as DTYPES
from pl_parablock.data.formats import ROW_FORMAT_CHOICES
from pl_parablock.recipe.profile import DISTRIBUTIONS
from pl_parablock.wire.framing import WIRE_DTYPES

# The recipe's own vocabularies; the others are their owner modules' (see pl_parablock.recipe.validate).
PARTITIONS = ("iid", "dirichlet", "natural")
ON_ERROR = ("raise", "skip")
PEFT_METHODS = ("lora", "ffa_lora")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
EVALUATORS = ("auto", "process", "client")
"""Who evaluates the global model (``eval.evaluator``)."""
PLACEMENTS = ("balanced", "fixed")
"""Which simulator worker trains which virtual client (``simulation.placement``)."""


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


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _codec_option(name: str) -> dict[str, str]:
    """The help of a ``federation.compression`` option, from the codecs that declare it (:data:`CODEC_OPTIONS`)."""
    takers = ", ".join(codec for codec, cls in CODECS.items() if name in cls.OPTIONS)
    return _help(f"{takers}: {CODEC_OPTIONS[name].summary}")


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
        metadata=_help(
            "CPU threads per client; default: the cores this process may run on (its CPU affinity, capped by a cgroup "
            "CPU quota) shared among the clients, max(1, cores // clients), in "
            "`fit` (processes or --inprocess) and in the simulator alike, so that both give the same model bitwise. A "
            "client started by hand (--role client) without it uses torch's default."
        ),
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
    group: int = field(default=CODEC_OPTIONS["group"].default, metadata=_codec_option("group"))
    fraction: float = field(default=CODEC_OPTIONS["fraction"].default, metadata=_codec_option("fraction"))


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
    staleness: int = field(
        default=1,
        metadata=_help(
            "parablock's window k: round t's aggregate is applied before round t+k+1 begins, so up to k hand-offs are in "
            "flight (1: the paper's ParaBlock)."
        ),
    )
    stale_mix: float = field(
        default=1.0,
        metadata=_help("Damping alpha of the rebase, g' + alpha * (theta - e), for deep windows (1.0: the paper's rebase)."),
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
    body_timeout_s: float = field(
        default=30.0,
        metadata=_help(
            "Server: cut an upload that holds a turn and sent no body bytes for this long, and free its turn (a turn granted "
            "and unused goes to the next after this long too, at most 10 s). Counts only the time the server waits for the "
            "upload's messages, and only messages of at least 1 KiB (a body's chunks; empty or tiny messages are refused). "
            "Must exceed the time one chunk (federation.chunk_kb) takes on the slowest client's link."
        ),
    )
    min_upload_mbps: float | None = field(
        default=None,
        metadata=_help(
            "Server: cut an upload holding a turn whose body arrives slower than this, Mbit/s (counting only the time the "
            "server waits for it, after a 2 s grace, one chunk in flight allowed), and free its turn. null: a tenth of the "
            "slowest declared uplink (link.uplink_mbps, simulation.profile.uplink_mbps), or 0.1 Mbit/s when none is "
            "declared (a tenth of a 1 Mbit/s uplink); 0: no floor (federation.body_timeout_s still applies)."
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
        metadata=_help("Evaluate the global model every N rounds (a curve in report.json; see eval.evaluator); 0: only at the end."),
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
    hold_models: float = field(
        default=2.0,
        metadata=_help(
            "With eval.evaluator=process: the most memory the server spends holding the curve's points for an evaluator "
            "behind the rounds, in copies of the model's trained blocks; an evaluator further behind skips to later points."
        ),
    )
    evaluator: str = field(
        default="auto",
        metadata=_help(
            "Who evaluates and saves the global model: process: an evaluator process of its own reads the global blocks "
            "from the server as rounds close, off the training path (the local launcher starts it; on several machines "
            "start `python -m pl_parablock.fit RECIPE --role evaluator --server HOST:PORT`), and client 0 only trains | "
            "client: client 0 evaluates between its rounds (the other clients wait for its update meanwhile) | auto: "
            "process in the local launcher (processes) when eval.every > 0, client otherwise (only the final evaluation, "
            "--inprocess, --role client, your own Trainer)."
        ),
    )


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
            "TensorBoard event files in the same folders (`tensorboard --logdir OUTPUT_DIR/logs`); needs the tensorboard extra "
            "(pip install pl_parablock[tensorboard])."
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
    workers: int = field(
        default=1,
        metadata=_help(
            "Worker processes (torch.distributed: gloo on CPU, NCCL when each has its own GPU) that train the virtual "
            "clients (see simulation.placement); the global stays bitwise the one-process run's at equal "
            "train.threads (default threads per worker: max(1, free cores // workers)). 1 <= workers <= federation.clients. "
            "Started by torchrun (WORLD_SIZE set), the simulator uses torchrun's processes instead."
        ),
    )
    placement: str = field(
        default="balanced",
        metadata=_help(
            "With several workers: balanced: each round's sampled clients are dealt out evenly in client-id order, a "
            "client moving to the worker that trains it with its state (RNG; upload residuals with error feedback; "
            "optimizer state when kept), except one with a round in flight | fixed: client i stays on worker "
            "i * workers // clients (nothing but blocks and sums crosses processes; a round waits for the busier worker)."
        ),
    )
    worker_timeout_s: float = field(
        default=600.0,
        metadata=_help(
            "The longest a worker process waits for another (joining, and each exchange of a round, which includes the "
            "slowest worker's training); past it the run stops naming the wait."
        ),
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
