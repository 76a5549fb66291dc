"""The recipe reference page, generated at build time from the recipe schema (an mkdocs hook).

``docs/recipe.md`` holds the marker ``<!-- recipe-reference -->``; when that
page is built, the marker is replaced by the table of every recipe key, the
same text ``python -m pl_parablock.fit --reference`` prints. The table is
never committed, so it cannot fall behind the schema.
"""

from __future__ import annotations

import importlib
from typing import Any

MARKER = "<!-- recipe-reference -->"
PAGE = "recipe.md"


def reference_markdown() -> str:
    """The recipe reference table, from wherever the package keeps its generator."""
    for name in ("pl_parablock.recipe.docs", "pl_parablock.recipe.schema"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports does not
                raise
            continue
        if hasattr(module, "reference_markdown"):
            return str(module.reference_markdown())
    raise ImportError("no reference_markdown() in pl_parablock.recipe.docs or pl_parablock.recipe.schema")


def render(markdown: str) -> str:
    """The page's Markdown with its marker replaced by the table."""
    if markdown.count(MARKER) != 1:
        raise ValueError(f"{PAGE} must hold the marker {MARKER} exactly once")
    return markdown.replace(MARKER, reference_markdown())


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """mkdocs hook: fill in the recipe reference page; every other page passes unchanged."""
    if page.file.src_uri == PAGE:
        return render(markdown)
    return markdown
