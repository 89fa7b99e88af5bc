"""The packages' layering: each imports only the packages beneath it, so serving a model never needs the code that
trains one, and a worker's archive stages nothing it cannot use.

    models ← handlers          (the networks, specs and numerics; the handler that serves them)
    models ← training          (training reads the data sets and writes weights, cards, reference images)
    models ← serving ← client ← benchmarks
"""
from __future__ import annotations

import ast

from serving.catalog import ROOT

PACKAGES = ("models", "handlers", "training", "serving", "client", "benchmarks")
ALLOWED = {"models": set(), "handlers": {"models"}, "training": {"models"}, "serving": {"models", "handlers"},
           "client": {"models", "serving"}, "benchmarks": {"models", "handlers", "serving", "client"}}


def imports_of(package: str) -> set[tuple[str, str]]:
    """(file, imported package) for every import of another of this project's packages, at any depth of the
    file (lazy imports inside functions count: they run too)."""
    found = set()
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found |= {(path.name, name.split(".")[0]) for name in names
                      if name.split(".")[0] in PACKAGES and name.split(".")[0] != package}
    return found


def test_every_package_imports_only_the_packages_beneath_it():
    upward = {package: sorted((f, imported) for f, imported in imports_of(package) if imported not in ALLOWED[package])
              for package in PACKAGES}
    assert {package: edges for package, edges in upward.items() if edges} == {}


def test_nothing_that_serves_or_measures_imports_training():
    """The edge that crept back twice: the reference images, the data sets and the calibration fit live in
    models/, which training and serving share."""
    assert {(package, f) for package in ("serving", "benchmarks", "client", "handlers")
            for f, imported in imports_of(package) if imported == "training"} == set()
