"""The recipe: its schema, loading and overrides, validation and the builders of what it names.

* :mod:`~pl_parablock.recipe.schema`: the sections, every key with its help text, :class:`Recipe`;
* :mod:`~pl_parablock.recipe.load`: YAML, dotlist overrides, :func:`load_recipe`, :func:`to_yaml`, :func:`to_dict`;
* :mod:`~pl_parablock.recipe.validate`: :func:`~pl_parablock.recipe.validate.validate`, a function per section,
  each rule between sections once;
* :mod:`~pl_parablock.recipe.build`: compression, server optimizer, tokens, weight bound, loggers;
* :mod:`~pl_parablock.recipe.docs`: the recipe reference generated from the schema;
* :mod:`~pl_parablock.recipe.profile`: the clients' profiles of ``simulation.profile``.

The common names are re-exported here and imported on first use, so importing
the package costs nothing. The function ``validate`` is not among them: its
module has that name; import it from :mod:`pl_parablock.recipe.validate`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pl_parablock.recipe.build import compression_of, server_optimizer_of
    from pl_parablock.recipe.docs import reference_markdown
    from pl_parablock.recipe.load import load_recipe, to_dict, to_yaml
    from pl_parablock.recipe.schema import Recipe

_HOMES = {
    "Recipe": "schema",
    "load_recipe": "load",
    "to_dict": "load",
    "to_yaml": "load",
    "compression_of": "build",
    "server_optimizer_of": "build",
    "reference_markdown": "docs",
}

__all__ = ["Recipe", "compression_of", "load_recipe", "reference_markdown", "server_optimizer_of", "to_dict", "to_yaml"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
