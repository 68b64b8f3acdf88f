"""The lean install: `pip install -e '.[lite]'` (no TensorFlow) runs extract and predict on real images
once the backbone's TFLite conversion is cached, and runs an exported .tflite model.

    python bench/lean.py [DATASET] [--work DIR] [--venv DIR]

Steps (each command printed):
1. With the full environment (this interpreter, TensorFlow installed), a seeded 80/20 split of DATASET
   (default oxford_flowers12), `extract` of its train/ folder with Lite0 into WORK/cache (converting
   the backbone once, beside the cache), `fit-head` logreg, and `export --format tflite`.
2. A fresh venv (default WORK/venv, kept for re-runs) with `pip install -e 'ROOT[lite]'` from PyPI.
3. In it: `extract` of the val/ folder (images the head never saw) into a new cache beside the
   cached conversion, `predict --head` and `predict --model FILE.tflite` on val/, each checked for
   accuracy against the folder labels; `import tensorflow` must fail there.
4. The installed size (du of site-packages) of the lean venv beside the full one (.venv).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED, report  # noqa: E402 (sets the import path and environment)

LITE0 = SHARED / "keras-models" / "efficientnet_lite0_imagenet.keras"


def sh(command: list[str], what: str, check: bool = True) -> tuple[float, str]:
    """Run a command from the project root, printing it; its seconds and output."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and done.returncode:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def site_packages(venv: Path) -> Path:
    """The site-packages folder of a venv."""
    return next((venv / "lib").glob("python3*/site-packages"))


def du_mb(folder: Path) -> float:
    """Disk usage of a folder in MB (du -sk)."""
    return (
        int(subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True, check=True).stdout.split()[0])
        / 1024
    )


def accuracy(predictions_csv: Path) -> tuple[float, int]:
    """Top-1 accuracy of a predict CSV whose paths start with the true class folder."""
    with open(predictions_csv, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["error"]]
    right = sum(Path(r["path"]).parts[-2] == r["class_1"] for r in rows)
    return right / len(rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="oxford_flowers12")
    parser.add_argument("--work", default="/tmp/cnncodes_lean")
    parser.add_argument("--venv", default=None, help="default: WORK/venv (created when absent)")
    args = parser.parse_args()
    data = Path(args.dataset) if Path(args.dataset).is_dir() else SHARED / "datasets" / args.dataset
    work = Path(args.work).resolve()
    venv = Path(args.venv or work / "venv").resolve()
    split, cache_dir, head, model = work / "split", work / "cache", work / "head", work / "model.tflite"
    full = [sys.executable, "cli.py"]

    # 1. the full environment prepares the head, the cached conversion and the exported model
    if not split.is_dir():
        sh([sys.executable, str(SHARED / "peers" / "split_folders.py"), str(data), str(split)], "split")
    if not (head / "head.json").is_file():
        sh(
            full
            + [
                "extract",
                str(split / "train"),
                "--backbone",
                str(LITE0),
                "--layer",
                "avg_pool",
                "--cache",
                str(cache_dir / "train.h5"),
                "--no-progress",
            ],
            "extract (full)",
        )
        sh(full + ["fit-head", str(cache_dir / "train.h5"), "--clf", "logreg", "--out", str(head)], "fit-head (full)")
    if not model.is_file():
        sh(full + ["export", str(head), "--format", "tflite", "--out", str(model), "--verify", "0"], "export (full)")

    # 2. the lean venv
    python = venv / "bin" / "python"
    install_s = None
    if not python.is_file():
        sh([sys.executable, "-m", "venv", str(venv)], "venv")
        install_s, _ = sh([str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[lite]"], "pip install")
    _, freeze = sh([str(python), "-m", "pip", "freeze"], "pip freeze")
    packages = sorted(
        line.split("==")[0].lower() for line in freeze.splitlines() if "==" in line and not line.startswith("#")
    )
    _, tf_import = sh([str(python), "-c", "import tensorflow"], "import tensorflow", check=False)

    # 3. extract and predict on val/ (images the head never saw) with the lean venv's console command
    cnncodes = str(venv / "bin" / "cnncodes")
    for stale in cache_dir.glob("val.h5*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    extract_s, extract_out = sh(
        [
            cnncodes,
            "extract",
            str(split / "val"),
            "--backbone",
            str(LITE0),
            "--layer",
            "avg_pool",
            "--cache",
            str(cache_dir / "val.h5"),
            "--no-progress",
        ],
        "extract (lean)",
    )
    head_s, _ = sh(
        [cnncodes, "predict", str(split / "val"), "--head", str(head), "--out", str(work / "predict_head.csv")],
        "predict --head (lean)",
    )
    model_s, _ = sh(
        [cnncodes, "predict", str(split / "val"), "--model", str(model), "--out", str(work / "predict_model.csv")],
        "predict --model (lean)",
    )
    head_acc, n = accuracy(work / "predict_head.csv")
    model_acc, _ = accuracy(work / "predict_model.csv")

    # 4. sizes
    lean_mb, full_mb = du_mb(site_packages(venv)), du_mb(site_packages(ROOT / ".venv"))
    absent = "tensorflow" not in packages and "ModuleNotFoundError" in tf_import
    lines = [
        f"lean venv {venv}: " + (f"installed in {install_s:.0f} s" if install_s else "reused"),
        f"  tensorflow absent: {absent} (`import tensorflow`: {tf_import.strip().splitlines()[-1]})",
        f"  ai-edge-litert installed: {'ai-edge-litert' in packages}; {len(packages)} packages",
        f"  extract of {n} new images with the cached conversion: {extract_s:.1f} s "
        f"({'tflite' if 'with tflite' in extract_out else 'NOT tflite'})",
        f"  predict --head on {n} val images: {head_s:.1f} s, accuracy {head_acc:.4f}",
        f"  predict --model {model.name} on {n} val images: {model_s:.1f} s, accuracy {model_acc:.4f}",
        f"site-packages: lean {lean_mb:.0f} MB vs full (.venv) {full_mb:.0f} MB ({lean_mb / full_mb:.0%})",
    ]
    report(
        "\n".join(lines),
        {
            "dataset": data.name,
            "venv": str(venv),
            "tensorflow_absent": absent,
            "packages": packages,
            "lean_site_packages_mb": round(lean_mb),
            "full_site_packages_mb": round(full_mb),
            "images": n,
            "extract_s": round(extract_s, 1),
            "predict_head_s": round(head_s, 1),
            "predict_model_s": round(model_s, 1),
            "head_accuracy": round(head_acc, 4),
            "model_accuracy": round(model_acc, 4),
            "install_s": install_s,
        },
    )


if __name__ == "__main__":
    main()
