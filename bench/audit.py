"""Planted faults: does `audit` find mislabelled images and leaked near-copies? And what it finds on real data.

    python bench/audit.py [--data ../shared/datasets/oxford_flowers12] [--classes N] [--move 0.05]
                          [--copies 20] [--seed 0] [--runtime auto] [--work DIR] [--clean] [--brain]

1. DATA is copied to WORK/clean/{train,test}/CLASS with a seeded 20% test part per class, so the
   split is given by the folders (the audit judges leakage against it).
2. WORK/planted is the same (the same test part) with two faults: `--move` of the images (5%) moved to another
   class folder on their own side, and `--copies` test images re-encoded (resized to 90%, JPEG
   quality 70) into train/ of the same class: a leaked near-copy each.
3. Both are extracted with Lite0 avg_pool (`python cli.py extract ... --cache`) and audited with
   `python cli.py audit`. Scores: recall of the moved images among the top 2x-that-many label
   issues, precision and recall of all listed issues; recall and precision of the planted pairs
   among the near-duplicate pairs (precision also counting only pairs the clean copy lacks).
4. --clean: the audit's counts on the clean copy; --brain: on brain_mri_tumor as it is (its
   near-duplicate pairs beyond its byte-identical groups).
Prints the figures, the audit wall times and the command lines; the JSON object last.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, SHARED, report  # noqa: E402 (sets the import path and environment)
from PIL import Image

from pipeline.images import scan_dataset

LITE0 = SHARED / "keras-models/efficientnet_lite0_imagenet.keras"


@dataclass
class Planted:
    """What was planted: moved images (new relative path -> true class) and near-copy pairs (test, train)."""

    root: Path
    moved: dict[str, str] = field(default_factory=dict)
    pairs: list[tuple[str, str]] = field(default_factory=list)


def materialise(
    data: Path, dest: Path, classes: int | None, test_fraction: float, seed: int, move: float = 0.0, copies: int = 0
) -> Planted:
    """Copy data to dest/{train,test}/CLASS (seeded split per class), planting moved labels and near-copies."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dataset = scan_dataset(data)
    shutil.rmtree(dest, ignore_errors=True)  # a copy from an earlier run with other settings
    names = dataset.class_names[:classes] if classes else dataset.class_names
    files = [(f, dataset.class_names[f.label]) for f in dataset.files if dataset.class_names[f.label] in names]
    side = {}
    for name in names:
        members = [f.relpath for f, c in files if c == name]
        test = set(rng.permutation(members)[: round(test_fraction * len(members))].tolist())
        side.update({r: "test" if r in test else "train" for r in members})
    order = rng.permutation(len(files))
    moved_rows = set(order[: round(move * len(files))].tolist())
    copy_rows = [k for k in order[len(moved_rows) :] if side[files[k][0].relpath] == "test"][:copies]
    planted = Planted(dest)
    for k, (f, name) in enumerate(files):
        given = name
        if k in moved_rows:
            given = str(rng.choice([c for c in names if c != name]))
        relpath = f"{side[f.relpath]}/{given}/{f.path.name}"
        (dest / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.path, dest / relpath)
        if k in moved_rows:
            planted.moved[relpath] = name
        if k in copy_rows:
            copy = f"train/{name}/copy_{f.path.stem}.jpg"
            with Image.open(f.path) as img:
                img = img.convert("RGB")
                img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.BILINEAR).save(
                    dest / copy, "JPEG", quality=70
                )
            planted.pairs.append((relpath, copy))
    return planted


def run(args: list[str]) -> tuple[float, str]:
    """Run `python cli.py ARGS`; the wall seconds and stdout (stderr passed through on failure)."""
    command = [sys.executable, str(ROOT / "cli.py"), *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stdout


def extract_and_audit(data: Path, work: Path, name: str, runtime: str, seed: int) -> dict:
    """Extract data with Lite0 avg_pool, audit it; the audit.json, the CSV rows, the commands and seconds."""
    cache, out = work / f"{name}.h5", work / f"audit-{name}"
    extract_args = [
        "extract",
        str(data),
        "--backbone",
        str(LITE0),
        "--layer",
        "avg_pool",
        "--cache",
        str(cache),
        "--runtime",
        runtime,
        "--no-progress",
    ]
    extract_seconds, _ = run(extract_args)
    audit_args = ["audit", str(cache), "--out", str(out), "--seed", str(seed)]
    audit_seconds, stdout = run(audit_args)
    result = json.loads((out / "audit.json").read_text())

    def rows(file: str) -> list[dict]:
        with open(out / file, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    return {
        "audit": result,
        "label_issues": rows("label_issues.csv"),
        "pairs": rows("near_duplicates.csv"),
        "extract_seconds": extract_seconds,
        "audit_seconds": audit_seconds,
        "stdout": stdout,
        "commands": ["python cli.py " + " ".join(extract_args), "python cli.py " + " ".join(audit_args)],
    }


def score(planted: Planted, found: dict, clean: dict | None) -> dict:
    """Precision and recall of the planted label faults and near-copies."""
    moved = set(planted.moved)
    issues = [r["path"] for r in found["label_issues"]]
    top = issues[: 2 * len(moved)]
    pairs = {frozenset((r["path_a"], r["path_b"])) for r in found["pairs"]}
    wanted = {frozenset(p) for p in planted.pairs}
    # the clean copy's pairs, in the planted copy's paths (a moved image is in another class folder there)
    planted_path = {f"{p.split('/')[0]}/{true}/{Path(p).name}": p for p, true in planted.moved.items()}
    before = {
        frozenset(planted_path.get(p, p) for p in (r["path_a"], r["path_b"])) for r in (clean or {}).get("pairs", [])
    }
    new_pairs = pairs - before
    return {
        "moved": len(moved),
        "listed_issues": len(issues),
        "estimated_mislabelled": found["audit"]["label_issues"]["estimated_mislabelled"],
        "moved_in_top_2x": len(moved & set(top)),
        "recall_top_2x": len(moved & set(top)) / max(len(moved), 1),
        "precision_top_2x": len(moved & set(top)) / max(len(top), 1),
        "issue_recall": len(moved & set(issues)) / max(len(moved), 1),
        "issue_precision": len(moved & set(issues)) / max(len(issues), 1),
        "planted_pairs": len(wanted),
        "planted_found": len(wanted & pairs),
        "pair_recall": len(wanted & pairs) / max(len(wanted), 1),
        "pair_precision": len(wanted & pairs) / max(len(pairs), 1),
        "pair_precision_new": len(wanted & new_pairs) / max(len(new_pairs), 1) if clean else None,
        "planted_cross_split": sum(
            1 for r in found["pairs"] if frozenset((r["path_a"], r["path_b"])) in wanted and r["kind"] == "cross_split"
        ),
    }


def counts(found: dict) -> dict:
    """The audit's headline counts."""
    a = found["audit"]
    return {
        "images": a["n_images"],
        "byte_identical_groups": a["duplicates"]["byte_identical_groups"],
        "label_issues": a["label_issues"]["count"],
        "estimated_mislabelled": a["label_issues"]["estimated_mislabelled"],
        "near_duplicates": a["near_duplicates"]["count"],
        "by_kind": a["near_duplicates"]["by_kind"],
        "outliers": a["outliers"]["count"],
        "learning_curve": a["learning_curve"]["answer"],
        "audit_seconds": round(found["audit_seconds"], 1),
        "audit_inner_seconds": a["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "datasets/oxford_flowers12")
    parser.add_argument("--classes", type=int, default=None, help="Use the first N classes only.")
    parser.add_argument("--move", type=float, default=0.05)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="Keep the copies, caches and audits here.")
    parser.add_argument("--clean", action="store_true", help="Also audit the clean copy (and use it for precision).")
    parser.add_argument("--brain", action="store_true", help="Also audit brain_mri_tumor as it is.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    lines = []
    clean = None
    if args.clean:
        materialise(args.data, work / "clean", args.classes, 0.2, args.seed)
        clean = extract_and_audit(work / "clean", work, "clean", args.runtime, args.seed)
        result["clean"] = counts(clean)
        lines += ["clean copy:", clean["stdout"].rstrip(), *clean["commands"]]
    planted = materialise(args.data, work / "planted", args.classes, 0.2, args.seed, args.move, args.copies)
    found = extract_and_audit(work / "planted", work, "planted", args.runtime, args.seed)
    result["planted"] = {**counts(found), **score(planted, found, clean)}
    s = result["planted"]
    lines += [
        "planted copy:",
        found["stdout"].rstrip(),
        *found["commands"],
        f"label issues: {s['moved_in_top_2x']} of {s['moved']} moved images in the top {2 * s['moved']} "
        f"(recall {s['recall_top_2x']:.2f}, precision {s['precision_top_2x']:.2f}); all {s['listed_issues']} "
        f"listed: recall {s['issue_recall']:.2f}, precision {s['issue_precision']:.2f}; cleanlab estimates "
        f"{s['estimated_mislabelled']} mislabelled",
        f"near-copies: {s['planted_found']} of {s['planted_pairs']} planted pairs found (recall "
        f"{s['pair_recall']:.2f}, {s['planted_cross_split']} as cross_split); precision {s['pair_precision']:.2f}"
        + (f", {s['pair_precision_new']:.2f} counting only pairs the clean copy lacks" if clean else ""),
        f"audit wall time (python cli.py audit, imports included): {s['audit_seconds']:.1f} s",
    ]
    if args.brain:
        brain = extract_and_audit(SHARED / "datasets/brain_mri_tumor", work, "brain_mri_tumor", args.runtime, args.seed)
        result["brain_mri_tumor"] = counts(brain)
        lines += ["brain_mri_tumor:", brain["stdout"].rstrip(), *brain["commands"]]
    result["work"] = str(work)
    report("\n".join(lines), result)


if __name__ == "__main__":
    main()
