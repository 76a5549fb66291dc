"""The default thread count follows the cores this process may run on, not the machine's count."""

from __future__ import annotations

import os

import pytest

from pl_parablock.recipe import cores
from pl_parablock.recipe.build import client_threads
from pl_parablock.recipe.cores import _cgroup_quota, available_cores
from pl_parablock.recipe.schema import Recipe


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_process_pinned_to_one_core_gives_its_clients_one_thread_each() -> None:
    before = os.sched_getaffinity(0)
    recipe = Recipe()
    recipe.federation.clients = 1
    try:
        os.sched_setaffinity(0, {min(before)})
        assert available_cores() == 1
        assert client_threads(recipe) == 1
    finally:
        os.sched_setaffinity(0, before)
    assert available_cores() == min(len(before), available_cores())


def test_a_cgroup_quota_caps_the_cores(tmp_path, monkeypatch) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _cgroup_quota(str(quota)) == 1.5
    quota.write_text("max 100000\n")
    assert _cgroup_quota(str(quota)) is None
    quota.write_text("garbage\n")
    assert _cgroup_quota(str(quota)) is None
    assert _cgroup_quota(str(tmp_path / "absent")) is None
    monkeypatch.setattr(cores, "_cgroup_quota", lambda: 1.0)
    assert available_cores() == 1  # a quota of one core, whatever the affinity


def test_an_explicit_thread_count_wins() -> None:
    recipe = Recipe()
    recipe.train.threads = 7
    assert client_threads(recipe) == 7
