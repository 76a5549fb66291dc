"""The Lightning CLI entry: one client per process against a running server."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import yaml

from pl_parablock.cli import CLI_DATA_FIELDS, CLI_MODEL_FIELDS, CausalLM, FederatedData

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def client_config(server: str, client_id: int, **strategy) -> dict:
    return {
        "seed_everything": 0,
        "model": {
            "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
            "lr": 3.0e-3,
        },
        "data": {"num_samples": 64, "clients": 2, "batch_size": 4, "max_length": 64},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "pl_parablock.FederatedBlockStrategy",
                    "init_args": {"server": server, "client_id": client_id, "local_steps": 2, "mode": "sync", "timeout_s": 60, **strategy},
                }
            ],
        },
    }


def cli(*args: str, wait: bool = True, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pl_parablock.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=kw.get("cwd", ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=kw.get("cwd", ROOT))


def test_cli_arguments_are_the_recipe_sections():
    assert CLI_MODEL_FIELDS <= set(inspect.signature(CausalLM).parameters)
    assert CLI_DATA_FIELDS <= set(inspect.signature(FederatedData).parameters)


def test_print_config_and_documented_callback_help(tmp_path):
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump(client_config("127.0.0.1:1", 0)))
    done = cli("fit", "--config", str(path), "--print_config")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["trainer"]["callbacks"][0]["class_path"] == "pl_parablock.FederatedBlockStrategy"
    assert printed["model"]["config"]["model_type"] == "llama" and printed["data"]["clients"] == 2
    help_text = cli("fit", "--trainer.callbacks.help", "pl_parablock.FederatedBlockStrategy").stdout
    assert "optimizer steps per round" in help_text and "--trainer.callbacks.local_steps" in help_text


# two CLI client processes federating: tests/integration/test_readme.py runs the documented configuration so


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.config.model_type=llamma", "not a transformers model type"),
        ("--data.format=csv", "data.format"),
    ],
)
def test_bad_client_settings_exit_2_with_the_key(tmp_path, override, message):
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump(client_config("127.0.0.1:1", 0)))
    done = cli("fit", "--config", str(path), override, cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
