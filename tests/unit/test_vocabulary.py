"""Each vocabulary of the recipe is its owner module's, so the two cannot drift apart.

The recipe (config.py) accepts exactly the values the module that implements
a key knows: schedules (blocks.py), parameter dtypes (models.py), wire dtypes
(federation/wire.py), data and row formats (data/formats.py), aggregation
rules (aggregate.py), codecs (compression.py). What the recipe accepts is measured by
validating a recipe with each candidate value, not read from config.py's
names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pl_parablock.core.aggregate import AGGREGATIONS, ROBUST_METHODS
from pl_parablock.core.blocks import SCHEDULES, make_schedule
from pl_parablock.core.codecs import CODECS
from pl_parablock.data.formats import DATA_FORMATS, FILE_FORMATS, ROW_FORMAT_CHOICES, ROW_FORMATS
from pl_parablock.errors import ModelError
from pl_parablock.model.build import DTYPES as PARAMETER_DTYPES
from pl_parablock.recipe import validate as config
from pl_parablock.recipe.schema import Recipe
from pl_parablock.recipe.validate import validate
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.wire.framing import DTYPES as TRAVEL_DTYPES
from pl_parablock.wire.framing import WIRE_DTYPES

OWNERS: dict[str, tuple[str, ...]] = {
    "blocks.schedule": SCHEDULES,
    "model.dtype": tuple(PARAMETER_DTYPES),
    "federation.wire_dtype": tuple(WIRE_DTYPES),
    "data.format": DATA_FORMATS,
    "data.row_format": ROW_FORMAT_CHOICES,
    "federation.aggregation": AGGREGATIONS,
    "federation.compression.codec": tuple(CODECS),
    "federation.compression.download": tuple(CODECS),
}
# every word of every vocabulary, and some that belong to none
CANDIDATES = {w for words in OWNERS.values() for w in words} | set(TRAVEL_DTYPES) | {"", "mean ", "Ascending", "bogus"}


# what else a key needs set for its own values to be valid
CONTEXT = {"data.row_format": {"data.format": "hf"}}


def _field(recipe: Recipe, key: str) -> tuple[Any, str]:
    *path, name = key.split(".")
    section: Any = recipe
    for part in path:
        section = getattr(section, part)
    return section, name


def _accepted(key: str) -> set[str]:
    out = set()
    for value in CANDIDATES:
        recipe = Recipe()
        for other, setting in {**CONTEXT.get(key, {}), key: value}.items():
            setattr(*_field(recipe, other), setting)
        if not [p for p in validate(recipe) if p.startswith(f"`{key}`")]:
            out.add(value)
    return out


@pytest.mark.parametrize("key", sorted(OWNERS))
def test_the_recipe_accepts_exactly_the_owner_modules_vocabulary(key):
    assert _accepted(key) == set(OWNERS[key])


@pytest.mark.parametrize("key", sorted(OWNERS))
def test_the_recipe_reference_names_every_value(key):
    section, name = _field(Recipe(), key)
    text = next(f.metadata["help"] for f in dataclasses.fields(section) if f.name == name)
    assert all(value in text for value in OWNERS[key]), (key, text)


def test_the_vocabularies_are_built_from_one_another():
    assert set(WIRE_DTYPES) <= set(TRAVEL_DTYPES)
    assert all(TRAVEL_DTYPES[name] is dtype and dtype.is_floating_point for name, dtype in WIRE_DTYPES.items())
    assert DATA_FORMATS == ("synthetic", *FILE_FORMATS)
    assert ROW_FORMAT_CHOICES == ("auto", *ROW_FORMATS)
    assert AGGREGATIONS == ("mean", *ROBUST_METHODS)


def test_the_implementations_accept_the_same_values():
    def refused(call: Any, error: type[Exception]) -> bool:
        try:
            call()
        except error:
            return True
        return False

    assert {v for v in CANDIDATES if not refused(lambda v=v: make_schedule(v, 2, 2), ModelError)} == set(SCHEDULES)
    assert {v for v in CANDIDATES if not refused(lambda v=v: Aggregator(clients=1, rounds=1, aggregation=v), ValueError)} == set(
        AGGREGATIONS
    )


def test_config_defines_none_of_them_itself():
    assert config.SCHEDULES is SCHEDULES
    assert config.DTYPES is PARAMETER_DTYPES
    assert config.WIRE_DTYPES is WIRE_DTYPES
    assert config.DATA_FORMATS is DATA_FORMATS
    assert config.ROW_FORMAT_CHOICES is ROW_FORMAT_CHOICES
    assert config.AGGREGATIONS is AGGREGATIONS


def test_the_cli_documents_the_same_values():
    from pl_parablock.cli import CausalLM, FederatedData

    data_doc, model_doc = FederatedData.__doc__ or "", CausalLM.__doc__ or ""
    assert "format: " + " | ".join(DATA_FORMATS) + "." in data_doc
    assert "(" + " | ".join(ROW_FORMAT_CHOICES) + ")" in data_doc
    names = list(PARAMETER_DTYPES)
    assert "dtype: " + ", ".join(names[:-1]) + " or " + names[-1] + "." in model_doc
