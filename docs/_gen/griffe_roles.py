"""A griffe extension: the docstrings' Sphinx roles (``:class:`X```) render as code (``X``) in the API reference.

The package's docstrings name other objects the Sphinx way; Markdown has no
such roles, so without this the page would show ``:class:`` before the
name. The name becomes inline code, not a link: a link to a name the
reference cannot resolve would fail the strict build.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|paramref):`~?([^`]+)`")


class SphinxRoles(Extension):
    """Rewrite ``:role:`name``` to ```name``` in every docstring as it is loaded."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        """Run on each object griffe creates (module, class, function, attribute)."""
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
