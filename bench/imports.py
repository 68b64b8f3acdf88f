"""Import time of each command, from `python -X importtime`: the total and the heavy libraries.

    python bench/imports.py DATA_DIR [--backbone PATH_OR_NAME] [--layer NAME] [--work DIR] [--commands ...]

Runs each command once as a fresh process under `-X importtime` (after one untimed run that warms
the file cache; the TFLite conversion is kept in WORK/cache): extract (cold feature cache), fit-head, predict (one image
of the cache: no backbone), train. Prints, per command, the seconds spent importing (the sum over
the top-level imports, lazy ones included), the wall seconds of the process, and the cumulative
import time of each heavy library it loaded (absent: not imported); as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED, report  # noqa: E402 (sets the import path and environment)

HEAVY = (
    "tensorflow",
    "keras",
    "ai_edge_litert",
    "sklearn",
    "scipy",
    "scipy.stats",
    "pandas",
    "matplotlib",
    "skops.io",
    "cleanlab",
    "jinja2",
    "h5py",
    "PIL.Image",
)


def parse_importtime(stderr: str) -> tuple[float, dict[str, float]]:
    """(seconds importing, {module: cumulative seconds}) from -X importtime lines."""
    total, modules = 0.0, {}
    for line in stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        module = name.strip()
        cumulative = int(parts[1]) / 1e6
        if len(name) - len(name.lstrip()) == 1:  # a top-level import: one space after the bar
            total += cumulative
        modules.setdefault(module, cumulative)  # the first time: where it was really imported
    return total, modules


def commands(args: argparse.Namespace, work: Path) -> dict[str, list[str]]:
    """The command lines measured, by command name."""
    cache_dir, head = work / "cache", work / "head"
    backbone = ["--backbone", args.backbone] + (["--layer", args.layer] if args.layer else [])
    cache = cache_dir / "features.h5"
    image = next(p for p in sorted(Path(args.data_dir).rglob("*")) if p.is_file() and not p.name.startswith("."))
    return {
        "extract": ["extract", args.data_dir, *backbone, "--cache", str(cache), "--no-progress"],
        "fit-head": ["fit-head", str(cache), "--out", str(head)],
        "predict": ["predict", str(image), "--head", str(head)],
        "train": ["train", args.data_dir, *backbone, "--cache-dir", str(cache_dir), "--out", str(work / "model")],
    }


def run(argv: list[str], work: Path, cold_cache: bool) -> tuple[float, str]:
    """One process under -X importtime; its wall seconds and stderr."""
    if cold_cache:
        for stale in (work / "cache").glob("*.h5*"):  # feature caches, their shards and journals
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    command = [sys.executable, "-X", "importtime", "cli.py", *argv]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--backbone", default=str(SHARED / "keras-models/efficientnet_lite0_imagenet.keras"))
    parser.add_argument("--layer", default="avg_pool")
    parser.add_argument("--work", default="/tmp/cnncodes_imports")
    parser.add_argument("--commands", nargs="+", default=["extract", "fit-head", "predict", "train"])
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = commands(args, work)
    results = {}
    for name in args.commands:
        run(lines[name], work, name in ("extract", "train"))  # warm-up: file cache, conversion, head for predict
        wall, stderr = run(lines[name], work, name in ("extract", "train"))
        total, modules = parse_importtime(stderr)
        results[name] = {
            "command": "python -X importtime cli.py " + " ".join(lines[name]),
            "import_s": round(total, 3),
            "wall_s": round(wall, 2),
            "heavy_s": {m: round(modules[m], 3) for m in HEAVY if m in modules},
        }
    text = []
    for name, r in results.items():
        text.append(
            f"{name:9s} imports {r['import_s']:6.2f} s of {r['wall_s']:6.2f} s wall; "
            + ", ".join(f"{m} {s:.2f}" for m, s in r["heavy_s"].items())
        )
        text.append(f"  $ {r['command']}")
    report("\n".join(text), results)


if __name__ == "__main__":
    main()
