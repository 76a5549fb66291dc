"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), flags=re.S)


def test_the_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_the_recipe_reference_is_the_schema():
    from pl_parablock.recipe.docs import reference_markdown

    text = open(README, encoding="utf-8").read()
    start, end = "<!-- recipe-reference:start -->\n", "\n<!-- recipe-reference:end -->"
    embedded = text[text.index(start) + len(start) : text.index(end)]
    assert embedded == reference_markdown(), "regenerate the README table with `python -m pl_parablock.fit --reference`"


def test_the_readme_cli_client_runs_against_a_server(tmp_path):
    import subprocess
    import sys

    import yaml

    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.grpc_server import FederationServer
    from pl_parablock.server.service import FederationService

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", open(README, encoding="utf-8").read(), flags=re.S) if "class_path" in b)
    config = yaml.safe_load(block)
    agg = Aggregator(clients=1, rounds=2, mode="parablock")
    server = FederationServer(FederationService(agg))
    address = server.start()
    try:
        config["trainer"]["callbacks"][0]["init_args"]["server"] = address  # this test's server, with one client
        config["data"]["clients"] = 1
        path = tmp_path / "client.yaml"
        path.write_text(yaml.safe_dump(config))
        root = os.path.dirname(README)  # the client imports this checkout's package, whatever is installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run(
            [sys.executable, "-m", "pl_parablock.cli", "fit", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert agg.next_round() == 2
    finally:
        server.stop()
