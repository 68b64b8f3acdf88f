"""metrics, tables and plots: metrics checked by hand, the printed table, the comparison table and the figures."""

from __future__ import annotations

import json
from pathlib import Path

import heads_fixtures  # noqa: F401  (puts the project root on sys.path)
import numpy as np
import pytest

from pipeline.artifacts import CONFUSION_PNG, METRICS_JSON
from pipeline.metrics import classification_metrics, load_metrics, save_metrics
from pipeline.plots import compare_figure, confusion_figure, plot_compare, plot_confusion_matrix, write_confusion_png
from pipeline.tables import compare_markdown, metrics_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["apple", "banana", "cherry", "durian"]
# 6 test images; durian never occurs (support 0) and is never predicted.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


@pytest.fixture
def metrics() -> dict:
    return classification_metrics(Y_TRUE, Y_PRED, NAMES)


def test_classification_metrics_by_hand(metrics: dict) -> None:
    # confusion matrix (rows: true, columns: predicted)
    assert metrics["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # recall 2/3, 1/2, 1/1 over the classes that occur
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    pc = metrics["per_class"]
    assert pc["apple"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert pc["banana"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["cherry"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert pc["durian"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # macro F1 over the classes present in the test part (durian has no support)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics["n_test"] == 6 and metrics["class_names"] == NAMES
    assert list(pc) == NAMES
    json.dumps(metrics)  # plain Python types only


def test_perfect_and_all_wrong() -> None:
    y = np.array([0, 1, 1, 0])
    right = classification_metrics(y, y, ["a", "b"])
    assert right["accuracy"] == right["balanced_accuracy"] == right["macro_f1"] == 1.0
    wrong = classification_metrics(y, 1 - y, ["a", "b"])
    assert wrong["accuracy"] == wrong["balanced_accuracy"] == wrong["macro_f1"] == 0.0
    assert wrong["confusion_matrix"] == [[0, 2], [2, 0]]


def test_metrics_table(metrics: dict) -> None:
    table = metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    for name in NAMES:
        assert sum(line.split()[0] == name for line in lines) == 1, name
    apple = next(line for line in lines if line.startswith("apple"))
    assert apple.split() == ["apple", "1.000", "0.667", "0.800", "3"]
    b, f = metrics["balanced_accuracy_ci"], metrics["macro_f1_ci"]
    assert metrics["accuracy_ci"] == pytest.approx([0.3000, 0.9032], abs=5e-4)  # Wilson, 4 of 6
    assert lines[-1] == (
        f"test accuracy 0.6667 [0.300, 0.903]   balanced accuracy 0.7222 [{b[0]:.3f}, {b[1]:.3f}]   "
        f"macro F1 0.6556 [{f[0]:.3f}, {f[1]:.3f}]   (6 test images)   [95% intervals]"
    )


def test_metrics_table_long_class_names() -> None:
    names = ["a", "a_really_long_class_name_indeed"]
    table = metrics_table(classification_metrics(np.array([0, 1]), np.array([0, 1]), names))
    rows = table.splitlines()[1:3]
    assert rows[0].startswith("a ") and rows[1].startswith(names[1] + " ")
    # the columns line up whatever the name length
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == len(table.splitlines()[0])


def test_save_and_load_metrics(metrics: dict, tmp_path: Path) -> None:
    path = save_metrics({**metrics, "method": "x"}, tmp_path / "run")
    assert path == tmp_path / "run" / METRICS_JSON
    assert load_metrics(tmp_path / "run") == {**metrics, "method": "x"}
    assert not (tmp_path / "run" / CONFUSION_PNG).exists()  # figures are drawn only when asked for
    assert write_confusion_png(metrics, tmp_path / "run").read_bytes()[:8] == PNG_MAGIC


def test_confusion_figure_draws_every_count_and_names_the_classes(tmp_path: Path) -> None:
    fig = confusion_figure(np.array([[3, 0], [1, 7]]), ["apple", "banana"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["3", "0", "1", "7"]  # row by row: true class, then predicted
    assert [t.get_text() for t in ax.get_xticklabels()] == ["apple", "banana"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["apple", "banana"]
    colours = ax.images[0].get_array()
    assert colours[1, 1] == pytest.approx(7 / 8) and colours[0, 0] == 1.0  # recall per true class
    data = plot_confusion_matrix(np.array([[3, 0], [1, 7]]), ["a", "b"], tmp_path / "cm.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


ROWS = [
    {
        "method": "logreg head",
        "accuracy": 0.91234,
        "balanced_accuracy": 0.9,
        "macro_f1": 0.88,
        "train_seconds": 1.26,
        "inference_ms": 0.5,
        "size_mb": 0.01,
    },
    {"method": "svm head", "accuracy": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7, "train_seconds": 3.0},
    {
        "method": "fine-tuned",
        "accuracy": 0.95,
        "balanced_accuracy": 0.94,
        "macro_f1": 0.93,
        "train_seconds": 120.0,
        "inference_ms": None,
        "size_mb": 9.5,
    },
]


def test_compare_markdown() -> None:
    lines = compare_markdown(ROWS).splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert lines[0].startswith("| method | test acc [95% CI] |")
    assert set(lines[1].replace("|", "").split()) == {"---"}
    header_cells = lines[0].count("|")
    for row, line in zip(ROWS, lines[2:]):
        assert line.startswith(f"| {row['method']} |") and line.count("|") == header_cells
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["logreg head", "0.9123", "0.9000", "0.8800", "1.3", "0.50", "0.01", ""]
    svm = [c.strip() for c in lines[3].strip("|").split("|")]
    assert svm[-3:] == ["", "", ""]  # missing values are blank, not 'None'
    assert "None" not in "\n".join(lines)
    with_ci = compare_markdown([{**ROWS[0], "accuracy_ci": [0.85, 0.95], "paired_verdict": "a vs b: +1 image"}])
    cells = [c.strip() for c in with_ci.splitlines()[2].strip("|").split("|")]
    assert cells[1] == "0.9123 [0.850, 0.950]" and cells[-1] == "a vs b: +1 image"


def test_compare_figure_draws_each_metric_of_each_method(tmp_path: Path) -> None:
    ax = compare_figure(ROWS).axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    # three metrics (a bar series each), one bar per method
    assert heights == pytest.approx([r[k] for k in ("accuracy", "balanced_accuracy", "macro_f1") for r in ROWS])
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["method"] for r in ROWS]
    data = plot_compare(ROWS, tmp_path / "compare.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
