"""The simulator gives the heap memory its rounds freed back to the system, round after round."""

from __future__ import annotations

import sys

from pl_parablock.simulation import driver
from tests.helpers import tiny_recipe


def test_every_round_after_the_first_releases_freed_memory(tmp_path, monkeypatch):
    # without it glibc keeps what each round's cores, batches and sums freed, and a long run's RSS creeps up
    calls: list[int] = []
    monkeypatch.setattr(driver, "release_freed_memory", lambda: calls.append(1) or True)
    recipe = tiny_recipe(tmp_path, "federation.rounds=5", "federation.clients=2", "eval.max_samples=1")
    driver.run_simulation(recipe)
    assert len(calls) == 5 - 1


def test_release_freed_memory_trims_the_glibc_heap():
    released = driver.release_freed_memory()
    assert released is sys.platform.startswith("linux")  # glibc on Linux; False, and no error, elsewhere
