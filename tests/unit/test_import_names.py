"""Tandem's top-level import names are checked to be Tandem's (deploy/import_names.py)."""

from __future__ import annotations

import pytest

from deploy.import_names import TOP_LEVEL, ImportNameCollision, check_import_names


def test_this_environment_has_no_collision():
    check_import_names()  # the suite's own .venv: every name is Tandem's


def test_another_distribution_claiming_a_name_is_refused():
    claims = {name: ["tandem-serve"] for name in TOP_LEVEL}
    claims["common"] = ["tandem-serve", "common-utils"]
    with pytest.raises(ImportNameCollision, match=r"'common' is also installed by common-utils.*own virtual"):
        check_import_names(claims)


def test_a_name_resolving_to_a_foreign_package_is_refused():
    with pytest.raises(ImportNameCollision, match=r"'json' resolves to .*json.* not Tandem's package"):
        check_import_names({}, names=("engine", "json"))


def test_every_top_level_package_carries_the_marker():
    import importlib

    for name in TOP_LEVEL:
        assert importlib.import_module(name).TANDEM_PACKAGE == "tandem-serve", name
