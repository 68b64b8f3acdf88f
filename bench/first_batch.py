"""Time from process start to the first batch out of the runtime, for `extract` with a cached conversion.

    python bench/first_batch.py DATA_DIR --backbone PATH_OR_NAME [--layer NAME] [--runs 3] [--work DIR]

Converts the backbone once into WORK/cache (timed, printed, not counted), then runs
`python cli.py extract DATA_DIR --cache WORK/cache/features.h5 --runtime tflite` as a fresh process
RUNS times, each with a cold feature cache. The process is timed from just before it is started;
hooks on pipeline.runtime (installed before the CLI imports anything) mark when the runtime is asked
for, when it is ready and when the first batch comes out. Prints a per-phase table and, as the last
line, one JSON object.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, backbone_parser, report  # noqa: E402 (sets the import path and environment)

# Runs inside the measured process (__ROOT__ and __ARGS__ filled in): marks are wall-clock times written
# to stderr as "mark NAME T".
DRIVER = """
import sys, time
def mark(name):
    print(f"mark {name} {time.time():.6f}", file=sys.stderr, flush=True)
sys.path.insert(0, __ROOT__)
import pipeline.runtime as runtime
make, call = runtime.make_runtime, runtime.TFLiteRuntime.__call__
def make_runtime(*args, **kwargs):
    mark("runtime_asked")
    engine = make(*args, **kwargs)
    mark("runtime_ready")
    return engine
def first_call(self, batch):
    out = call(self, batch)
    if not getattr(first_call, "done", False):
        first_call.done = True
        mark("first_batch")
    return out
runtime.make_runtime, runtime.TFLiteRuntime.__call__ = make_runtime, first_call
mark("hooks_in")
from cli import app
sys.argv = ["cli.py"] + __ARGS__
app()
"""
PHASES = (
    ("start", "hooks_in", "interpreter start + runtime module import"),
    ("hooks_in", "runtime_asked", "CLI + pipeline imports, scan, hashing, cache set-up"),
    ("runtime_asked", "runtime_ready", "LiteRT interpreter: load the cached model"),
    ("runtime_ready", "first_batch", "decode the first batch + first inference"),
    ("start", "first_batch", "time to first batch"),
    ("start", "end", "whole extract process"),
)


def extract_args(args, cache: Path) -> list[str]:
    """The command-line options of extract for this benchmark."""
    options = [
        "extract",
        args.data_dir,
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--cache",
        str(cache),
        "--runtime",
        "tflite",
        "--batch-size",
        str(args.batch_size),
        "--no-progress",
    ]
    return (
        options + (["--layer", args.layer] if args.layer else []) + (["--alpha", str(args.alpha)] if args.alpha else [])
    )


def ensure_conversion(args, folder: Path) -> float | None:
    """Convert the backbone into folder once (in its own process); its seconds, or None if it was cached."""
    code = (
        "import sys; sys.path.insert(0, {root!r}); from pipeline.backbones import BackboneConfig; "
        "from pipeline.runtime import make_runtime, tflite_path; "
        "c = BackboneConfig({b!r}, {w!r}, {l!r}, alpha={a!r}).resolved(); "
        "print(tflite_path(c, {f!r}).is_file()); make_runtime(c, 'tflite', tflite_dir={f!r})"
    ).format(root=str(ROOT), b=args.backbone, w=args.weights, l=args.layer, a=args.alpha, f=str(folder))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return None if done.stdout.startswith("True") else time.perf_counter() - start


def one_run(args, cache: Path) -> dict[str, float]:
    """One extract process with a cold feature cache: seconds from its start to each mark."""
    for stale in cache.parent.glob(cache.name + "*"):  # the cache, its shards and journal
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    code = DRIVER.replace("__ROOT__", repr(str(ROOT))).replace("__ARGS__", repr(extract_args(args, cache)))
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    end = time.time()
    if done.returncode:
        raise SystemExit(f"extract failed ({done.returncode}):\n{done.stderr[-3000:]}")
    marks = {"start": start, "end": end}
    marks.update(
        {line.split()[1]: float(line.split()[2]) for line in done.stderr.splitlines() if line.startswith("mark ")}
    )
    return {label: marks[b] - marks[a] for a, b, label in PHASES}


def main() -> None:
    parser = backbone_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/cnncodes_first_batch")
    args = parser.parse_args()
    folder = Path(args.work) / "cache"
    conversion = ensure_conversion(args, folder)
    print("one-time conversion: " + (f"{conversion:.1f} s" if conversion else "already cached in " + str(folder)))
    print("measured command: python cli.py " + " ".join(extract_args(args, folder / "features.h5")))
    runs = [one_run(args, folder / "features.h5") for _ in range(args.runs)]
    medians = {label: statistics.median(r[label] for r in runs) for _, _, label in PHASES}
    lines = [f"{'phase':55s} {'median s':>9s}   runs"]
    lines += [
        f"{label:55s} {medians[label]:9.3f}   " + " ".join(f"{r[label]:.3f}" for r in runs) for _, _, label in PHASES
    ]
    report(
        "\n".join(lines),
        {
            "data_dir": args.data_dir,
            "backbone": args.backbone,
            "layer": args.layer,
            "runs": args.runs,
            "conversion_s": conversion,
            "first_batch_s": round(medians["time to first batch"], 3),
            "phases_median_s": {k: round(v, 3) for k, v in medians.items()},
            "cpu_count": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
