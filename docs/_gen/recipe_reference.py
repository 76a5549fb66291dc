"""The recipe reference page, generated at build time from the recipe schema (an mkdocs hook).

``docs/recipe.md`` holds the marker ``<!-- recipe-reference -->``; when that
page is built, the marker is replaced by the table of every recipe key, the
same text ``python -m pl_parablock.fit --reference`` prints. The table is
never committed, so it cannot fall behind the schema.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- recipe-reference -->"
PAGE = "recipe.md"


def reference_markdown() -> str:
    """The recipe reference table, generated from the schema's help texts."""
    from pl_parablock.recipe.docs import reference_markdown as generate

    return generate()


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
