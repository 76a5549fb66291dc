"""Shared fixtures: quiet logs, one thread per op, and no thread left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
import tqdm

from pl_parablock.client.runner import quiet_third_party

quiet_third_party()
torch.set_num_threads(1)
# `datasets` makes (disabled) tqdm bars, and tqdm starts a process-wide monitor
# thread for the first one; it is not ours, so turn it off rather than excuse it.
tqdm.tqdm.monitor_interval = 0


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Fail a test that leaves a thread running (after a short grace period)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra, f"test left threads running: {[t.name for t in extra]}"


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small data files and a tiny local Llama checkpoint, written once per session."""
    from tests.helpers import ALPACA_ROWS, gsm8k_rows, save_tiny_checkpoint, write_jsonl

    root = tmp_path_factory.mktemp("fixtures")
    alpaca = [dict(r, instruction=f"{r['instruction']} ({i})") for i in range(10) for r in ALPACA_ROWS]
    return {
        "model": save_tiny_checkpoint(root / "tiny-llama"),
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca),
        "gsm8k_train": write_jsonl(root / "gsm8k_train.jsonl", gsm8k_rows(40, seed=1)),
        "gsm8k_test": write_jsonl(root / "gsm8k_test.jsonl", gsm8k_rows(8, seed=2)),
    }
