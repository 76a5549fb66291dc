"""Memory: a block-coordinate client against full-parameter AdamW, and the server's peak per block.

    python benchmarks/memory.py [--quick | --smoke] [--block-mb 32] [--clients 2,4,8,16,32]

1. ``client_rss_ratio``: peak RSS (``VmHWM``) of a client process training
   an 8-layer Llama-architecture model by block coordinate descent (Trainer +
   FederatedBlockStrategy, parablock mode, against a gRPC server in another
   process: the block hand-off copies and the arriving aggregates count)
   over the peak RSS of a process training the same model with the same
   data by full-parameter AdamW (a plain Trainer). Each runs in a fresh
   process (the two at the same time: only their memory is measured); the ratio of the whole processes' peaks is reported, and, as
   ``client_rss_ratio_above_baseline``, the ratio of what each added to the
   RSS it had after its imports (Python, torch, Lightning, transformers).
   The client is the federation's first, so it also uploads the initial
   state at join; ``client_rss_ratio_training`` compares the peaks of the
   training phase alone (peak RSS reset when training starts), and
   ``client_rss_ratio_other_clients`` (full form) is the same ratio for a
   client that is not the first (this process sets the initial state as
   client 0; rounds close on the measured client's update alone).
2. ``server_peak_over_block``: for N clients pushing an update of the same
   block at once (lightweight clients: threads of this process, each with its
   own GrpcTransport, pushing a real float32 block), the server process's
   peak RSS during the federation minus its RSS before any tensor arrived,
   over the block's bytes: the memory the server needs per block, its global
   value included. ``round_peak_over_block`` leaves out what the server held
   before the round (the global value). A fresh server process per N. The
   server checks and sums each update as it arrives (one chunk per upload
   held); its floor is the global value plus the round's float64 sums, 3
   blocks (``server_ideal_over_block``); what each upload in flight adds on
   top (its socket buffers on the data plane, or its HTTP/2 window over
   gRPC, and the message being read) is independent of the block size; at
   most ``federation.max_uploads`` (4) uploads are read at once, the others
   wait for their turn having sent nothing. ``server_grpc_only`` is the
   largest N again with blocks over gRPC (``federation.data_port: null``).

The last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from _common import HERE, MB, REPO, ServerProcess, block_fingerprint, finish, last_json, machine, say

MODEL = {
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
SMOKE_MODEL = {**MODEL, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


# ---------------------------------------------------------------- client side


def _worker(kind: str, model_config: dict[str, Any], steps: int, server: str | None, threads: int, client_id: int = 0) -> dict[str, Any]:
    """Runs in a fresh process: train ``steps`` optimizer steps, report RSS readings (KiB)."""
    import lightning.pytorch as pl
    import torch
    from _common import proc_status_kb, reset_peak_rss
    from lightning.pytorch.callbacks import Callback

    from pl_parablock import FederatedBlockStrategy, ParaBlockModule
    from pl_parablock.client.runner import quiet_third_party
    from pl_parablock.data import ClientDataModule, synthetic_records
    from pl_parablock.model.build import build_model
    from pl_parablock.recipe.schema import ModelSection

    quiet_third_party()
    torch.set_num_threads(threads)
    baseline = proc_status_kb("VmRSS", "VmHWM")
    model, tok = build_model(ModelSection(config=dict(model_config)), 0)
    module = ParaBlockModule(model, tok, lr=1e-4)
    data = ClientDataModule(synthetic_records(64, 0), None, tok, batch_size=2, max_length=64, seed=0)
    built = proc_status_kb("VmRSS", "VmHWM")
    phases: dict[str, Any] = {}

    class Phases(Callback):
        """Splits the peak: up to the start of training (join, initial upload), then training."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            kb = proc_status_kb("VmHWM", "VmRSS")
            phases["setup_peak_kb"], phases["train_start_kb"] = kb["VmHWM"], kb["VmRSS"]
            phases["reset"] = reset_peak_rss()

    callbacks: list[Any] = []
    if kind == "block":
        callbacks.append(FederatedBlockStrategy(server, client_id, local_steps=1, mode="parablock", timeout_s=300.0))
    callbacks.append(Phases())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=-1 if kind == "block" else steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    peak = proc_status_kb("VmRSS", "VmHWM")
    n_params = sum(p.numel() for p in module.parameters())
    return {
        "kind": kind,
        "steps": int(trainer.global_step),
        "train_s": round(time.perf_counter() - t0, 2),
        "params": n_params,
        "param_mb": round(n_params * 4 / 1e6, 1),
        "baseline_rss_mb": round(baseline["VmHWM"] / 1024, 1),
        "after_build_rss_mb": round(built["VmRSS"] / 1024, 1),
        "client_id": client_id,
        "setup_peak_rss_mb": round(phases["setup_peak_kb"] / 1024, 1),
        "rss_at_training_start_mb": round(phases["train_start_kb"] / 1024, 1),
        "training_peak_rss_mb": round(peak["VmHWM"] / 1024, 1) if phases["reset"] else None,
        "peak_rss_mb": round(max(peak["VmHWM"], phases["setup_peak_kb"]) / 1024, 1),
    }


def _start_worker(
    kind: str, model_config: dict[str, Any], steps: int, server: str | None, threads: int, client_id: int = 0
) -> subprocess.Popen[str]:
    cmd = [sys.executable, os.path.join(HERE, "memory.py"), "--worker", kind, "--model", json.dumps(model_config)]
    cmd += ["--steps", str(steps), "--threads", str(threads), "--client-id", str(client_id)] + (["--server", server] if server else [])
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # this checkout's package
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _result(proc: subprocess.Popen[str], kind: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {kind} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return last_json(out)


def _initialize(address: str, model_config: dict[str, Any]) -> None:
    """Join as client 0 with the model's fingerprint and upload its initial state, as a first client would."""
    from pl_parablock import ParaBlockModule
    from pl_parablock.client.strategy import model_fingerprint
    from pl_parablock.client.transport import GrpcTransport
    from pl_parablock.core.blocks import partition_model
    from pl_parablock.model.build import build_model
    from pl_parablock.recipe.schema import ModelSection

    model, tok = build_model(ModelSection(config=dict(model_config)), 0)
    module = ParaBlockModule(model, tok)
    partition = partition_model(module)
    params = dict(module.named_parameters())
    transport = GrpcTransport(address)
    try:
        if not transport.join(0, model_fingerprint(module, partition, "parablock"), 60.0)["need_state"]:
            raise RuntimeError("the server already had an initial state")
        transport.upload_state(0, {n: params[n].detach() for n in partition.param_names}, 600.0)
    finally:
        transport.close()


def client_memory(model_config: dict[str, Any], rounds: int, threads: int, other_client: bool = True) -> dict[str, Any]:
    # the two processes run at once (each has its own peak RSS; only their memory is measured, not their time)
    full_proc = _start_worker("full", model_config, rounds, None, threads)
    with ServerProcess(clients=1, rounds=rounds, mode="parablock") as server:
        first = _result(_start_worker("block", model_config, rounds, server.address, threads), "block")
    full = _result(full_proc, "full")
    other: dict[str, Any] | None = None
    if other_client:
        # a client that is not the first: client 0 (this process) only sets the initial state; rounds close on
        # client 1's update alone (quorum 1, no wait)
        with ServerProcess(clients=2, rounds=rounds, mode="parablock", min_clients=1, round_timeout_s=0.0) as server:
            _initialize(server.address, model_config)
            other = _result(_start_worker("block", model_config, rounds, server.address, threads, client_id=1), "block")

    def above(block: dict[str, Any]) -> float:
        return (block["peak_rss_mb"] - block["baseline_rss_mb"]) / (full["peak_rss_mb"] - full["baseline_rss_mb"])

    out: dict[str, Any] = {
        "model": {k: model_config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        "params_mb": full["param_mb"],
        "block_coordinate": first,
        "full_adamw": full,
        "client_rss_ratio": round(first["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "client_rss_ratio_above_baseline": round(above(first), 3),
    }
    if other is not None:
        out["block_coordinate_other_client"] = other
        out["client_rss_ratio_other_clients"] = round(other["peak_rss_mb"] / full["peak_rss_mb"], 3)
        out["client_rss_ratio_other_clients_above_baseline"] = round(above(other), 3)
    if first["training_peak_rss_mb"] and full["training_peak_rss_mb"]:
        # the peaks of the training phase alone (after the join and the initial upload)
        out["client_rss_ratio_training"] = round(first["training_peak_rss_mb"] / full["training_peak_rss_mb"], 3)
    return out


# ---------------------------------------------------------------- server side


def server_memory(n_clients: int, block_mb: int, server_args: Sequence[str] = ()) -> dict[str, Any]:
    import torch

    from pl_parablock.client.transport import GrpcTransport

    tensors = {"block.weight": torch.rand(block_mb * MB // 4)}
    block_bytes = block_mb * MB
    with ServerProcess(clients=n_clients, rounds=1, mode="parablock", server_args=server_args) as server:
        start = server.started
        transports = [GrpcTransport(server.address, chunk_bytes=1 << 20) for _ in range(n_clients)]
        try:
            fp = block_fingerprint([tensors])
            transports[0].join(0, fp, 60.0)
            transports[0].upload_state(0, tensors, 600.0)
            for i, tr in enumerate(transports[1:], start=1):
                tr.join(i, fp, 60.0)
            before = server.call("reset")
            barrier = threading.Barrier(n_clients)
            errors: list[BaseException] = []

            def push(i: int) -> None:
                try:
                    barrier.wait(60.0)
                    header = {"client_id": i, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": 1.0}
                    pushed = transports[i].push(header, tensors, 600.0)
                    if not pushed.accepted:
                        raise RuntimeError(pushed.reason)
                except BaseException as exc:
                    errors.append(exc)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=push, args=(i,), name=f"bench-push-{i}") for i in range(n_clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600.0)
            took = time.perf_counter() - t0
            if errors:
                raise RuntimeError(f"a push failed: {errors[0]!r}")
            transports[0].pull(0, 0, 60.0)
            after = server.call("mem")
        finally:
            for tr in transports:
                tr.close()
    return {
        "clients": n_clients,
        "block_mb": block_mb,
        "server_rss_at_start_mb": round(start["rss_kb"] / 1024, 1),
        "server_rss_before_round_mb": round(before["rss_kb"] / 1024, 1),
        "server_peak_rss_mb": round(after["hwm_kb"] / 1024, 1),
        "peak_over_block": round((after["hwm_kb"] - start["rss_kb"]) * 1024 / block_bytes, 2),
        "round_peak_over_block": round((after["hwm_kb"] - before["rss_kb"]) * 1024 / block_bytes, 2),
        "push_s": round(took, 2),
        "peak_reset": bool(before.get("reset")),
    }


def _slope(servers: list[dict[str, Any]]) -> float | None:
    """Least-squares growth of the server's peak, in blocks per extra client (0 would be O(block))."""
    if len(servers) < 2:
        return None
    xs = [float(s["clients"]) for s in servers]
    ys = [float(s["peak_over_block"]) for s in servers]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den, 3) if den else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="N = 2 and 32 with a 16 MB block; about a minute on 2 cores")
    form.add_argument("--smoke", action="store_true", help="a tiny model and N = 2 (for tests)")
    p.add_argument("--block-mb", type=int, help="server block size, MB (default 64; quick 16; smoke 2)")
    p.add_argument("--clients", help="comma-separated N for the server part (default 2,4,8,16,32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the client processes (default 2)")
    p.add_argument(
        "--hidden", type=int, help="hidden size of the 8-layer model (default 768; then 8/3 x hidden intermediate, 64-wide heads)"
    )
    p.add_argument("--worker", choices=("block", "full"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--client-id", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, json.loads(args.model), args.steps, args.server, args.threads, args.client_id)), flush=True)
        return 0
    started = time.perf_counter()
    info = machine()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    model = SMOKE_MODEL if args.smoke else MODEL
    if args.hidden:
        heads = max(1, args.hidden // 64)
        model = {
            **model,
            "hidden_size": args.hidden,
            "intermediate_size": args.hidden * 8 // 3,
            "num_attention_heads": heads,
            "num_key_value_heads": 4 if heads % 4 == 0 else heads,
        }
    block_mb = args.block_mb or (2 if args.smoke else 16 if args.quick else 64)
    clients = (
        [int(c) for c in args.clients.split(",")] if args.clients else [2] if args.smoke else [2, 32] if args.quick else [2, 4, 8, 16, 32]
    )
    say(f"memory: client peak RSS, block coordinate vs full AdamW ({model['num_hidden_layers']} layers, hidden {model['hidden_size']}) ...")
    client = client_memory(model, rounds=3, threads=args.threads, other_client=form_name == "full")
    say(f"  peak RSS {client['block_coordinate']['peak_rss_mb']} MB vs {client['full_adamw']['peak_rss_mb']} MB")
    servers = []
    for n in clients:
        servers.append(server_memory(n, block_mb))
        say(f"  server, {n} clients x {block_mb} MB block: peak {servers[-1]['peak_over_block']} x block")
    # the same round with blocks over gRPC (federation.data_port: null): each upload read buffers its HTTP/2 window
    grpc_only = None
    if form_name != "smoke":
        grpc_only = server_memory(max(clients), block_mb, ["--no-data-plane"])
        say(f"  the same, {max(clients)} clients, blocks over gRPC: peak {grpc_only['peak_over_block']} x block")
    result: dict[str, Any] = {
        "benchmark": "memory",
        "form": form_name,
        "machine": info,
        **client,
        "server_peak_over_block": max(s["peak_over_block"] for s in servers),
        "server_round_peak_over_block": max(s["round_peak_over_block"] for s in servers),
        "server_blocks_per_client": _slope(servers),
        "server": servers,
        "server_grpc_only": grpc_only,
        "targets": {"client_rss_ratio": "<= 0.6", "server_peak_over_block": "<= 3 (O(block), not O(N x block))"},
        # what the server must hold at least, whatever the transport: the global value (1 block) and the round's
        # exact float64 running sums (2 blocks); the round's own peak cannot go below the sums
        "server_ideal_over_block": {"peak_over_block": 3.0, "round_peak_over_block": 2.0},
    }
    finish(result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
