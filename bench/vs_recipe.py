"""The project vs the seed recipe (../shared/peers/seed_recipe.py) on one split, as whole processes.

    python bench/vs_recipe.py DATASET [--work DIR] [--runs 1] [--clf logreg] [--train [--recipe-runs N]]
                              [--recipe-seconds S --recipe-accuracy A [--recipe-cpu-seconds C]] [--profile]

DATASET is a folder, or a name under ../shared/datasets. A seeded 80/20 split is materialised as
WORK/split/{train,val} (../shared/peers/split_folders.py), then:
(a) the project, from raw images to an evaluated head: `cli.py extract` into a cold feature cache
    (the backbone's TFLite conversion is warm: converted once beforehand, timed and reported
    apart, like a weights download), then `cli.py fit-head`, whose test part is the val folder;
    With --train, (a) is one `cli.py train` process instead (the same cold cache and warm conversion;
    it also writes the audit's headline and the HTML report), and its per-stage seconds are read from
    its `took:` line; project and recipe runs alternate (--recipe-runs of them, default --runs).
(b) the recipe: frozen backbone + softmax, then fine-tuning, trained on train/ and scored on val/.
--recipe-seconds/--recipe-accuracy reuse a measured recipe figure instead of running it (minutes).
--profile also runs fit-head once under `python -X importtime` and lists its slowest imports.
--study also runs (c) the study from raw images on the same split (cold caches, conversions included):
    Lite0 and Lite2, layers top and auto+top (a hypercolumn), logreg and svm, --ensembles; its winner
    (chosen by CV) is scored on the val folder; --study-views K adds cached augmented views.
Every accuracy is printed with its 95% Wilson interval.
Prints the command lines, a table with phases (wall seconds, and CPU seconds of each process: on a
shared machine wall time depends on the load, CPU time much less), and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, SHARED, report  # noqa: E402 (sets the import path and environment)
from first_batch import ensure_conversion

PEERS = SHARED / "peers"
LITE0 = SHARED / "keras-models" / "efficientnet_lite0_imagenet.keras"
LITE2 = SHARED / "keras-models" / "efficientnet_lite2_imagenet.keras"
# extract's summary line: "... (3.1 s extracting, 3.2 s in all)"
EXTRACT_TIMES = re.compile(r"\(([\d.]+) s extracting, ([\d.]+) s in all\)")


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], what: str) -> tuple[float, float, str]:
    """Run one process from the project root; its wall and CPU seconds and its output (shown if it fails).

    CPU seconds are what a busy shared machine changes least: wall >= CPU / cores.
    """
    print("$ " + " ".join(command), flush=True)
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, children_cpu() - cpu, done.stdout + done.stderr


def project_once(args: argparse.Namespace, split: Path, work: Path) -> dict[str, Any]:
    """extract (cold feature cache, warm conversion) + fit-head, each timed as a whole process."""
    cache, head = work / "cache" / "features.h5", work / "head"
    for stale in [head, *cache.parent.glob(cache.name + "*")]:  # the cache, its shards and journal
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    extract_s, extract_cpu, out = run(
        [
            sys.executable,
            "cli.py",
            "extract",
            str(split),
            "--backbone",
            args.backbone,
            "--layer",
            args.layer,
            "--cache",
            str(cache),
            "--no-progress",
        ],
        "extract",
    )
    times = EXTRACT_TIMES.search(out)
    if "with tflite" not in out or "already cached 0," not in out:
        raise SystemExit("extract did not run cold on the TFLite runtime:\n" + out[-2000:])
    fit_s, fit_cpu, _ = run(
        [sys.executable, "cli.py", "fit-head", str(cache), "--clf", args.clf, "--out", str(head)], "fit-head"
    )
    metrics = json.loads((head / "metrics.json").read_text())
    if "val is the test part" not in str(metrics.get("split")):
        raise SystemExit(f"fit-head did not test on the val folder: split is {metrics.get('split')!r}")
    extracting, in_all = (float(times.group(1)), float(times.group(2))) if times else (float("nan"),) * 2
    return {
        "extract_s": extract_s,
        "fit_head_s": fit_s,
        "total_s": extract_s + fit_s,
        "extract_cpu_s": extract_cpu,
        "fit_head_cpu_s": fit_cpu,
        "total_cpu_s": extract_cpu + fit_cpu,
        "accuracy": metrics["accuracy"],
        "n_test": metrics["n_test"],
        "n_train": metrics.get("n_train"),
        "split": metrics["split"],
        "best_params": metrics.get("best_params"),
        "phases": {
            "extract: start-up and imports": extract_s - in_all,
            "extract: scan, hashing, runtime load, cache commit": in_all - extracting,
            "extract: decoding + inference (overlapped)": extracting,
            "fit-head: CV sweep + refit (fit_seconds)": metrics["fit_seconds"],
            "fit-head: start-up, imports, load, evaluate, save": fit_s - metrics["fit_seconds"],
        },
    }


def train_once(args: argparse.Namespace, split: Path, work: Path) -> dict[str, Any]:
    """`cli.py train` (cold feature cache, warm conversion) as one timed process; its stages from its `took:` line."""
    cache_dir, model = work / "cache", work / "model"
    for stale in [model, *cache_dir.glob("*.h5*")]:  # feature caches, their shards and journals; not the .tflite
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    seconds, cpu, out = run(
        [
            sys.executable,
            "cli.py",
            "train",
            str(split),
            "--backbone",
            args.backbone,
            "--layer",
            args.layer,
            "--clf",
            args.clf,
            "--cache-dir",
            str(cache_dir),
            "--out",
            str(model),
            "--no-progress",
        ],
        "train",
    )
    if "with tflite" not in out or "\n0 of " not in "\n" + out:
        raise SystemExit("train did not extract cold on the TFLite runtime:\n" + out[-2000:])
    took = next(line for line in out.splitlines() if line.startswith("took: "))
    stages = {
        name: float(value) for name, value in (part.rsplit(" ", 2)[:2] for part in took[len("took: ") :].split("; "))
    }
    metrics = json.loads((model / "metrics.json").read_text())
    if "val is the test part" not in str(metrics.get("split")):
        raise SystemExit(f"train did not test on the val folder: split is {metrics.get('split')!r}")
    phases = {"start-up and imports before extraction": seconds - sum(stages.values()), **stages}
    return {
        "total_s": seconds,
        "total_cpu_s": cpu,
        "accuracy": metrics["accuracy"],
        "n_test": metrics["n_test"],
        "n_train": metrics.get("n_train"),
        "split": metrics["split"],
        "best_params": metrics.get("best_params"),
        "phases": phases,
    }


def slow_imports(args: argparse.Namespace, cache: Path, work: Path, least_ms: float = 40.0) -> list[tuple[str, float]]:
    """fit-head under -X importtime: the top-level imports costing at least least_ms, slowest first."""
    command = [
        sys.executable,
        "-X",
        "importtime",
        "cli.py",
        "fit-head",
        str(cache),
        "--clf",
        args.clf,
        "--out",
        str(work / "head_profiled"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    print("$ " + " ".join(command))
    found = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        # "import time: self | cumulative | name": two spaces before a module imported at top level
        if (
            line.startswith("import time:")
            and len(parts) == 3
            and parts[2].startswith(" ")
            and not parts[2].startswith("   ")
            and parts[1].strip().isdigit()
        ):
            found.append((parts[2].strip(), int(parts[1]) / 1000))
    return sorted(((n, ms) for n, ms in found if ms >= least_ms), key=lambda item: -item[1])


def recipe(split: Path, backbone: str) -> dict[str, Any]:
    """The seed recipe as one process, trained on split/train and validated on split/val."""
    seconds, cpu, out = run(
        [
            sys.executable,
            str(PEERS / "seed_recipe.py"),
            str(split / "train"),
            "--val-dir",
            str(split / "val"),
            "--backbone",
            backbone,
        ],
        "the recipe",
    )
    line = next(l for l in reversed(out.splitlines()) if l.startswith("{"))
    result = json.loads(line)
    return {"seconds": seconds, "cpu_s": cpu, "accuracy": result["val_acc_finetuned"], "reported": result}


def study_once(split: Path, work: Path, views: int = 0) -> dict[str, Any]:
    """(c) `cli.py study` from raw images (cold caches and conversions) with hypercolumns and ensembles allowed;
    the CV-chosen winner's accuracy on the val folder."""
    for stale in (work / "study_cache", work / "study"):
        shutil.rmtree(stale, ignore_errors=True)
    command = [
        sys.executable,
        "cli.py",
        "study",
        str(split),
        "--backbones",
        f"{LITE0},{LITE2}",
        "--layers",
        "top,auto+top",
        "--heads",
        "logreg,svm",
        "--ensembles",
        "--cache-dir",
        str(work / "study_cache"),
        "--out",
        str(work / "study"),
    ]
    seconds, cpu, out = run(command + (["--views", str(views)] if views else []), "study")
    (work / "study" / "study.log").write_text(out)  # its own per-stage lines, for the record
    data = json.loads((work / "study" / "study.json").read_text())
    winner = data["winner"]
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "accuracy": winner["test_accuracy"],
        "ci": winner["test_ci"],
        "n_test": winner["n_test"],
        "cv_accuracy": winner["cv_accuracy"],
        "winner": f"{winner['backbone']} {winner['layer']} {winner['head']} ({winner['kind']})",
    }


def wilson_text(accuracy: float, n: int) -> str:
    """'[low, high]': the 95% Wilson interval of an accuracy on n images."""
    from pipeline.stats import wilson_interval

    low, high = wilson_interval(round(accuracy * n), n)
    return f"[{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--work", default=None, help="default: /tmp/cnncodes_vs_recipe/<dataset>")
    parser.add_argument("--backbone", default=str(LITE0))
    parser.add_argument("--layer", default="avg_pool")
    parser.add_argument("--clf", default="logreg")
    parser.add_argument("--runs", type=int, default=1, help="project runs (the median is reported)")
    parser.add_argument("--recipe-seconds", type=float, default=None)
    parser.add_argument("--recipe-accuracy", type=float, default=None)
    parser.add_argument("--recipe-cpu-seconds", type=float, default=None, help="optional, with --recipe-seconds")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--train", action="store_true", help="the project as one `cli.py train` process")
    parser.add_argument("--recipe-runs", type=int, default=None, help="with --train: recipe runs (default --runs)")
    parser.add_argument("--study", action="store_true", help="also (c): the study's winner, from raw images")
    parser.add_argument("--study-views", type=int, default=0, help="with --study: cache and train on K views")
    args = parser.parse_args()
    if (args.recipe_seconds is None) != (args.recipe_accuracy is None):
        parser.error("give both --recipe-seconds and --recipe-accuracy, or neither")
    data = Path(args.dataset) if Path(args.dataset).is_dir() else SHARED / "datasets" / args.dataset
    work = Path(args.work or f"/tmp/cnncodes_vs_recipe/{data.name}")
    split = work / "split"
    shutil.rmtree(split, ignore_errors=True)
    run([sys.executable, str(PEERS / "split_folders.py"), str(data), str(split)], "split_folders")
    conversion = ensure_conversion(
        argparse.Namespace(backbone=args.backbone, weights="imagenet", layer=args.layer, alpha=None), work / "cache"
    )
    peers = []
    if args.train:
        runs = []
        for k in range(max(args.runs, args.recipe_runs or 0)):  # alternate: both see the same load over time
            if k < args.runs:
                runs.append(train_once(args, split, work))
                print(
                    f"train run {k + 1}: {runs[-1]['total_s']:.1f} s, {runs[-1]['total_cpu_s']:.1f} CPU-s, "
                    f"accuracy {runs[-1]['accuracy']:.4f}",
                    flush=True,
                )
            if args.recipe_seconds is None and k < (args.recipe_runs or args.runs):
                peers.append(recipe(split, args.backbone))
                print(
                    f"recipe run {k + 1}: {peers[-1]['seconds']:.1f} s, {peers[-1]['cpu_s']:.1f} CPU-s, "
                    f"accuracy {peers[-1]['accuracy']:.4f}",
                    flush=True,
                )
    else:
        runs = [project_once(args, split, work) for _ in range(args.runs)]
    project = min(runs, key=lambda r: abs(r["total_s"] - statistics.median(x["total_s"] for x in runs)))
    studied = study_once(split, work, args.study_views) if args.study else None
    if peers:
        peer = min(peers, key=lambda r: abs(r["seconds"] - statistics.median(x["seconds"] for x in peers)))
    elif args.recipe_seconds is None:
        peer = recipe(split, args.backbone)
    else:
        peer = {
            "seconds": args.recipe_seconds,
            "cpu_s": args.recipe_cpu_seconds,
            "accuracy": args.recipe_accuracy,
            "reported": "given on the command line",
        }
    ratio = peer["seconds"] / project["total_s"]
    lines = [
        f"dataset {data.name}: {project['n_train']} train / {project['n_test']} test (val) images; "
        f"split {project['split']}",
        "one-time TFLite conversion: "
        + (f"{conversion:.1f} s" if conversion else "already cached in " + str(work / "cache")),
        f"{'':56s} {'seconds':>8s} {'accuracy':>9s} {'CPU s':>8s}",
        f"{('project: train ' if args.train else 'project: extract + fit-head ') + args.clf:56s} "
        f"{project['total_s']:8.1f} {project['accuracy']:9.4f} {project['total_cpu_s']:8.1f}",
    ]
    lines += [f"  {name:54s} {seconds:8.2f}" for name, seconds in project["phases"].items()]
    lines += [
        f"{'recipe: seed_recipe.py (frozen 10 epochs + fine-tune 7)':56s} {peer['seconds']:8.1f} "
        f"{peer['accuracy']:9.4f} " + (f"{peer['cpu_s']:8.1f}" if peer["cpu_s"] else f"{'':8s}"),
        f"speed ratio recipe / project: {ratio:.1f}x"
        + (" (project runs: " + ", ".join(f"{r['total_s']:.1f}" for r in runs) + " s)" if len(runs) > 1 else "")
        + (" (recipe runs: " + ", ".join(f"{r['seconds']:.1f}" for r in peers) + " s)" if len(peers) > 1 else ""),
    ]
    n_test = project["n_test"]
    lines.append(
        f"95% intervals on {n_test} test images: project {wilson_text(project['accuracy'], n_test)}, "
        f"recipe {wilson_text(peer['accuracy'], n_test)}"
    )
    if studied:
        lines.append(
            f"{'study winner (CV-chosen): ' + studied['winner']:56s} {studied['seconds']:8.1f} "
            f"{studied['accuracy']:9.4f} {studied['cpu_s']:8.1f}  95% CI [{studied['ci'][0]:.3f}, "
            f"{studied['ci'][1]:.3f}], CV {studied['cv_accuracy']:.4f}"
        )
    if peer["cpu_s"]:
        lines.append(
            f"CPU-seconds ratio recipe / project: {peer['cpu_s'] / project['total_cpu_s']:.1f}x "
            "(the figure a busy machine changes least)"
        )
    profile = slow_imports(args, work / "cache" / "features.h5", work) if args.profile else None
    if profile:
        lines.append(
            "fit-head's top-level imports over 40 ms (python -X importtime): "
            + ", ".join(f"{name} {ms:.0f} ms" for name, ms in profile)
        )
    report(
        "\n".join(lines),
        {
            "dataset": data.name,
            "conversion_s": conversion,
            "project": project,
            "recipe": peer,
            "study": studied,
            "ratio": round(ratio, 2),
            "runs": [r["total_s"] for r in runs],
            "recipe_runs": [r["seconds"] for r in peers],
            "slow_imports_ms": profile,
        },
    )


if __name__ == "__main__":
    main()
