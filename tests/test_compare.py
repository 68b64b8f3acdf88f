"""pipeline/compare.py: one row per head or fine-tuning run, written as compare.md / .json / .png."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import World, quiet

from pipeline.artifacts import HEAD_MODEL
from pipeline.compare import compare
from pipeline.errors import UserError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed"),
]

NUMBERS = ("accuracy", "balanced_accuracy", "macro_f1", "train_seconds", "inference_ms", "size_mb")


@pytest.fixture(scope="module")
def compared(cnn_world: World, finetune_run, tmp_path_factory: pytest.TempPathFactory):
    """The small CNN's logreg head against its fine-tuning run."""
    result, _ = finetune_run
    out = tmp_path_factory.mktemp("compare") / "cmp"
    messages: list[str] = []
    rows, folder = compare([cnn_world.heads["logreg"], result.folder], out=out, log=quiet(messages))
    return rows, folder, result, messages


def test_compare_writes_three_files_one_row_per_input(cnn_world: World, compared) -> None:
    world = cnn_world
    rows, folder, result, messages = compared
    assert folder.is_dir()
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    assert len(rows) == 2 and len(messages) == 2
    assert [Path(r["path"]) for r in rows] == [world.heads["logreg"], result.folder]
    assert rows[0]["method"] == "logreg head" and rows[1]["method"].startswith("fine-tune")
    for row in rows:
        for key in NUMBERS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert 0 <= row["accuracy"] <= 1 and row["inference_ms"] > 0 and row["size_mb"] > 0
    # the numbers are the folders' own metrics
    head_metrics = json.loads((world.heads["logreg"] / "metrics.json").read_text())
    run_metrics = json.loads((result.folder / "metrics.json").read_text())
    assert rows[0]["accuracy"] == head_metrics["accuracy"] and rows[1]["accuracy"] == run_metrics["accuracy"]
    assert rows[0]["n_test"] == rows[1]["n_test"] == head_metrics["n_test"]
    # the head's size: the backbone's float32 weights plus the joblib file, so larger than the joblib alone
    assert rows[0]["size_mb"] > (world.heads["logreg"] / HEAD_MODEL).stat().st_size / 1e6
    assert json.loads((folder / "compare.json").read_text()) == rows
    md = (folder / "compare.md").read_text().strip().splitlines()
    assert md[0].startswith("| method | test acc") and len(md) == 4
    assert md[2].startswith("| logreg head | ") and md[3].startswith("| fine-tune")
    # the paired test: both methods on the same test images, the best one named
    best = int(np.argmax([r["accuracy"] for r in rows]))
    assert rows[best]["paired_verdict"] == "(the best)"
    other = rows[1 - best]
    assert other["paired_test"]["n"] == head_metrics["n_test"] and " vs " in other["paired_verdict"]
    assert "p = " in other["paired_verdict"] and "evidence" in other["paired_verdict"]
    assert other["paired_verdict"] in (folder / "compare.md").read_text()


def test_compare_refuses_a_folder_that_is_neither(world: World, tmp_path: Path) -> None:
    """A folder with metrics.json but neither head files nor model.keras: refused before the head listed first
    is measured (no backbone built for a typo)."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(world.heads["logreg"] / "metrics.json", other / "metrics.json")
    messages: list[str] = []
    with pytest.raises(UserError, match=f"^{other} is neither a head folder"):
        compare([world.heads["logreg"], other], out=tmp_path / "cmp", log=quiet(messages))
    assert messages == [] and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_compare_refuses_a_folder_without_metrics(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "nothing"
    if kind == "empty":
        folder.mkdir()
    with pytest.raises(UserError, match="neither a head folder"):
        compare([folder], out=tmp_path / "cmp", log=quiet())
