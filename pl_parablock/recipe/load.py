"""Loading a recipe: YAML, command-line overrides, and the recipe back out as YAML or plain data.

Command-line overrides use OmegaConf's dotlist form (``train.lr=1e-4``).
Every problem in a recipe (an unknown key, a wrong type, an impossible
value, a missing file) is collected and reported at once in one
:class:`~pl_parablock.errors.ConfigError` that names each key; the
semantic checks are :func:`pl_parablock.recipe.validate.validate`'s.

Example::

    >>> from pl_parablock.recipe.load import load_recipe
    >>> recipe = load_recipe(None, ["mode=sync", "federation.clients=2"])
    >>> recipe.mode, recipe.federation.clients
    ('sync', 2)
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pl_parablock.errors import ConfigError
from pl_parablock.recipe.schema import Recipe
from pl_parablock.recipe.validate import validate

__all__ = ["load_recipe", "to_dict", "to_yaml"]


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-5`` is a float (as in YAML 1.2 and OmegaConf), not a string.

    Free-form sections such as ``model.config`` are passed on as read, so a
    string there would reach transformers instead of the number meant.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _first_line(exc: OmegaConfBaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _leaves(base: DictConfig, value: Any, prefix: str) -> list[tuple[str, Any]]:
    """Flatten a user mapping into (dotted key, value) pairs.

    Recursion stops at keys whose schema node is not a section (a free-form
    dict such as ``model.config`` is one leaf and replaces the default).
    """
    node = OmegaConf.select(base, prefix, throw_on_missing=False) if prefix else base
    is_section = isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))
    if isinstance(value, dict) and (is_section or not prefix):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(_leaves(base, v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, value)]


def _assign(cfg: DictConfig, key: str, value: Any, problems: list[str]) -> None:
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        merge = isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))
        OmegaConf.update(cfg, key, value, merge=merge)
    except OmegaConfBaseException as exc:
        problems.append(f"`{key}`: {_first_line(exc)}")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{item}` is not of the form key=value (e.g. train.lr=1e-4)")
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))
    assert isinstance(parsed, dict)
    return key.strip(), parsed["v"]


def load_recipe(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Recipe:
    """Load, merge and validate a recipe.

    Args:
        path: YAML recipe; ``None`` starts from the schema defaults (the quickstart).
        overrides: OmegaConf dotlist items such as ``["mode=sync", "train.lr=1e-4"]``.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        ConfigError: listing every problem found, each naming its key.
    """
    source = str(path) if path is not None else None
    user: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"recipe file `{path}` not found; pass the path of a YAML recipe such as recipes/quickstart.yaml")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.load(f, Loader=_RecipeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("the top level must be a mapping of keys (mode:, model:, ...)", source)
        user = loaded

    cfg = OmegaConf.structured(Recipe)
    problems: list[str] = []
    for key, value in _leaves(cfg, user, ""):
        _assign(cfg, key, value, problems)
    for item in overrides or []:
        key, value = _parse_override(item)
        _assign(cfg, key, value, problems)
    if problems:
        raise ConfigError(problems, source)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            [f"`{key}` must be given (the recipe leaves it as ???): add {key}=... to the command line" for key in missing], source
        )
    recipe = OmegaConf.to_object(cfg)
    assert isinstance(recipe, Recipe)
    problems = validate(recipe)
    if problems:
        raise ConfigError(problems, source)
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML (all keys, resolved), e.g. to record it next to a run."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data."""
    out = OmegaConf.to_container(OmegaConf.structured(recipe))
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
