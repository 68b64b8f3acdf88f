"""A study's report: the CS231n advice from its measurements, study.md, study.json, study.png.

Everything here reads a StudyResults (the study.json object); nothing is measured or fitted here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import STUDY_JSON, STUDY_MD, STUDY_PNG, write_json, write_text
from .checkout import MAX_ENTROPY
from .plots import new_figure, save_figure
from .study_results import StudyResults, StudyRow
from .tables import format_cell

LARGE_PER_CLASS = 1000  # images per class (median) from which CS231n's "large dataset" advice applies
# Mean top-1 probability of the backbone's own ImageNet classifier from which images count as ImageNet-like.
# Weak evidence: measured 0.36 (oxford_flowers12), 0.31 (usd_bills_kaggle), 0.26 (brain_mri_tumor) with
# EfficientNet-Lite0/2, whose label-smoothed softmax is never very confident; the layer comparison decides ties.
IMAGENET_LIKE_TOP1 = 0.3
CV_MARGIN = 0.01  # an earlier layer beats the top when its CV accuracy is at least this much higher
# The study table, as study.md and the HTML report show it: (row key, title, format)
STUDY_COLUMNS = [
    ("backbone", "backbone", "{}"),
    ("layer", "layer", "{}"),
    ("head", "head", "{}"),
    ("cv_accuracy", "CV acc", "{:.4f}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("test_ci", "95% CI", "[{0[0]:.3f}, {0[1]:.3f}]"),
    ("extract_images_per_s", "extract img/s", "{:.1f}"),
    ("fit_seconds", "fit s", "{:.1f}"),
    ("infer_ms_per_image", "infer ms/img", "{:.2f}"),
    ("model_mb", "model MB", "{:.2f}"),
]
RECOMMENDATIONS = {
    "small & similar": "train a linear classifier on the top layer's CNN codes; with this few images "
    "fine-tuning is likely to overfit.",
    "small & different": "train a linear classifier on an earlier layer's codes: the top layer is specific "
    "to ImageNet's classes, earlier layers hold more generic features.",
    "large & similar": "fine-tune the upper layers: with this many images per class it should pay off with "
    "little risk of overfitting.",
    "large & different": "fine-tune much of the network (`finetune --unfreeze all`), or train from scratch: "
    "there is enough data, and ImageNet's features transfer less.",
}


def slug(label: str) -> str:
    """A label as a file name: letters, digits, '.', '_' and '-' only."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in label)


def checkout_png(label: str) -> str:
    """The file name of a backbone's checkout grid."""
    return f"checkout-{slug(label)}.png"


def layer_evidence(rows: Sequence[StudyRow]) -> list[dict[str, Any]]:
    """Per backbone: the top's best CV accuracy over heads against the best earlier layer's."""
    evidence = []
    for backbone in dict.fromkeys(r.backbone for r in rows):
        best: dict[str, float] = {}
        for r in rows:
            if r.backbone == backbone and r.kind == "layer":
                best[r.layer] = max(best.get(r.layer, -1.0), r.cv_accuracy)
        earlier = {k: v for k, v in best.items() if k != "top"}
        if "top" in best and earlier:
            layer = max(earlier, key=earlier.get)
            evidence.append(
                {
                    "backbone": backbone,
                    "top_cv": best["top"],
                    "layer": layer,
                    "layer_cv": earlier[layer],
                    "delta": earlier[layer] - best["top"],
                }
            )
    return evidence


def advice(data: StudyResults) -> dict[str, Any]:
    """Place the dataset in CS231n's size x similarity quadrant from the measurements, and say what to do."""
    counts = list(data.images_per_class.values())
    median = float(np.median(counts))
    size = "large" if median >= LARGE_PER_CLASS else "small"
    text = [
        f"Size: {median:.0f} images per class (median; {min(counts)} to {max(counts)}): {size} "
        f"(large from {LARGE_PER_CLASS} per class)."
    ]
    votes: dict[str, str] = {}
    summaries = {label: c["summary"] for label, c in data.checkout.items()}
    likeness = None
    if summaries:
        top1 = float(np.mean([s["mean_top1"] for s in summaries.values()]))
        entropy = float(np.mean([s["mean_entropy"] for s in summaries.values()]))
        votes["likeness"] = "similar" if top1 >= IMAGENET_LIKE_TOP1 else "different"
        likeness = {"mean_top1": top1, "mean_entropy": entropy, "backbones": list(summaries)}
        text.append(
            f"ImageNet likeness ({', '.join(summaries)}): mean top-1 probability {top1:.2f}, mean entropy "
            f"{entropy:.2f} nats (a uniform guess: {MAX_ENTROPY:.2f}): "
            + ("ImageNet-like" if votes["likeness"] == "similar" else "unlike ImageNet")
            + f" (ImageNet-like from a mean top-1 of {IMAGENET_LIKE_TOP1})."
        )
    else:
        text.append("ImageNet likeness: not measured (no backbone with its ImageNet classifier; see Skipped).")
    evidence = layer_evidence(data.rows)
    for e in evidence:
        verdict = (
            "these images are unlike ImageNet; the earlier layer transfers better"
            if e["delta"] >= CV_MARGIN
            else "the top layer transfers better"
            if e["delta"] <= -CV_MARGIN
            else "no clear difference"
        )
        text.append(f"{e['layer']} CV {e['layer_cv']:.3f} vs top {e['top_cv']:.3f} ({e['backbone']}): {verdict}.")
    earlier_wins = sum(e["delta"] >= CV_MARGIN for e in evidence)
    top_wins = sum(e["delta"] <= -CV_MARGIN for e in evidence)
    if earlier_wins != top_wins:
        votes["layers"] = "different" if earlier_wins > top_wins else "similar"
    if not votes:
        similarity, reason = "similar", "no evidence either way: CS231n's default, ImageNet-like, is assumed"
    elif len(set(votes.values())) == 1:
        similarity, reason = next(iter(votes.values())), "the evidence agrees"
    else:  # the layer comparison measures what matters here directly
        similarity, reason = votes["layers"], "the evidence is mixed; the CV comparison of layers decides"
    quadrant = f"{size} & {similarity}"
    text.append(f"Quadrant: {quadrant} ({reason}). CS231n's advice: {RECOMMENDATIONS[quadrant]}")
    winner = data.winner
    if winner is not None:
        text.append(
            f"The winner, {winner.name}, has CV accuracy {winner.cv_accuracy:.4f} and test "
            f"accuracy {winner.test_accuracy:.4f} [{winner.test_ci[0]:.3f}, {winner.test_ci[1]:.3f}]."
        )
    tuned = data.finetune
    if tuned and winner is not None:
        row = tuned.row
        text.append(
            f"Fine-tuning {row.backbone} {row.layer}: test accuracy {row.test_accuracy:.4f} in "
            f"{row.fit_seconds:.0f} s against the winner's {winner.test_accuracy:.4f} in "
            f"{winner.fit_seconds:.1f} s; {tuned.verdict}: fine-tuning "
            + ("is worth it here." if tuned.worth_it else "is not worth it here.")
        )
    elif size == "large" and winner is not None:
        text.append("With this much data, try `--finetune` to measure what fine-tuning adds.")
    return {
        "quadrant": quadrant,
        "size": size,
        "similarity": similarity,
        "images_per_class_median": median,
        "likeness": likeness,
        "layer_evidence": evidence,
        "votes": votes,
        "text": text,
    }


def table_cells(row: StudyRow) -> list[str]:
    """A row's cells in STUDY_COLUMNS order."""
    values = row.to_json()
    return [format_cell(values, key, fmt) for key, _, fmt in STUDY_COLUMNS]


def table_markdown(rows: Sequence[StudyRow]) -> str:
    """The rows by CV accuracy (fine-tuning last), the winner starred."""
    ordered = sorted(rows, key=lambda r: (r.cv_accuracy is None, -(r.cv_accuracy or 0)))
    lines = [
        "| | " + " | ".join(title for _, title, _ in STUDY_COLUMNS) + " |",
        "| --- | " + " | ".join("---:" if "{:" in fmt else "---" for _, _, fmt in STUDY_COLUMNS) + " |",
    ]
    for r in ordered:
        mark = "**winner**" if r.head_dir == "winner" else ""
        lines.append(f"| {mark} | " + " | ".join(table_cells(r)) + " |")
    return "\n".join(lines)


def study_markdown(data: StudyResults) -> str:
    """study.md: the table, how the winner was chosen, the advice, the checkout, what was skipped."""
    counts = list(data.images_per_class.values())
    root = Path(data.dataset_root)
    out = [
        f"# Study of {root.name}",
        "",
        f"{data.n_images} images in {len(counts)} classes ({min(counts)} to {max(counts)} per class), "
        f"`{root}`. Split: fit-head's (test_size {data.test_size}, seed {data.seed}, duplicates grouped"
        + (
            f", near-duplicates too (whitened cosine >= {near['threshold']:g}, {near['pairs']} pairs)"
            if (near := data.near_duplicates).get("threshold")
            else ""
        )
        + "); "
        f"{data.cv}-fold grouped CV on the training part. {data.seconds:.0f} s in all.",
        "",
    ]
    if data.interrupted:
        out += ["**Interrupted**: the table holds what was finished.", ""]
    winner = data.winner
    if winner is not None:
        out += [
            f"**Winner: {winner.name}**, saved in `winner/`: a normal head folder that predict, "
            "export and compare take.",
            "",
        ]
    out += [
        "The winner was picked by CV accuracy on the training part alone, before the test part was looked "
        "at: the test column reports, it did not choose. CV ties go to the faster, then the smaller "
        "configuration. Every kind can win: a layer, a hypercolumn (A+B: two layers of one backbone side by "
        "side) or an ensemble (two backbones, each with its best layer); a winner on several caches is a "
        "head on several sources, which predict, serve and export take as they take any head.",
        "",
        table_markdown(data.rows),
        "",
        "Test accuracy carries a 95% Wilson interval. extract img/s: the extraction run (all layers of a "
        "backbone in one pass), or the probe's rate when the cache was already complete. infer ms/img: the "
        "backbone up to that layer (Keras, batch of decoded images) plus the head. model MB: float32 backbone "
        "parameters up to that layer plus the pickled head.",
        "",
    ]
    for label, info in data.backbones.items():
        for note in info["notes"]:
            out.append(f"- {label}: {note}")
    out += ["", "## What to do (CS231n's transfer-learning advice, measured)", ""]
    out += [f"- {line}" for line in data.advice["text"]]
    if data.finetune:
        test = data.finetune.paired_test
        out += [
            "",
            "## Fine-tuning",
            "",
            f"From `{data.finetune.init_head or 'a new softmax layer'}`, "
            f"{data.finetune.epochs_run} epochs; run folder `finetune/`. Paired test on the "
            f"{test['n']} common test images (exact McNemar): fine-tune right where the head is wrong on "
            f"{test['a_only']}, the reverse on {test['b_only']}, p = {test['p_value']:.3g}.",
        ]
    for label, check in data.checkout.items():
        out += [
            "",
            f"## ImageNet checkout: {label}",
            "",
            f"The backbone's own ImageNet classifier on {check['per_class']} images per class (seeded).",
            "",
            "| class | mean top-1 | mean entropy (nats) |",
            "| --- | ---: | ---: |",
        ]
        out += [f"| {name} | {v['mean_top1']:.3f} | {v['mean_entropy']:.2f} |" for name, v in check["likeness"].items()]
        out += ["", f"![ImageNet top-5 of sample images]({check['grid_png']})", ""]
        out += [
            f"- `{s['path']}` ({s['class']}): " + ", ".join(f"{label} {p:.2f}" for label, p in s["top5"])
            for s in check["samples"]
        ]
    if data.skipped:
        out += ["", "## Skipped", ""] + [f"- {s['config']}: {s['reason']}" for s in data.skipped]
    return "\n".join(out) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower time, higher accuracy), by time."""
    order = sorted(range(len(points)), key=lambda k: (points[k][0], -points[k][1]))
    front, best = [], -np.inf
    for k in order:
        if points[k][1] > best:
            front.append(k)
            best = points[k][1]
    return front


def study_figure(rows: Sequence[StudyRow]) -> Any:
    """Test accuracy against inference time, marker area by model size; the winner and the Pareto front marked."""
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    if not rows:
        ax.text(0.5, 0.5, "no configuration finished", ha="center", va="center")
        return fig
    x = np.array([r.infer_ms_per_image for r in rows])
    y = np.array([r.test_accuracy for r in rows])
    size = np.array([r.model_mb for r in rows])
    low = np.array([r.test_accuracy - r.test_ci[0] for r in rows])
    high = np.array([r.test_ci[1] - r.test_accuracy for r in rows])
    ax.errorbar(x, y, yerr=[low, high], fmt="none", ecolor="lightgray", zorder=1)
    colours = {b: f"C{k}" for k, b in enumerate(dict.fromkeys(r.backbone for r in rows))}
    markers = {"layer": "o", "hypercolumn": "s", "ensemble": "D", "finetune": "^"}
    for kind, marker in markers.items():
        idx = [k for k, r in enumerate(rows) if r.kind == kind]
        if idx:
            ax.scatter(
                x[idx],
                y[idx],
                s=20 + 400 * size[idx] / max(size.max(), 1e-9),
                marker=marker,
                alpha=0.7,
                c=[colours[rows[k].backbone] for k in idx],
                edgecolors="black",
                linewidths=0.5,
                zorder=2,
            )
    front = pareto_front(list(zip(x, y)))
    ax.step(x[front], y[front], where="post", color="gray", linestyle="--", label="Pareto front (test)", zorder=1)
    winner = [k for k, r in enumerate(rows) if r.head_dir == "winner"]
    if winner:
        ax.scatter(
            x[winner],
            y[winner],
            s=300,
            marker="*",
            color="gold",
            edgecolors="black",
            zorder=3,
            label=f"winner (by CV): {rows[winner[0]].name}",
        )
    for backbone, colour in colours.items():
        ax.scatter([], [], color=colour, label=backbone)
    ax.scatter([], [], marker="s", color="gray", label="hypercolumn")
    ax.set_xlabel("inference ms per image (backbone + head)")
    ax.set_ylabel("test accuracy (95% interval)")
    ax.set_title("Configurations: accuracy vs inference time (marker area: model size)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def write_outputs(folder: Path, data: StudyResults, figures: dict[str, Any]) -> str:
    """study.json, study.md, study.png and the checkout grids in folder; returns the markdown."""
    for label, figure in figures.items():
        save_figure(figure, folder / checkout_png(label), dpi=80)
    markdown = study_markdown(data)
    write_json(folder / STUDY_JSON, data.to_json())
    write_text(folder / STUDY_MD, markdown)
    save_figure(study_figure(data.rows), folder / STUDY_PNG)
    return markdown
