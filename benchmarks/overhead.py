"""Overhead: what the framework costs a client's local training.

    python benchmarks/overhead.py [--quick | --smoke] [--threads 1] [--block-mb 64]

1. ``throughput_ratio``: tokens/s of one client under ``Trainer`` +
   ``FederatedBlockStrategy`` (parablock mode, a real gRPC server in another
   process, no link emulation) over tokens/s of a plain PyTorch loop that
   trains the same blocks in the same schedule (``requires_grad`` on the
   active block only, a fresh AdamW per round, as the strategy does), with
   the same optimizer settings, model initialisation and batches, and no
   federation. Both are timed from the start of round 2 (round 1 warms up)
   to the last step; tokens are the batches' attention-mask tokens.
2. ``interference_ratio``: tokens/s of the plain loop while this process's
   transmitter thread keeps sending a large block (``--block-mb``, pushed and
   its aggregate pulled back, over and over) to a server in another process,
   over tokens/s with the transmitter idle: the CPU cost of the
   communication thread. The server runs in another process on the same
   cores (one server for both links). Measured over an emulated 1 Gbit/s link (the
   figure reported as ``interference_ratio``) and, in the full form, over
   unthrottled loopback (``interference_ratio_unthrottled``: the thread moves bytes as fast as
   the CPU lets it, and the server process competes for the same cores).
   ``transmitter_cpus`` is the CPU time this process spent outside the
   training thread (the transmitter and gRPC's threads) per second of
   training: the communication thread's own cost, whatever the core count.

Runs alternate (A B, B A, A B, ...) so that drifting machine speed affects both
sides alike; each ratio is the median over the pairs (A, B) of B's tokens/s
over A's (on the 2-core VM this was measured on, the same loop's speed
varies by up to 20 % from one run to the next with no other process
running). The last output line is JSON.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import lightning.pytorch as pl
import torch
from _common import MB, ServerProcess, block_fingerprint, finish, machine, median, say
from lightning.pytorch.callbacks import Callback

from pl_parablock import FederatedBlockStrategy, ParaBlockModule
from pl_parablock.client.runner import quiet_third_party
from pl_parablock.client.transmitter import Handoff, Transmitter
from pl_parablock.client.transport import GrpcTransport
from pl_parablock.core.blocks import make_schedule, partition_model
from pl_parablock.data import ClientDataModule, synthetic_records
from pl_parablock.model.build import build_model
from pl_parablock.recipe.schema import ModelSection
from pl_parablock.wire.link import Link

MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
SMOKE_MODEL = {**MODEL, "hidden_size": 32, "intermediate_size": 64}
LR = 2e-3


class Setup:
    def __init__(self, model: dict[str, Any], rounds: int, local_steps: int, batch_size: int, max_length: int) -> None:
        self.model = model
        self.rounds = rounds
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.max_length = max_length
        self.records = synthetic_records(rounds * local_steps * batch_size + batch_size, 0)

    def build(self) -> tuple[ParaBlockModule, ClientDataModule]:
        model, tok = build_model(ModelSection(config=dict(self.model)), 0)
        module = ParaBlockModule(model, tok, lr=LR)
        data = ClientDataModule(self.records, None, tok, batch_size=self.batch_size, max_length=self.max_length, seed=0)
        return module, data

    @property
    def warmup_steps(self) -> int:
        return self.local_steps


class _Timer(Callback):
    """Times the steps after the warm-up round and counts their tokens."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.t0: float | None = None
        self.t1 = 0.0
        self.tokens = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup_steps and self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.t0 is not None:
            self.tokens += int(batch["attention_mask"].sum())
            self.t1 = time.perf_counter()


def lightning_client(setup: Setup, server: str) -> float:
    """Tokens/s of a federated client: Trainer + FederatedBlockStrategy against ``server``."""
    module, data = setup.build()
    strategy = FederatedBlockStrategy(server, 0, local_steps=setup.local_steps, mode="parablock", timeout_s=120.0)
    timer = _Timer(setup.warmup_steps)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=-1,
        callbacks=[strategy, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert timer.t0 is not None and strategy.round == setup.rounds
    return timer.tokens / (timer.t1 - timer.t0)


def plain_loop(setup: Setup, cpu: dict[str, float] | None = None) -> float:
    """Tokens/s of a plain PyTorch loop training the same blocks in the same order, no federation.

    ``cpu``, when given, receives the timed part's wall time and the CPU time of
    this (training) thread and of the whole process.
    """
    module, data = setup.build()
    partition = partition_model(module)
    schedule = make_schedule("ascending", len(partition), setup.rounds)
    params = dict(module.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    module.train()
    step, tokens, t0 = 0, 0, 0.0
    for b in schedule:
        block = [params[n] for n in partition.blocks[b].params]
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for p in block:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(block, lr=LR, weight_decay=0.0, betas=(0.9, 0.999))
        for _ in range(setup.local_steps):
            if step == setup.warmup_steps:
                t0, thread0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
            batch = next(batches)
            loss = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= setup.warmup_steps:
                tokens += int(batch["attention_mask"].sum())
            step += 1
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.update(wall_s=wall, thread_cpu_s=time.thread_time() - thread0, process_cpu_s=time.process_time() - proc0)
    return tokens / wall


class _Sender:
    """Keeps a transmitter busy while ``active``: hands it a large block, waits for the aggregate, again."""

    def __init__(self, address: str, tensors: dict[str, torch.Tensor], link: Link, first_round: int = 0) -> None:
        self.transport = GrpcTransport(address, link=link, chunk_bytes=1 << 20)
        if self.transport.join(0, block_fingerprint([tensors]), 60.0)["need_state"]:
            self.transport.upload_state(0, tensors, 600.0)
        self.transmitter = Transmitter(self.transport, 0, timeout_s=600.0)
        self.tensors = tensors
        self.round = first_round
        self.bytes = 0
        self.busy_s = 0.0
        self.active = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.active.wait(0.05):
                continue
            self.idle.clear()
            t0 = time.perf_counter()
            while self.active.is_set() and not self._stop.is_set():
                r = self.round
                self.transmitter.send(Handoff(r, 0, "value", r - 1, 1.0, self.tensors))
                arrival = self.transmitter.wait(r, timeout=600.0)
                self.bytes += arrival.bytes_up + arrival.bytes_down
                self.round += 1
            self.busy_s += time.perf_counter() - t0
            self.idle.set()

    def pause(self) -> None:
        """Stop feeding after the block in flight, and wait for it."""
        self.active.clear()
        self.idle.wait(600.0)

    def close(self) -> None:
        self.pause()
        self._stop.set()
        self._thread.join(60.0)
        self.transmitter.close(timeout=60.0)
        self.transport.close()


def interference(
    setup: Setup, server: ServerProcess, tensors: dict[str, torch.Tensor], repeats: int, link: Link, first_round: int
) -> dict[str, Any]:
    """Plain-loop tokens/s with the transmitter idle, then busy, alternating."""
    idle, busy, other_cpu = [], [], []
    sender = _Sender(server.address, tensors, link, first_round)
    try:
        for i in range(repeats):
            for busy_now in (False, True) if i % 2 == 0 else (True, False):  # A B, B A, ...
                if not busy_now:
                    idle.append(plain_loop(setup))
                    continue
                rounds_before = sender.round
                sender.active.set()
                cpu: dict[str, float] = {}
                busy.append(plain_loop(setup, cpu))
                other_cpu.append((cpu["process_cpu_s"] - cpu["thread_cpu_s"]) / cpu["wall_s"])
                sender.pause()
                if sender.round == rounds_before:
                    raise RuntimeError("the transmitter finished no block while the loop trained: give a smaller --block-mb")
    finally:
        sender.close()
    return {
        "idle_tokens_s": round(median(idle), 1),
        "busy_tokens_s": round(median(busy), 1),
        "ratio": round(median(b / a for a, b in zip(idle, busy)), 3),
        "transmitter_mb_s": round((sender.bytes / 1e6) / sender.busy_s, 1) if sender.busy_s else None,
        # CPUs this process used outside the training thread while it trained: the transmitter and gRPC's threads
        "transmitter_cpus": round(median(other_cpu), 3),
        "blocks_sent": sender.round - first_round,
        "next_round": sender.round,
        "link": link.describe(),
        "runs": {"idle": [round(x, 1) for x in idle], "busy": [round(x, 1) for x in busy]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="fewer rounds and repeats, no unthrottled run; about a minute on 2 cores")
    form.add_argument("--smoke", action="store_true", help="a tiny model, one repeat (for tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training loop (default 1)")
    p.add_argument("--block-mb", type=int, help="size of the block the transmitter sends (default 64 MB; smoke 2)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    quiet_third_party()
    torch.set_num_threads(args.threads)
    info = machine()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    model = SMOKE_MODEL if args.smoke else MODEL
    rounds, repeats = (2, 1) if args.smoke else (4, 3) if args.quick else (8, 5)
    setup = Setup(model, rounds=rounds, local_steps=2 if args.smoke else 5, batch_size=8, max_length=64 if args.smoke else 128)
    block_mb = args.block_mb or (2 if args.smoke else 64)

    say(f"overhead: Trainer + FederatedBlockStrategy vs a plain loop, {rounds} rounds x {setup.local_steps} steps, {repeats} repeats")
    plain, fed = [], []
    for i in range(repeats):
        for federated in (False, True) if i % 2 == 0 else (True, False):  # A B, B A, ...
            if federated:
                with ServerProcess(clients=1, rounds=rounds, mode="parablock") as server:
                    fed.append(lightning_client(setup, server.address))
            else:
                plain.append(plain_loop(setup))
        say(f"  repeat {i + 1}: plain {plain[-1]:.0f} tokens/s, Trainer + FederatedBlockStrategy {fed[-1]:.0f} tokens/s")
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "form": form_name,
        "machine": info,
        "model": {k: model[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        "rounds": rounds,
        "local_steps": setup.local_steps,
        "batch_size": setup.batch_size,
        "max_length": setup.max_length,
        "plain_tokens_s": round(median(plain), 1),
        "federated_tokens_s": round(median(fed), 1),
        "throughput_ratio": round(median(b / a for a, b in zip(plain, fed)), 3),
        "runs": {"plain": [round(x, 1) for x in plain], "federated": [round(x, 1) for x in fed]},
    }
    tensors = {"big.weight": torch.rand(block_mb * MB // 4)}
    with ServerProcess(clients=1, rounds=1_000_000, mode="parablock") as server:
        say(f"  interference: a {block_mb} MB block over an emulated 1 Gbit/s link ...")
        emulated = interference(setup, server, tensors, 2 if args.quick else repeats, Link(uplink_mbps=1000.0, downlink_mbps=1000.0), 0)
        unthrottled = None
        if not (args.quick or args.smoke):
            say(f"  interference: a {block_mb} MB block over unthrottled loopback ...")
            unthrottled = interference(setup, server, tensors, repeats, Link(), emulated["next_round"])
    result.update(
        block_mb=block_mb,
        interference_ratio=emulated["ratio"],
        interference=emulated,
        interference_ratio_unthrottled=unthrottled["ratio"] if unthrottled else None,
        interference_unthrottled=unthrottled,
        targets={"throughput_ratio": ">= 0.95", "interference_ratio": ">= 0.95"},
    )
    finish(result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
