"""Lightning loggers: every client's and the server's records under OUTPUT_DIR/logs; a progress line on a terminal."""

from __future__ import annotations

import csv
import importlib.util
import io

import pytest

from pl_parablock.errors import ConfigError
from pl_parablock.fit import RoundPrinter, federate_in_process
from pl_parablock.recipe.load import load_recipe
from tests.helpers import tiny_recipe


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_client_and_the_server_log_their_rounds(tmp_path):
    recipe = tiny_recipe(tmp_path, "federation.clients=2", "federation.rounds=3", "mode=parablock")
    agg, _, _ = federate_in_process(recipe)
    agg.on_round_closed.close()
    logs = tmp_path / "run" / "logs"
    for cid in range(2):
        got = rows(logs / f"client_{cid}" / "metrics.csv")
        columns = set(got[0])
        assert {"train_loss", "round/round", "round/block", "round/blocked_s", "round/bytes_up", "round/bytes_down"} <= columns
        assert any(c.startswith("lr-") for c in columns), "the learning rate is logged"
        logged_rounds = sorted({int(float(r["round/round"])) for r in got if r.get("round/round")})
        assert logged_rounds == [0, 1, 2]
        assert sum(1 for r in got if r.get("train_loss")) == 3 * 2  # every optimizer step
    server = rows(logs / "server" / "metrics.csv")
    assert [int(r["step"]) for r in server] == [0, 1, 2] and all(float(r["arrived"]) == 2 for r in server)


def test_tensorboard_needs_its_package_or_writes_event_files(tmp_path):
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ConfigError, match="logging.tensorboard"):
            load_recipe(None, ["logging.tensorboard=true"])
        return
    recipe = tiny_recipe(tmp_path, "federation.clients=1", "federation.rounds=2", "logging.tensorboard=true")
    federate_in_process(recipe)
    assert list((tmp_path / "run" / "logs" / "client_0").glob("events.out.tfevents.*"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_line_and_a_pipe_gets_plain_lines(tmp_path, monkeypatch):
    recipe = load_recipe(None, ["federation.rounds=4", f"output_dir={tmp_path}", "logging.csv=false"])
    record = {"round": 1, "block": 0, "arrived": 4, "expected": 4, "close_reason": "all", "loss": 2.5}
    screen = Terminal()
    monkeypatch.setattr("sys.stdout", screen)
    RoundPrinter(recipe, progress=True)(record)
    assert screen.getvalue().startswith("\r  round   2/4 [") and "ETA" in screen.getvalue() and "loss 2.5000" in screen.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stdout", pipe)
    RoundPrinter(recipe, progress=True)(record)
    assert pipe.getvalue().startswith("  round   2/4  block  0  4/4 clients  loss 2.5000") and pipe.getvalue().endswith("\n")
