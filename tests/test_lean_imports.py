"""pipeline.lean_imports: scikit-learn without pandas, skops.io without importing every estimator, same results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline import lean_imports


def python(code: str) -> str:
    """Run code in a fresh interpreter from the project root; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


def test_the_snapshot_is_skops_own_lists() -> None:
    snapshot = json.loads(lean_imports.SNAPSHOT.read_text())
    if snapshot["versions"] != lean_imports._versions():
        pytest.skip(
            f"installed {lean_imports._versions()}, snapshot of {snapshot['versions']}: import_skops_io takes "
            "skops' own (slow) path"
        )
    # a process that never imports pipeline: skops computes its lists itself, importing every estimator
    own = json.loads(
        python(
            "import json, skops.io._trusted_types as t; "
            "print(json.dumps({k: v for k, v in vars(t).items() if k.endswith('_TYPE_NAMES')}))"
        )
    )
    assert len(own) == 8 and own == snapshot["lists"], (
        "skops' lists changed: run python -c 'from pipeline.lean_imports import write_snapshot; write_snapshot()'"
    )
    # through import_skops_io skops holds the same lists, without having imported every estimator
    seen = json.loads(
        python(
            "import json, sys; from pipeline.lean_imports import import_skops_io, trusted_type_lists; "
            "import_skops_io(); print(json.dumps([trusted_type_lists(sys.modules['skops.io._trusted_types']), "
            "[m for m in ('sklearn.ensemble', 'sklearn.gaussian_process', 'sklearn.mixture') if m in sys.modules]]))"
        )
    )
    assert seen == [own, []]


def test_fit_save_load_predict_without_pandas(tmp_path) -> None:
    """The whole head life cycle in one process loads no pandas, and gives the same head as with pandas."""
    code = f"""
import json, sys
import numpy as np
sys.path.insert(0, {str(ROOT)!r})
{{preload}}
from pipeline.lean_imports import import_skops_io, install
install()  # what the cnncodes command does first
from pipeline.heads import fit_arrays, _load_skops
rng = np.random.default_rng(0)
X = rng.normal(size=(60, 8)) + np.repeat(np.eye(3, 8) * 2, 20, axis=0)
y = np.repeat(np.arange(3), 20)
fitted = fit_arrays(X, y, np.arange(60), ["a", "b", "c"], "logreg", cv=3, n_jobs=2, log=lambda m: None)
path = {str(tmp_path)!r} + "/head-{{name}}.skops"
import_skops_io().dump(fitted.model, path)
proba = _load_skops(__import__("pathlib").Path(path)).predict_proba(X)
print(json.dumps(["pandas" in sys.modules, fitted.best_params, proba.round(12).tolist()]))
"""
    lean = json.loads(python(code.format(preload="", name="lean")))
    full = json.loads(python(code.format(preload="import pandas", name="full")))
    assert lean[0] is False and full[0] is True
    assert lean[1:] == full[1:]


def test_pandas_loaded_later_is_still_recognised() -> None:
    out = python(
        "import pipeline.lean_imports as lean; lean.install(); "
        "import pipeline.heads, sklearn.utils.validation as v, sys; print('pandas' in sys.modules); "
        "import pandas as pd; from sklearn.preprocessing import StandardScaler; "
        "s = StandardScaler().set_output(transform='pandas').fit(pd.DataFrame({'a': [1.0, 2.0]})); "
        "print(type(s.transform(pd.DataFrame({'a': [3.0]}))).__name__)"
    )
    assert out.split() == ["False", "DataFrame"]
