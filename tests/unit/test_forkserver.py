"""The fork server forks children with the thread count they asked for, whatever it is, and reports their exits."""

from __future__ import annotations

import pytest

from pl_parablock import forkserver


@pytest.mark.skipif(not forkserver.available(), reason="no safe fork on this platform")
def test_children_of_two_threads_are_forked_with_two_threads_and_their_exit_status(tmp_path):
    # importing torch with OMP_NUM_THREADS=2 starts OpenMP's threads: the fork server must import with one and give
    # each child its own count back, or it cannot fork at all and every client pays the imports again
    fork = forkserver.ForkServer(2)
    try:
        assert fork.wait_ready(120), fork.reason
        logs = [tmp_path / "ok.log", tmp_path / "fails.log"]
        ok = fork.spawn(0, ["0"], str(logs[0]), module="tests.unit._forked_threads")
        fails = fork.spawn(1, ["3"], str(logs[1]), module="tests.unit._forked_threads")
        assert ok.wait(60) == 0 and fails.wait(60) == 3
    finally:
        fork.close()
    assert "OMP_NUM_THREADS=2 torch=2 argv=['0']" in logs[0].read_text()
