"""A child for the fork server's test: prints what a process of its own would have (its threads), then exits."""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    import torch

    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} torch={torch.get_num_threads()} argv={argv}", flush=True)
    sys.stdout.flush()
    return int(argv[0])
