"""cnncodes: frozen CNN codes in an HDF5 cache, scikit-learn heads, optional fine-tuning.

The public API is the names in ``__all__``. They load lazily (PEP 562), so ``import pipeline`` costs nothing
and each name imports only the modules it needs (TensorFlow only for the stages that run a backbone).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BackboneConfig": "backbones",
    "FeatureCache": "cache",
    "UserError": "errors",
    "extract": "extract",
    "load": "cache",
    "fit_head": "heads",
    "load_head": "heads",
    "predict": "predict",
    "export_head": "export",
    "finetune": "finetune",
    "compare": "compare",
    "audit": "audit",
    "study": "study",
    "read_study": "study_results",
    "StudyResults": "study_results",
    "StudyRow": "study_results",
    "build_report": "web.report",
    "serve": "web.serve",
    "train": "train",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
