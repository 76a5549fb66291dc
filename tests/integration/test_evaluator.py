"""The evaluator of its own gives client 0's curve, final metrics and saved model, bitwise, and never holds training up.

A one-process federation (clients and the evaluator as threads over the
real service) runs once with ``eval.evaluator=client`` and once with
``process``: the report's ``eval_curve`` and ``final`` metrics and the saved
model's bytes must be equal, and with the evaluator client 0 evaluates
nothing. A dead evaluator leaves a federation that ends normally.

Wrong variants tried: the evaluator reading the point one round late
(``Evaluator.load(n + 1)``): the first test fails (the curve's values
differ at every point but the final); ``prepare_client`` still letting
client 0 evaluate with a process evaluator: the first test fails (client 0
has an evaluation callback).
"""

from __future__ import annotations

import hashlib
import os

from pl_parablock.client.evaluation import ModelEvaluation
from pl_parablock.fit import federate_in_process
from pl_parablock.report import build_report
from pl_parablock.wire.link import Link
from tests.helpers import tiny_recipe

OVERRIDES = ("federation.clients=2", "federation.rounds=5", "eval.every=2", "eval.hold_models=1000", "data.num_samples=48")


def saved(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with open(os.path.join(model_dir, name), "rb") as fh:
                h.update(name.encode() + fh.read())
    return h.hexdigest()


def run(tmp_path, who: str, *extra: str):
    recipe = tiny_recipe(tmp_path, *OVERRIDES, f"eval.evaluator={who}", *extra, output=who)
    agg, runs, wall = federate_in_process(recipe)
    report = build_report(recipe, agg.report(), wall_s=wall, link=Link(), output_dir=recipe.output_dir)
    return recipe, runs, report


def without_times(points):
    return [{k: v for k, v in p.items() if k != "eval_s"} for p in points]


def test_the_evaluator_gives_client_0s_curve_final_metrics_and_model_bitwise(tmp_path):
    _, client_runs, by_client = run(tmp_path, "client")
    recipe, process_runs, by_evaluator = run(tmp_path, "process")

    assert client_runs[0].evaluation is not None and all(r.evaluation is None for r in process_runs), "client 0 no longer evaluates"
    curve = without_times(by_evaluator["eval_curve"])
    assert [p["round"] for p in curve] == [0, 2, 5]  # parablock: the point after round 4 is the final one's (client 0's rule)
    assert curve == without_times(by_client["eval_curve"])
    keys = ("eval_loss", "perplexity", "exact_match", "eval_samples", "model_format")
    assert {k: by_evaluator["final"].get(k) for k in keys} == {k: by_client["final"].get(k) for k in keys}
    assert by_evaluator["final"]["eval_loss"] is not None
    assert saved(os.path.join(recipe.output_dir, "model")) == saved(str(tmp_path / "client" / "model"))
    assert by_evaluator["evaluator"]["reported"] and by_evaluator["evaluator"]["skipped_points"] == []


def test_a_dead_evaluator_does_not_stop_the_federation(tmp_path, monkeypatch):
    def dies(self, model):
        raise RuntimeError("the evaluator died")

    monkeypatch.setattr(ModelEvaluation, "evaluate", dies)
    recipe, _, report = run(tmp_path, "process")
    assert len(report["rounds"]) == recipe.federation.rounds, "every round closed"
    assert report["final"]["eval_loss"] is None and report["eval_curve"] == []
    assert report["evaluator"] is None or not report["evaluator"]["reported"]


def test_role_evaluator_without_a_server_says_what_to_give(capsys):
    from pl_parablock.fit import main

    assert main(["--role", "evaluator"]) == 2
    assert "--role evaluator needs --server HOST:PORT" in capsys.readouterr().err
