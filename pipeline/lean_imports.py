"""Imports that cost what is used: scikit-learn without pandas, skops.io without importing every estimator.

Two libraries load far more than cnncodes uses, in every process that fits or loads a head:
- sklearn.utils.fixes imports pandas "to have it at hand" (its module-level `pd` is used nowhere):
  0.6 CPU-s. Here that one module runs as if pandas were absent; scikit-learn recognises
  DataFrames by looking pandas up in sys.modules, so a pandas that anything else imports still works.
- skops.io lists its default trusted types when imported: every scikit-learn estimator (through
  sklearn.utils.all_estimators, which imports every module of scikit-learn) and every numpy and
  scipy ufunc (each name found by a search of sys.modules): 2 to 4 CPU-s. For the versions in
  skops_trusted_types.json (skops, scikit-learn, numpy, scipy) its lists are read from that file
  instead (tests/test_lean_imports.py checks them against skops' own, computed in a fresh process;
  `python -c "from pipeline.lean_imports import write_snapshot; write_snapshot()"` writes it for the
  installed versions). Other versions take skops' own path. Only names are read: nothing is trusted
  because of this file that skops would not trust.
scipy.stats stays: sklearn._loss.link (logistic regression) and sklearn.metrics import functions
from it at their top.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


class _WithoutPandas(importlib.abc.Loader):
    """Runs a module's loader with `import pandas` failing, unless pandas is loaded already."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if "pandas" in sys.modules:
            return self.loader.exec_module(module)
        sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
        try:
            self.loader.exec_module(module)
        finally:
            if sys.modules.get("pandas", 0) is None:
                del sys.modules["pandas"]


class _SklearnFixesFinder(importlib.abc.MetaPathFinder):
    """Finds sklearn.utils.fixes as usual and hands it to _WithoutPandas."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "sklearn.utils.fixes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutPandas(spec.loader)
        return spec


def install() -> None:
    """Put the pandas-free loading of sklearn.utils.fixes in place (once; nothing when sklearn is loaded)."""
    if "sklearn.utils.fixes" not in sys.modules and not any(isinstance(f, _SklearnFixesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SklearnFixesFinder())


SNAPSHOT = Path(__file__).with_name("skops_trusted_types.json")
PACKAGES = ("skops", "scikit-learn", "numpy", "scipy")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in PACKAGES}


def trusted_type_lists(module: ModuleType) -> dict[str, list[str]]:
    """The lists of type names a skops.io._trusted_types module holds (its *_TYPE_NAMES)."""
    return {name: list(value) for name, value in vars(module).items() if name.endswith("_TYPE_NAMES")}


def import_skops_io() -> ModuleType:
    """skops.io, with its trusted-type lists read from SNAPSHOT when the installed versions are the snapshot's."""
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8")) if SNAPSHOT.is_file() else {}
    if snapshot.get("versions") == _versions() and "skops.io._trusted_types" not in sys.modules:
        module = ModuleType("skops.io._trusted_types", "skops' trusted type names, from " + str(SNAPSHOT))
        module.__dict__.update(snapshot["lists"])
        module.PRIMITIVES_TYPES = [int, float, str, bool]  # what skops' module also holds, as types
        module.CONTAINER_TYPES = [list, set, map, tuple]
        sys.modules[module.__name__] = module
    import skops.io

    return skops.io


def write_snapshot() -> Path:
    """Write SNAPSHOT from skops' own module (in a process that has not imported skops.io yet)."""
    if "skops.io._trusted_types" in sys.modules:
        raise RuntimeError("skops.io._trusted_types is loaded already; call write_snapshot in a fresh process")
    import skops.io._trusted_types as own

    SNAPSHOT.write_text(
        json.dumps({"versions": _versions(), "lists": trusted_type_lists(own)}, indent=1) + "\n", encoding="utf-8"
    )
    return SNAPSHOT
