"""`python -m pl_parablock.compare`: several recipes, the same overrides, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import TINY_RECIPE

COLUMNS = {"recipe", "mode", "eval_loss", "perplexity", "exact_match", "wall_s", "clock", "bytes_up", "bytes_down", "peak_rss_mb",
           "trainable_params"}  # fmt: skip


def compare(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pl_parablock.compare", *args], capture_output=True, text=True, timeout=300, env=env)


def test_a_folder_of_recipes_makes_one_table(tmp_path):
    """Run in the simulator (the fastest way through the command; --inprocess and the default only change the entry point)."""
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "sync.yaml").write_text(TINY_RECIPE + "mode: sync\n")
    (folder / "lora.yaml").write_text(TINY_RECIPE + "mode: parablock\nmodel:\n  peft: {method: lora, r: 2}\n")
    (folder / "fedcybgd.yaml").write_text(TINY_RECIPE + "mode: cyclic\n")
    out = tmp_path / "table"
    done = compare(str(folder), "federation.rounds=2", "federation.clients=2", f"output_dir={out}", "--simulate")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["recipe"], r["mode"], r["clock"]) for r in rows] == [
        ("fedcybgd", "cyclic", "simulated"),
        ("lora", "parablock", "simulated"),
        ("sync", "sync", "simulated"),
    ]
    assert all(set(r) == COLUMNS for r in rows)
    assert all(r["eval_loss"] > 0 and r["bytes_up"] > 0 for r in rows)
    lora, full = rows[1]["trainable_params"], rows[2]["trainable_params"]
    assert 0 < lora < full, "LoRA trains only its adapters"
    assert (out / "comparison.png").stat().st_size > 0
    assert "| recipe | mode | eval loss |" in done.stdout and "| sync | sync |" in done.stdout
    for name in ("fedcybgd", "lora", "sync"):
        assert (out / name / "report.json").exists()


def test_bad_input_exits_2_naming_the_culprit(tmp_path, capsys):
    from pl_parablock.compare import main

    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    assert main([str(recipe), "federation.roundz=2", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "federation.roundz" in err and "Traceback" not in err and not (tmp_path / "o" / "compare.json").exists()


def test_seeds_run_every_recipe_per_seed_and_report_mean_and_spread(tmp_path):
    """Two tiny recipes × two seeds in the simulator: a row per recipe with its mean and standard deviation, and the runs."""
    import statistics

    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "sync.yaml").write_text(TINY_RECIPE + "mode: sync\n")
    (folder / "parablock.yaml").write_text(TINY_RECIPE + "mode: parablock\n")
    out = tmp_path / "seeds"
    done = compare(str(folder), "federation.rounds=2", "federation.clients=2", f"output_dir={out}", "--simulate", "--seeds", "0,1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((out / "compare.json").read_text())
    assert table["seeds"] == [0, 1]
    assert [(r["recipe"], r["mode"], r["clock"], r["seeds"]) for r in table["rows"]] == [
        ("parablock", "parablock", "simulated", [0, 1]),
        ("sync", "sync", "simulated", [0, 1]),
    ]
    runs = table["per_seed"]
    assert [(r["recipe"], r["seed"]) for r in runs] == [("parablock", 0), ("parablock", 1), ("sync", 0), ("sync", 1)]
    assert all(set(r) == COLUMNS | {"seed"} for r in runs)
    for row in table["rows"]:
        mine = [r for r in runs if r["recipe"] == row["recipe"]]
        for metric in ("eval_loss", "perplexity", "exact_match", "wall_s"):  # the synthetic data have answers to match
            values = [r[metric] for r in mine]
            assert row["mean"][metric] == pytest.approx(statistics.fmean(values))
            assert row["std"][metric] == pytest.approx(statistics.stdev(values))
        # the seeds are different runs: another seed, another model
        assert mine[0]["eval_loss"] != mine[1]["eval_loss"]
    for name in ("parablock", "sync"):
        for seed in (0, 1):
            report = json.loads((out / name / f"seed{seed}" / "report.json").read_text())
            assert f"seed: {seed}" in (out / name / f"seed{seed}" / "recipe.yaml").read_text()
            assert report["clock"]["simulated"] is True
    assert (out / "comparison.png").stat().st_size > 0
    assert "| recipe | mode | seeds | eval loss |" in done.stdout and " ± " in done.stdout


@pytest.mark.parametrize("seeds", ["0,x", "1.5", "", "0,0", "-1"])
def test_bad_seeds_exit_2_in_one_line_naming_the_flag(seeds, tmp_path, capsys):
    from pl_parablock.compare import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    assert main([str(recipe), "--seeds", seeds, f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `--seeds`") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_seeds_and_a_seed_override_are_one_too_many(tmp_path, capsys):
    from pl_parablock.compare import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    assert main([str(recipe), "seed=3", "--seeds", "0,1", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "`--seeds`" in err and "`seed=`" in err and err.count("\n") == 1


def test_a_metric_some_run_lacks_has_no_mean_and_one_seed_has_no_spread():
    from pl_parablock.compare import seed_row

    rows = [{"mode": "sync", "clock": "simulated", "eval_loss": 2.0, "perplexity": 7.0, "exact_match": None, "wall_s": 1.0},
            {"mode": "sync", "clock": "simulated", "eval_loss": 4.0, "perplexity": 9.0, "exact_match": 0.5, "wall_s": 3.0}]  # fmt: skip
    row = seed_row("sync", rows, [0, 1])
    assert row["mean"] == {"eval_loss": 3.0, "perplexity": 8.0, "exact_match": None, "wall_s": 2.0}
    assert row["std"]["eval_loss"] == pytest.approx(2**0.5) and row["std"]["exact_match"] is None
    one = seed_row("sync", rows[1:], [1])
    assert one["mean"]["eval_loss"] == 4.0 and one["std"]["eval_loss"] is None
