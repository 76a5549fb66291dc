"""The documentation runs as written: the README and every page of the site under ``docs/``.

* Every ```` ```python ```` example of ``README.md`` and ``docs/**/*.md`` runs.
* The Lightning CLI client configuration (the ```` ```yaml ```` block with
  ``class_path``, wherever it lives) runs against a server.
* The recipe reference page is generated when the site is built
  (``docs/_gen/recipe_reference.py``, an mkdocs hook); there is no committed
  copy to compare, so the generator must produce the page from the schema,
  and ``python -m pl_parablock.fit --reference`` must print the same table.
* The API reference has a page for every public module (``docs/_gen/api.py``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
from types import ModuleType

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
PAGES = [README, *sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))]


def _blocks(language: str) -> list[tuple[str, str]]:
    """(page relative to the root, code) of every fenced block in ``language``, in page order."""
    out = []
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        out += [(os.path.relpath(page, ROOT), code) for code in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)]
    return out


PYTHON = _blocks("python")


def _load(name: str) -> ModuleType:
    """A script of ``docs/_gen`` as a module (they are not part of the package)."""
    path = os.path.join(DOCS, "_gen", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"docs_gen_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_and_the_docs_have_examples():
    pages = {page for page, _ in PYTHON}
    assert "README.md" in pages
    assert any(page.startswith("docs") for page in pages)


@pytest.mark.parametrize("page,code", PYTHON, ids=[f"{page}:{i}" for i, (page, _) in enumerate(PYTHON)])
def test_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, page, "exec"), {"__name__": "docs_example"})


def test_the_recipe_reference_page_is_generated_from_the_schema():
    hook = _load("recipe_reference")
    table = hook.reference_markdown()
    from pl_parablock.recipe.docs import reference_markdown

    assert table == reference_markdown()
    assert table.startswith("| key | type | default | meaning |")
    for key in ("`mode`", "`federation.compression.codec`", "`data.format`", "`simulation.bandwidth_mbps`"):
        assert f"| {key} |" in table

    page = open(os.path.join(DOCS, hook.PAGE), encoding="utf-8").read()
    rendered = hook.render(page)
    assert table in rendered and hook.MARKER not in rendered
    with pytest.raises(ValueError):
        hook.render(page.replace(hook.MARKER, ""))


def test_fit_reference_prints_the_table():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(
        [sys.executable, "-m", "pl_parablock.fit", "--reference"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == _load("recipe_reference").reference_markdown().strip()


def test_the_api_reference_has_a_page_per_public_module():
    pytest.importorskip("mkdocs_gen_files")
    api = _load("api")
    names = {".".join(parts) for parts in api.modules()}
    assert {"pl_parablock", "pl_parablock.core", "pl_parablock.core.plan", "pl_parablock.client.strategy", "pl_parablock.fit"} <= names
    assert not any(part.startswith("_") for name in names for part in name.split("."))
    sources = glob.glob(os.path.join(ROOT, "pl_parablock", "**", "*.py"), recursive=True)
    public = [s for s in sources if not any(p.startswith("_") and p != "__init__.py" for p in os.path.relpath(s, ROOT).split(os.sep))]
    assert len(names) == len(public)


def test_the_documented_cli_client_federates_against_a_server(tmp_path):
    """The documented Lightning CLI configuration, as two client processes (ids 0 and 1) against one server."""
    import yaml

    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.grpc_server import FederationServer
    from pl_parablock.server.service import FederationService

    blocks = [code for _, code in _blocks("yaml") if "class_path" in code]
    assert len(blocks) == 1, "one Lightning CLI client configuration, in the README or a docs page"
    agg = Aggregator(clients=2, rounds=2, mode="parablock")
    server = FederationServer(FederationService(agg))
    address = server.start()
    # the clients import this checkout's package, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for i in range(2):
            config = yaml.safe_load(blocks[0])
            config["trainer"]["callbacks"][0]["init_args"].update(server=address, client_id=i)  # this test's server
            config["data"]["clients"] = 2
            path = tmp_path / f"client{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            cmd = [sys.executable, "-m", "pl_parablock.cli", "fit", "--config", str(path)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env))
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out[-3000:]
        assert agg.finished and agg.next_round() == 2
        assert all(r["arrived"] == 2 for r in agg.report()["rounds"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        server.stop()
