"""Validating a recipe: every problem at once, one line each naming its key.

:func:`validate` checks each section once, with one function per section
(``*_problems``; :func:`model_problems` and :func:`data_problems` also serve
the Lightning CLI, which builds those two sections alone). A rule between
sections is checked in exactly one place, :func:`cross_section_problems`,
and asks the object that owns it instead of repeating it:

* what a mode refuses (``blocks.schedule``, ``blocks.assignment``,
  ``federation.clients_per_round``, the server optimizer and lr, the
  aggregation of a relay): :meth:`pl_parablock.core.plan.Mode.refusals`;
* what an aggregation rule supports (a staggered assignment, a server
  optimizer): :class:`pl_parablock.core.aggregate.AggregationRule`;
* what a codec option accepts: :data:`pl_parablock.core.codecs.CODEC_OPTIONS`;
* a ``simulation.profile``: :func:`pl_parablock.recipe.profile.profile_problems`.

A vocabulary is its owner module's, imported here (modes, assignments and
weightings: the core's plan; schedules; codecs; aggregation rules; server
optimizers; parameter and wire dtypes; data and row formats), so the recipe
accepts exactly what the code that implements a key knows.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Collection
from typing import Any

from pl_parablock.core.aggregate import AGGREGATION_RULES, AGGREGATIONS, rule_of
from pl_parablock.core.blocks import SCHEDULES
from pl_parablock.core.codecs import CODEC_OPTIONS, CODECS
from pl_parablock.core.optimizers import SERVER_OPTIMIZERS
from pl_parablock.core.plan import ASSIGNMENTS, MODES, WEIGHTINGS, mode_of
from pl_parablock.core.tensors import PARAMETER_DTYPES as DTYPES
from pl_parablock.data.formats import DATA_FORMATS, HF_BUILDERS, ROW_FORMAT_CHOICES
from pl_parablock.recipe.profile import profile_problems
from pl_parablock.recipe.schema import (
    EVALUATORS,
    ON_ERROR,
    PARTITIONS,
    PEFT_METHODS,
    PLACEMENTS,
    PRECISIONS,
    BlocksSection,
    DataSection,
    EvalSection,
    FederationSection,
    LinkSection,
    LoggingSection,
    ModelSection,
    Recipe,
    SimulationSection,
    TrainSection,
)
from pl_parablock.wire.framing import WIRE_DTYPES

__all__ = ["cross_section_problems", "data_problems", "model_problems", "validate"]

ROW_FIELDS = {
    "alpaca": ("instruction", "input", "output", "category"),
    "gsm8k": ("question", "answer", "category"),
    "chat": ("messages", "answer", "category"),
}
"""Field names of each row format, which ``data.columns`` may rename."""
HF_FILE_TYPES = tuple(HF_BUILDERS)
"""The file types ``data.format=hf`` reads (the data reader's builders)."""


def validate(recipe: Recipe) -> list[str]:
    """Semantic checks of a typed recipe; returns one line per problem, each naming its key."""
    f = recipe.federation
    clients = max(f.clients, 1)
    return [
        *_logging_problems(recipe.logging),
        *_top_problems(recipe),
        *model_problems(recipe.model),
        *_blocks_problems(recipe.blocks),
        *_train_problems(recipe.train),
        *_federation_problems(f),
        *_link_problems(recipe.link),
        *data_problems(recipe.data, clients=f.clients),
        *_simulation_problems(recipe.simulation, clients=clients, link=recipe.link, seed=recipe.seed),
        *_eval_problems(recipe.eval, data_format=recipe.data.format),
        *cross_section_problems(recipe),
    ]


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
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


# ---------------------------------------------------------------------------
# one function per section


def _logging_problems(lg: LoggingSection) -> list[str]:
    if lg.tensorboard and not _tensorboard_installed():
        return ['`logging.tensorboard` is true but tensorboard (or tensorboardX) is not installed: pip install "pl_parablock[tensorboard]"']
    return []


def _top_problems(recipe: Recipe) -> list[str]:
    p: list[str] = []
    _one_of(p, "mode", recipe.mode, MODES)
    _at_least(p, "seed", recipe.seed, 0)
    if not recipe.output_dir:
        p.append("`output_dir` is empty; name a directory for report.json and model/")
    return p


def model_problems(m: ModelSection) -> list[str]:
    """The problems of a ``model`` section (with its ``peft``), each naming its key."""
    p: list[str] = []
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
    pe = m.peft
    if pe.method is None:
        if pe.merge:
            p.append("`model.peft.merge` is true but model.peft.method is null; merging needs adapters (method lora or ffa_lora)")
        return p
    _one_of(p, "model.peft.method", pe.method, PEFT_METHODS)
    _at_least(p, "model.peft.r", pe.r, 1)
    _at_least(p, "model.peft.alpha", pe.alpha, 1)
    if not 0.0 <= pe.dropout < 1.0:
        p.append(f"`model.peft.dropout` is {pe.dropout}; it must be in [0, 1)")
    tm = pe.target_modules
    ok = tm is None or tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) and x for x in tm))
    if not ok:
        p.append(f"`model.peft.target_modules` is {tm!r}; give a list of module names (e.g. [q_proj, v_proj]), 'all-linear' or null")
    return p


def _blocks_problems(b: BlocksSection) -> list[str]:
    p: list[str] = []
    _at_least(p, "blocks.layers_per_block", b.layers_per_block, 1)
    _one_of(p, "blocks.assignment", b.assignment, ASSIGNMENTS)
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
    return p


def _train_problems(t: TrainSection) -> list[str]:
    p: list[str] = []
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
    return p


def _federation_problems(f: FederationSection) -> list[str]:
    p: list[str] = []
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
    _one_of(p, "federation.weighting", f.weighting, WEIGHTINGS)
    if f.min_clients is not None and not 1 <= f.min_clients <= max(f.clients, 1):
        p.append(f"`federation.min_clients` is {f.min_clients}; it must be between 1 and federation.clients ({f.clients})")
    _at_least(p, "federation.round_timeout_s", f.round_timeout_s, 0.0, strict=True)
    _at_least(p, "federation.timeout_s", f.timeout_s, 0.0, strict=True)
    p.extend(_compression_problems(f))
    _at_least(p, "federation.chunk_kb", f.chunk_kb, 1)
    if f.chunk_kb > 32768:
        p.append(f"`federation.chunk_kb` is {f.chunk_kb}; at most 32768 (32 MiB) fits a message")
    _at_least(p, "federation.receive_window_kb", f.receive_window_kb, 64)
    if f.receive_window_kb is not None and f.receive_window_kb > 1 << 20:
        p.append(f"`federation.receive_window_kb` is {f.receive_window_kb}; at most 1048576 (1 GiB), or null for gRPC's adaptive window")
    p.extend(_token_problems(f.token))
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
    if not (math.isfinite(f.body_timeout_s) and f.body_timeout_s > 0):
        p.append(f"`federation.body_timeout_s` is {f.body_timeout_s}; it must be a number of seconds > 0")
    if f.min_upload_mbps is not None and not (math.isfinite(f.min_upload_mbps) and f.min_upload_mbps >= 0):
        p.append(f"`federation.min_upload_mbps` is {f.min_upload_mbps}; give Mbit/s >= 0 (0: no floor), or null for the default")
    _at_least(p, "federation.max_calls", f.max_calls, 4)
    _at_least(p, "federation.max_calls_per_peer", f.max_calls_per_peer, 2)
    if f.max_uploads is not None and not 1 <= f.max_uploads <= 65536:
        p.append(f"`federation.max_uploads` is {f.max_uploads}; it must be between 1 and 65536, or null (4, fewer with fewer clients)")
    if f.data_port is not None and (isinstance(f.data_port, bool) or not 0 <= f.data_port <= 65535):
        p.append(f"`federation.data_port` is {f.data_port!r}; give a port (1-65535), 0 for any free one, or null for no data plane")
    return p


def _compression_problems(f: FederationSection) -> list[str]:
    """``federation.compression`` and its ``wire_dtype`` shorthand; each codec option as :data:`CODEC_OPTIONS` states it."""
    p: list[str] = []
    if f.wire_dtype is not None:
        _one_of(p, "federation.wire_dtype", f.wire_dtype, WIRE_DTYPES)
    c = f.compression
    _one_of(p, "federation.compression.codec", c.codec, CODECS)
    if c.download is not None:
        _one_of(p, "federation.compression.download", c.download, CODECS)
    for option in CODEC_OPTIONS.values():  # every option, whichever codec is chosen: a recipe holds no wrong value
        value = getattr(c, option.name)
        if not option.accepts(value):
            p.append(f"`federation.compression.{option.name}` is {value!r}; {option.advice}")
    if f.wire_dtype not in (None, "float32") and c.codec != "none":
        p.append(
            f"`federation.wire_dtype` ({f.wire_dtype}) and `federation.compression.codec` ({c.codec}) both set how uploads "
            "travel; keep `compression` alone"
        )
    return p


def _token_problems(token: Any) -> list[str]:
    p: list[str] = []
    if token is None:
        return p
    if isinstance(token, dict):
        for k, v in token.items():
            if not (str(k).isdigit() and isinstance(v, str) and v):
                p.append(f"`federation.token` maps {k!r} to a bad token; give client id -> non-empty token string")
        values = [v for v in token.values() if isinstance(v, str)]
        if len(set(values)) != len(values):
            p.append("`federation.token` gives two clients the same token; give each client its own (a token names its client)")
    elif not (isinstance(token, str) and token):
        p.append("`federation.token` must be a non-empty string, a mapping client id -> token, or null")
    return p


def _link_problems(ln: LinkSection) -> list[str]:
    p: list[str] = []
    _at_least(p, "link.uplink_mbps", ln.uplink_mbps, 0.0, strict=True)
    _at_least(p, "link.downlink_mbps", ln.downlink_mbps, 0.0, strict=True)
    _at_least(p, "link.latency_ms", ln.latency_ms, 0.0)
    return p


def _data_path(p: list[str], key: str, path: str, fmt: str) -> None:
    if not os.path.exists(path):
        p.append(f"`{key}` {path!r} does not exist")
    elif fmt == "hf":
        if os.path.isfile(path) and not path.endswith(HF_FILE_TYPES):
            p.append(f"`{key}` {path!r}: data.format=hf reads {', '.join(HF_FILE_TYPES)} files or a save_to_disk directory")
    elif not os.path.isfile(path):
        p.append(f"`{key}` {path!r} is a directory; data.format={fmt} reads one JSON or JSONL file")


def data_problems(d: DataSection, *, clients: int) -> list[str]:
    """The problems of a ``data`` section split among ``clients`` clients, each naming its key."""
    p: list[str] = []
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
    return p


def _simulation_problems(sim: SimulationSection, *, clients: int, link: LinkSection, seed: int) -> list[str]:
    p = profile_problems(sim.profile, clients, link, seed)
    _at_least(p, "simulation.aggregation_s", sim.aggregation_s, 0.0)
    _at_least(p, "simulation.bandwidth_mbps", sim.bandwidth_mbps, 0.0, strict=True)
    _at_least(p, "simulation.workers", sim.workers, 1)
    if sim.workers > clients:
        p.append(f"`simulation.workers` is {sim.workers} but there are {clients} clients; use at most one worker per client")
    _at_least(p, "simulation.worker_timeout_s", sim.worker_timeout_s, 0.0, strict=True)
    _one_of(p, "simulation.placement", sim.placement, PLACEMENTS)
    return p


def _eval_problems(e: EvalSection, *, data_format: str) -> list[str]:
    p: list[str] = []
    _at_least(p, "eval.every", e.every, 0)
    _at_least(p, "eval.max_samples", e.max_samples, 1)
    _at_least(p, "eval.max_new_tokens", e.max_new_tokens, 1)
    _one_of(p, "eval.evaluator", e.evaluator, EVALUATORS)
    if not (isinstance(e.hold_models, (int, float)) and e.hold_models > 0):
        p.append(f"`eval.hold_models` is {e.hold_models!r}; give a number > 0 (copies of the model's trained blocks)")
    if e.path is not None:
        _data_path(p, "eval.path", e.path, data_format)
    if e.split is not None and data_format != "hf":
        p.append(f"`eval.split` is {e.split!r} but splits exist only for data.format=hf; set eval.split=null")
    return p


# ---------------------------------------------------------------------------
# rules between sections, each in one place


def cross_section_problems(recipe: Recipe) -> list[str]:
    """The rules that join keys of different sections; each asks the object that owns it (skipped for an unknown name,
    which its own section reports)."""
    p: list[str] = []
    f, b = recipe.federation, recipe.blocks
    so = f.server_optimizer
    if recipe.mode in MODES:
        p.extend(
            mode_of(recipe.mode).refusals(
                schedule=b.schedule,
                clients=f.clients,
                clients_per_round=f.clients_per_round,
                assignment=b.assignment,
                aggregation=f.aggregation,
                server_optimizer=so.name,
                server_lr=f.server_lr,
                server_optimizer_lr=so.lr,
                staleness=f.staleness,
                stale_mix=f.stale_mix,
            )
        )
    if isinstance(f.staleness, int) and f.staleness >= max(f.rounds, 1) > 1:
        p.append(
            f"`federation.staleness` is {f.staleness} but the run has {f.rounds} rounds: a window that deep is never used; "
            f"give at most {f.rounds - 1}"
        )
    if f.aggregation in AGGREGATIONS:
        rule = rule_of(f.aggregation)
        if b.assignment == "staggered" and not rule.staggered:
            use = " | ".join(n for n, r in AGGREGATION_RULES.items() if r.staggered)
            p.append(f"`blocks.assignment` is staggered: federation.aggregation={f.aggregation} does not support it; use {use}")
        if so.name != "sgd" and not rule.server_optimizer:
            use = " | ".join(n for n, r in AGGREGATION_RULES.items() if r.server_optimizer)
            p.append(
                f"`federation.server_optimizer.name` is {so.name!r} but federation.aggregation={f.aggregation} forms the new "
                f"global directly from robust statistics a server optimizer cannot follow; use aggregation={use} or server_optimizer sgd"
            )
    up = recipe.link.uplink_mbps
    if up is not None and up > 0 and f.chunk_kb >= 1 and math.isfinite(f.body_timeout_s) and f.body_timeout_s > 0:
        chunk_s = f.chunk_kb * 1024 * 8 / (up * 1e6) + max(recipe.link.latency_ms, 0.0) / 1000
        if 2 * chunk_s >= f.body_timeout_s:
            p.append(
                f"`federation.body_timeout_s` is {f.body_timeout_s:g}; one chunk (federation.chunk_kb={f.chunk_kb}) takes "
                f"{chunk_s:.3g} s on link.uplink_mbps={up:g}, so the server would cut honest uploads: give more than twice that, "
                "or smaller chunks"
            )
    method = recipe.model.peft.method
    if method is not None:
        for key, on in (("embeddings", b.embeddings), ("head", b.head)):
            if on:
                p.append(
                    f"`blocks.{key}` is true but with model.peft.method={method} only the adapters train "
                    f"(the {key} {'stays' if key == 'head' else 'stay'} frozen); set blocks.{key}=false"
                )
    return p
