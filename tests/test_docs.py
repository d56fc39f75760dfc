"""The reference documentation names everything the code has: keys, error codes, metrics."""

import dataclasses
import re
from pathlib import Path

import pytest

from bioproxy import config, errors

REFERENCE = (Path(__file__).parents[1] / "docs" / "REFERENCE.md").read_text()


def table_row(first_cell_holds):
    """The reference's table rows whose first cell names the given text in backticks."""
    return [
        line
        for line in REFERENCE.splitlines()
        if line.startswith("| ") and f"`{first_cell_holds}`" in line.split(" | ")[0]
    ]


def shown(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@pytest.mark.parametrize("field", config.FIELDS.values(), ids=lambda f: f.name)
def test_every_config_key_is_documented_with_its_default_and_variable(field):
    (row,) = table_row(field.name)
    cells = row.split(" | ")
    assert f"`{config.env_name(field.name)}`" in cells[2], row
    default = field.default if field.default is not dataclasses.MISSING else None
    if default not in (None, ""):  # empty ones are described in words
        assert f"`{shown(default)}`" in cells[1] or shown(default) in cells[1], row


def error_classes():
    found, todo = [], [errors.BioproxyError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_code_is_documented_with_its_status(cls):
    if "code" not in vars(cls):
        return  # a base class that adds no code of its own
    rows = [line for line in REFERENCE.splitlines() if f"`{cls.code}`" in line]
    assert any(line.startswith(f"| {cls.status} ") for line in rows), cls.code


def test_every_metric_is_documented(make_app):
    registry = make_app().extensions["bioproxy"].metrics.registry
    documented = set(re.findall(r"^\| `(bioproxy_\w+)` \|", REFERENCE, re.M))
    names = set()
    for family in registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)

    assert names - documented == set()
    assert documented - names == set()  # and nothing that no longer exists
