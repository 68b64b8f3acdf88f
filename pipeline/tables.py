"""Text tables of metrics, as the commands print them and compare writes them (markdown)."""

from __future__ import annotations

from typing import Any, Sequence


def ci_text(metrics: dict[str, Any], key: str) -> str:
    """'0.9845 [0.955, 0.995]': a metric with its 95% interval when it has one."""
    interval = metrics.get(f"{key}_ci")
    value = f"{metrics[key]:.4f}"
    return f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else value


def metrics_table(metrics: dict[str, Any]) -> str:
    """The per-class table and the summary lines, as printed by fit-head and finetune."""
    width = max(12, *(len(n) for n in metrics["per_class"]))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f} {row['support']:8d}"
        )
    lines.append(
        f"test accuracy {ci_text(metrics, 'accuracy')}   balanced accuracy "
        f"{ci_text(metrics, 'balanced_accuracy')}   macro F1 {ci_text(metrics, 'macro_f1')}   "
        f"({metrics['n_test']} test images)   [95% intervals]"
    )
    return "\n".join(lines)


def format_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """A table cell: the row's value in its format, blank when it has none (and as it is when the format
    does not fit it, as in a study.json written by another version)."""
    value = row.get(key)
    try:
        return "" if value is None else fmt.format(value)
    except (ValueError, TypeError, IndexError, KeyError):
        return str(value)


# (title, cell) per column of the comparison table; metrics carry their 95% interval when known
COMPARE_COLUMNS: list[tuple[str, Any]] = [
    ("method", lambda r: r["method"]),
    ("test acc [95% CI]", lambda r: ci_text(r, "accuracy")),
    ("balanced acc [95% CI]", lambda r: ci_text(r, "balanced_accuracy")),
    ("macro F1 [95% CI]", lambda r: ci_text(r, "macro_f1")),
    ("train s", lambda r: format_cell(r, "train_seconds", "{:.1f}")),
    ("infer ms/img", lambda r: format_cell(r, "inference_ms", "{:.2f}")),
    ("size MB", lambda r: format_cell(r, "size_mb", "{:.2f}")),
    ("paired test vs the best (McNemar)", lambda r: r.get("paired_verdict") or ""),
]


def compare_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown row per method."""
    head = "| " + " | ".join(title for title, _ in COMPARE_COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in COMPARE_COLUMNS) + "|"
    body = ["| " + " | ".join(cell(row) for _, cell in COMPARE_COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def unknown_lines(metrics: dict[str, Any]) -> list[str]:
    """Calibration and the unknown detector in words, as fit-head prints them (empty for older metrics)."""
    lines = []
    if "ece" in metrics:
        lines.append(
            f"calibration: temperature {metrics['temperature']:.3f}; ECE (15 bins) on the test part "
            f"{metrics['ece_uncalibrated']:.4f} -> {metrics['ece']:.4f}"
        )
    unknown = metrics.get("unknown")
    if unknown:
        lines.append(
            f"unknown detector ({unknown['method']}): threshold {unknown['threshold']:.3f} accepts "
            f"{unknown['accept']:.0%} of {unknown.get('fitted_on', 'known training images (out of fold)')}; "
            f"on the test part "
            f"{unknown['n_unknown']} of {unknown['n_unknown'] + unknown['n_accepted']} called unknown "
            f"({unknown['test_unknown_rate']:.1%}), accuracy on the accepted {unknown['accepted_accuracy']:.4f}"
        )
    return lines
