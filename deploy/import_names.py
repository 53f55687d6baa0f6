"""Tandem's top-level import names, and the check that they are Tandem's.

Tandem keeps the design's top-level folders as import names (`engine`, `common`, `router`, ...)
rather than nesting them under one `tandem` package: every module, test, script and doc names them
so. Generic names like these can collide with another distribution that installs a top-level
package of the same name into the same environment; Python then imports whichever comes first on
the path and fails far from the cause. So instead of renaming, Tandem checks, once, at its entry
points (`tandem` CLI, `deploy.serve`, the test suite):

* no other installed distribution declares one of these top-level names
  (`importlib.metadata.packages_distributions`), and
* each name, once imported, is the package shipped next to this file (its `TANDEM_PACKAGE` marker).

A clash raises `ImportNameCollision` naming the name, the other distribution and where the
imported package lives, with what to do about it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from importlib.metadata import packages_distributions

DISTRIBUTION = "tandem-serve"
TOP_LEVEL = (
    "engine",
    "common",
    "kv_transfer",
    "worker_core",
    "prefill_worker",
    "decode_worker",
    "router",
    "deploy",
    "tandem_api",
    "planner",
)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImportNameCollision(ImportError):
    pass


def check_import_names(claims: Mapping[str, list[str]] | None = None, names: tuple[str, ...] = TOP_LEVEL) -> None:
    """Raise ImportNameCollision if another distribution claims one of Tandem's import names, or one of
    them resolves to a package that is not Tandem's. `claims`: top-level name -> distributions (tests)."""
    found = packages_distributions() if claims is None else claims
    problems = []
    for name in names:
        others = sorted({d for d in found.get(name, []) if d.lower().replace("_", "-") != DISTRIBUTION})
        if others:
            problems.append(f"{name!r} is also installed by {', '.join(others)}")
            continue
        module = importlib.import_module(name)
        if getattr(module, "TANDEM_PACKAGE", None) != DISTRIBUTION:
            where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
            problems.append(f"{name!r} resolves to {where}, not Tandem's package under {_ROOT}")
    if problems:
        raise ImportNameCollision(
            "Tandem's import names clash with other packages in this environment: "
            + "; ".join(problems)
            + ". Install Tandem into its own virtual environment (scripts/setup.sh makes .venv), or uninstall "
            "the other distribution."
        )
