"""`python -m pl_parablock.compare`: several recipes, the same overrides, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
