"""The recipe reference, generated from the schema's help texts (the docs site's recipe page is built from it).

Named ``docs`` rather than ``reference``: :mod:`pl_parablock.reference` is
the sequential reference run of the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pl_parablock.recipe.schema import ModelSection, Recipe

__all__ = ["reference_markdown", "reference_rows"]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference_rows(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every recipe key, from the schema itself."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows.extend(reference_rows(type(default), key + "."))
            continue
        kind = str(f.type).replace(" | ", " or ")
        rows.append((key, kind, _show(default), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """The recipe reference as a Markdown table (the docs site's recipe page is built from it)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in reference_rows():
        cell = default if len(default) <= 40 else "see below"
        lines.append(f"| `{key}` | `{kind}` | `{cell}` | {meaning.replace('|', '&#124;')} |")
    lines.append("")
    lines.append(f"Default `model.config` (the quickstart model): `{_show(ModelSection().config)}`.")
    return "\n".join(lines)
