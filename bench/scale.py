"""Extraction at scale: images/s, peak memory, cache size, and what an incremental run costs.

For each size N (default 1,000, 5,000 and 20,000), a dataset of N real images is built once under
--workdir: re-encoded, cropped and resized variants of ../shared/datasets/{oxford_flowers12,
cats_vs_dogs} (14 classes). Then, each a separate `python cli.py extract` process (start-up included,
peak RSS from wait4):
  fresh        the N images into a new cache;
  incremental  the same cache after adding 1% new images, named so that they fall all through the
               scan order (the harder case for the cache's row layout);
  new only     those new images alone into a new cache: what the incremental run is compared with
               (target: incremental <= 3x new only, at every size).

    python bench/scale.py                                          # Lite0, avg_pool, TFLite runtime
    python bench/scale.py --sizes 1000 5000 --backbone MobileNet --alpha 0.25 --weights imagenet  # quick
    python bench/scale.py --engines local ray                      # the ray engine too (pip install -e '.[ray]')
    python bench/scale.py --sizes 5000 --engines local ray --tree-memory   # memory of every process, Ray's too

Scale-out columns (fresh runs only, beside the table above; pip install -e '.[ray,s3,test]'):
  --object-store  the same images read from a local S3-compatible server (moto, started here on 127.0.0.1):
                  the cost of the object-store path (listing, fetching, hashing bytes), not a real bucket's latency;
  --two-node      extract --engine ray --ray-address on a Ray cluster of two nodes (1 CPU each) started here:
                  both nodes share this machine's cores, so this is the multi-node path's overhead, not scale-out.
  --driver-ceiling  no model: Ray tasks make synthetic feature blocks and the driver writes them through the
                  cache writer exactly as an extract does; its rows/s, divided by one node's images/s, is the
                  number of worker nodes one driver can serve.

    python bench/scale.py --sizes 1000 --object-store --two-node --driver-ceiling
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, SHARED, report  # noqa: E402 (sets the import path and KERAS_HOME)
from PIL import Image

SOURCES = ("oxford_flowers12", "cats_vs_dogs")
LITE0 = str(SHARED / "keras-models" / "efficientnet_lite0_imagenet.keras")
NEW_FRACTION = 0.01


def source_images() -> list[tuple[str, Path]]:
    """(class, path) of every source image: class folders of the source datasets, prefixed by the dataset."""
    found = []
    for name in SOURCES:
        for folder in sorted(p for p in (SHARED / "datasets" / name).iterdir() if p.is_dir()):
            found += [
                (f"{name}-{folder.name}", p)
                for p in sorted(folder.iterdir())
                if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            ]
    return found


def variant(task: tuple[Path, Path, int]) -> None:
    """One new image: a random crop (50-100% of each side) of a source, resized to 128-320 px, JPEG 70-95."""
    source, target, seed = task
    rng = np.random.default_rng(seed)
    with Image.open(source) as img:
        img = img.convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(128, 321))
        out = img.crop((x, y, x + cw, y + ch)).resize((side, int(side * ch / cw) or 1), Image.BILINEAR)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.save(target, quality=int(rng.integers(70, 96)))


def make_images(root: Path, names: list[str], seed: int) -> list[Path]:
    """One variant per name under root/CLASS/name, from randomly chosen source images (in parallel)."""
    sources = source_images()
    picks = np.random.default_rng(seed).integers(0, len(sources), len(names))
    tasks = [
        (sources[i][1], root / sources[i][0] / name, seed * 1_000_003 + k)
        for k, (i, name) in enumerate(zip(picks, names))
    ]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(variant, tasks, chunksize=64))
    return [t[1] for t in tasks]


def dataset(workdir: Path, n: int) -> tuple[Path, Path, Path]:
    """(base, base + 1% new, the new images alone); built once per size, the last two as hard links."""
    base, plus, new = workdir / f"data-{n}", workdir / f"data-{n}-plus", workdir / f"data-{n}-new"
    done = workdir / f"data-{n}.done"
    if not done.exists():
        for folder in (base, plus, new):
            shutil.rmtree(folder, ignore_errors=True)
        make_images(base, [f"img_{k:06d}.jpg" for k in range(n)], seed=n)
        # img_<j>b<k>.jpg sorts right after img_<j>.jpg: the new images fall all through the scan order
        after = np.random.default_rng(n + 1).integers(0, n, max(1, int(n * NEW_FRACTION)))
        make_images(new, [f"img_{j:06d}b{k:04d}.jpg" for k, j in enumerate(after)], seed=n + 2)
        shutil.copytree(base, plus, copy_function=os.link)
        shutil.copytree(new, plus, copy_function=os.link, dirs_exist_ok=True)
        done.touch()
    return base, plus, new


def cache_files(cache: Path) -> dict[Path, tuple[int, int]]:
    """(size, mtime) of the index and its shards."""
    files = [cache, *cache.with_name(cache.name + ".shards").glob("*.h5")]
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()}


def tree_memory_peak(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Sample the summed PSS of a process and its descendants (Ray's raylet and workers) until stop is set.

    PSS splits each shared page (Ray's object store, shared libraries) between the processes that map it,
    so the sum counts it once, where a sum of RSS would count it in every process. One sample reads the
    memory maps of every process (about 25 ms for a local Ray cluster's ten): once a second, so that the
    measuring takes under 3% of a core from the run it measures (every 0.25 s cost Ray about 10%).
    """
    import psutil

    while not stop.wait(1.0):
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                pass  # ended between the listing and the sample
        peak[0] = max(peak[0], total)


def extract_process(
    data: Path | str, cache: Path, args: argparse.Namespace, engine: str, extra: list[str] | None = None
) -> dict[str, Any]:
    """One `python cli.py extract` process: wall seconds (start-up included), peak RSS, the summary's figures."""
    command = [
        sys.executable,
        "cli.py",
        "extract",
        str(data),
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--cache",
        str(cache),
        "--runtime",
        args.runtime,
        "--engine",
        engine,
        "--no-progress",
        *(extra or []),
    ]
    command += ["--layer", args.layer] if args.layer else []
    command += ["--alpha", str(args.alpha)] if args.alpha else []
    started = time.perf_counter()
    with open(cache.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        stop, tree_peak = threading.Event(), [0]
        sampler = (
            threading.Thread(target=tree_memory_peak, args=(proc.pid, stop, tree_peak)) if args.tree_memory else None
        )
        if sampler:
            sampler.start()
        stdout = proc.stdout.read()
        stop.set()
        if sampler:
            sampler.join()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        log_text = cache.with_suffix(".log").read_text()[-2000:]
        raise SystemExit(f"extract failed: {' '.join(command)}\n{stdout}\n{log_text}")
    rate = re.search(r"([\d.]+) images/s", stdout)
    first = re.search(r"first batch after ([\d.]+) s", stdout)
    counts = re.search(r"new (\d+), already cached (\d+)", stdout)
    ray_start = re.search(r"started a local Ray cluster in ([\d.]+) s", cache.with_suffix(".log").read_text())
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "tree_pss_mb": round(tree_peak[0] / 2**20) if args.tree_memory else None,
        "ray_start_s": float(ray_start.group(1)) if ray_start else None,
        "images_per_s": float(rate.group(1)) if rate else None,
        "first_batch_s": float(first.group(1)) if first else None,
        "new": int(counts.group(1)),
        "cached": int(counts.group(2)),
        "cache_mb": round(sum(size for size, _ in cache_files(cache).values()) / 1e6, 1),
    }


def measure(workdir: Path, n: int, args: argparse.Namespace, engine: str) -> dict[str, Any]:
    """Fresh, incremental and new-only runs for one size and engine."""
    from pipeline.cache import layout

    base, plus, new = dataset(workdir, n)
    caches = workdir / "caches"
    for stale in caches.glob(f"{engine}-{n}-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    cache = caches / f"{engine}-{n}-cache.h5"
    fresh = extract_process(base, cache, args, engine)
    before = cache_files(cache)
    incremental = extract_process(plus, cache, args, engine)
    incremental["written_mb"] = round(
        sum(size for p, (size, mtime) in cache_files(cache).items() if before.get(p, (0, 0))[1] != mtime) / 1e6, 2
    )
    stats = layout(cache)
    incremental["layout"] = {"shards": stats.shards, "runs": stats.runs, "garbage_rows": stats.garbage_rows}
    only_new = extract_process(new, caches / f"{engine}-{n}-new.h5", args, engine)
    return {
        "engine": engine,
        "images": n,
        "new_images": only_new["new"],
        "fresh": fresh,
        "incremental": incremental,
        "new_only": only_new,
        "ratio": round(incremental["seconds"] / only_new["seconds"], 2),
    }


def engines_compared(rows: list[dict[str, Any]]) -> list[str]:
    """ray against local, size by size (fresh runs): images/s while extracting, whole-command seconds, memory."""
    fresh = {(r["engine"], r["images"]): r["fresh"] for r in rows}
    sizes = [n for (engine, n) in fresh if engine == "ray" and ("local", n) in fresh]
    if not sizes:
        return []
    lines = [
        "",
        "ray vs local (fresh runs; memory: peak PSS summed over each command's processes, Ray's included)",
        f"{'images':>7s} {'local img/s':>11s} {'ray img/s':>9s} {'ray/local':>9s} {'local s':>8s} {'ray s':>7s} "
        f"{'Ray start s':>11s} {'local MB':>8s} {'ray MB':>7s}",
    ]
    for n in sizes:
        local, ray = fresh["local", n], fresh["ray", n]
        lines.append(
            f"{n:7d} {local['images_per_s']:11.1f} {ray['images_per_s']:9.1f} "
            f"{ray['images_per_s'] / local['images_per_s']:9.2f} {local['seconds']:8.1f} {ray['seconds']:7.1f} "
            f"{ray['ray_start_s'] or 0:11.1f} {local['tree_pss_mb'] or '-':>8} {ray['tree_pss_mb'] or '-':>7}"
        )
    return lines


def object_store(workdir: Path, n: int) -> tuple[str, list[str], Any]:
    """The size-n dataset uploaded to a moto S3 server started here: (its URL, the extract options that reach it,
    the server to stop). The options go in a file, as credentials should: every Ray node gets them."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "bench", "secret": "bench", "endpoint_url": f"http://{host}:{port}"}
    (workdir / "s3-options.json").write_text(json.dumps(options))
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.mkdir("bench")
    base, _, _ = dataset(workdir, n)
    fs.pipe({f"bench/data-{n}/{p.relative_to(base).as_posix()}": p.read_bytes() for p in base.rglob("*.jpg")})
    return f"s3://bench/data-{n}", ["--storage-options", f"@{workdir / 's3-options.json'}"], server


def two_node_cluster() -> Any:
    """A Ray cluster of two nodes on this machine (1 CPU each: the local engine's 2 CPUs, split)."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    return nodes


def scale_out_rows(workdir: Path, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fresh runs of n images: local and (with --two-node) two-node Ray, from disk and (with --object-store) S3."""
    base, _, _ = dataset(workdir, n)
    sources: list[tuple[str, Path | str, list[str]]] = [("disk", base, [])]
    server = cluster = None
    try:
        if args.object_store:
            url, options, server = object_store(workdir, n)
            sources.append(("s3 (moto)", url, options))
        if args.two_node:
            cluster = two_node_cluster()
        rows = []
        for name, source, options in sources:
            runs = [("local", "local", options)]
            if cluster is not None:
                runs.append(("ray, 2 nodes", "ray", [*options, "--ray-address", cluster.address]))
            for label, engine, extra in runs:
                cache = workdir / "caches" / f"out-{n}-{len(rows)}.h5"
                for stale in cache.parent.glob(cache.name + "*"):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
                run = extract_process(source, cache, args, engine, extra)
                rows.append({"images": n, "input": name, "engine": label, **run})
        return rows
    finally:
        if cluster is not None:
            cluster.shutdown()
        if server is not None:
            server.stop()


def driver_ceiling(workdir: Path, rows: int, dim: int, per_node: float) -> dict[str, Any]:
    """Rows/s and MB/s at which the driver writes synthetic feature blocks from Ray through the cache writer.

    Three figures: Ray delivering the blocks to the driver alone, the cache writer alone (blocks already in
    memory), and both as an extract runs them (pipeline.engine_ray's write loop); then the commit.
    """
    import hashlib

    import ray

    from pipeline.cache import CacheWriter, Row
    from pipeline.engine_ray import _write_all
    from pipeline.stream import ERROR, HASH, RUNTIME, FeatureSink, features_column

    block = 512

    def make_block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        rng = np.random.default_rng(int(ids[0]))
        return {
            HASH: np.array([hashlib.sha256(str(int(i)).encode()).hexdigest() for i in ids]),
            ERROR: np.full(len(ids), ""),
            RUNTIME: np.full(len(ids), "tflite"),
            features_column(0): rng.standard_normal((len(ids), dim), dtype=np.float32),
        }

    def blocks() -> Any:
        return ray.data.range(rows, override_num_blocks=max(1, rows // block)).map_batches(make_block, batch_size=None)

    def writer(name: str) -> CacheWriter:
        path = workdir / "caches" / f"ceiling-{name}.h5"
        for stale in path.parent.glob(path.name + "*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        return CacheWriter(path, {"backbone": "synthetic"}, f"synthetic-{name}", 256)

    mb = rows * dim * 4 / 1e6
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        blocks().limit(4 * block).materialize()  # the workers start once, outside the measurements
        started = time.perf_counter()
        kept = [dict(b) for b in blocks().iter_batches(batch_size=None, batch_format="numpy")]
        delivery = time.perf_counter() - started
        sink = FeatureSink([writer("sink-only")])
        started = time.perf_counter()
        for columns in kept:
            sink.write_columns(columns)
        sink_only = time.perf_counter() - started
        del kept
        cache_writer = writer("both")
        started = time.perf_counter()
        _, done = _write_all(blocks(), FeatureSink([cache_writer]), rows, progress=False)
        both = time.perf_counter() - started
        assert len(done) == rows, (len(done), rows)
        started = time.perf_counter()
        # rows in scan order (the ids), as an extract commits them; blocks arrived roughly in that order
        order = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(rows)]
        cache_writer.commit([Row(f"img/{k}.jpg", 0, "", h) for k, h in enumerate(order)], ["img"], {}, [])
        commit = time.perf_counter() - started
    finally:
        ray.shutdown()
    rate = rows / both
    return {
        "rows": rows,
        "dim": dim,
        "feature_mb": round(mb, 1),
        "ray_delivery_rows_per_s": round(rows / delivery),
        "sink_only_rows_per_s": round(rows / sink_only),
        "rows_per_s": round(rate),
        "mb_per_s": round(mb / both, 1),
        "commit_s": round(commit, 2),
        "per_node_images_per_s": per_node,
        "nodes": int(rate // per_node),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--engines", nargs="+", default=["local"])
    parser.add_argument("--backbone", default=LITE0)
    parser.add_argument("--layer", default="avg_pool")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--runtime", default="tflite")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cnncodes-scale"))
    parser.add_argument("--out", type=Path, default=None, help="Also write the results here as JSON.")
    parser.add_argument("--object-store", action="store_true", help="Fresh runs reading a local S3 server too.")
    parser.add_argument("--two-node", action="store_true", help="Fresh runs on a two-node Ray cluster too.")
    parser.add_argument(
        "--driver-ceiling",
        action="store_true",
        help="Measure the driver's ingest rate (synthetic features, no model) and the nodes it serves.",
    )
    parser.add_argument("--ceiling-rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280, help="Feature width of the synthetic rows (Lite0: 1280).")
    parser.add_argument(
        "--per-node",
        type=float,
        default=90.0,
        help="Images/s of one 2-core node with the local engine (Lite0, TFLite; see README).",
    )
    parser.add_argument(
        "--tree-memory",
        action="store_true",
        help="Also sample the summed PSS of each command's processes (Ray's included) once a "
        "second; it slows the measured run a little, Ray's most, so take speeds without it.",
    )
    args = parser.parse_args()
    if args.backbone != LITE0 and args.layer == "avg_pool":
        args.layer = None  # avg_pool is Lite0's; a Keras Applications name pools its top by default
    caches = args.workdir / "caches"
    caches.mkdir(parents=True, exist_ok=True)
    # convert the backbone once, outside the measurements (the conversion is cached beside the caches)
    warm = args.workdir / "warm"
    if not warm.exists():
        make_images(warm, [f"img_{k}.jpg" for k in range(4)], seed=7)
    extract_process(warm, caches / "warm.h5", args, "local")
    result: dict[str, Any] = {"backbone": args.backbone, "layer": args.layer, "runtime": args.runtime}
    lines: list[str] = []
    if args.object_store or args.two_node:
        out_rows = [r for n in args.sizes for r in scale_out_rows(args.workdir, n, args)]
        lines += [
            "fresh runs by input and engine (the two nodes share this machine's 2 cores)",
            f"{'images':>7s} {'input':10s} {'engine':13s} {'img/s':>7s} {'seconds':>8s}",
        ]
        lines += [
            f"{r['images']:7d} {r['input']:10s} {r['engine']:13s} {r['images_per_s'] or 0:7.1f} {r['seconds']:8.1f}"
            for r in out_rows
        ]
        result["scale_out"] = out_rows
    if args.driver_ceiling:
        c = driver_ceiling(args.workdir, args.ceiling_rows, args.dim, args.per_node)
        lines += [
            "",
            f"driver ceiling ({c['rows']} synthetic rows of {c['dim']} float32, {c['feature_mb']} MB):",
            (
                f"  Ray delivery alone {c['ray_delivery_rows_per_s']} rows/s; cache writer alone "
                f"{c['sink_only_rows_per_s']} rows/s; both (as extract) {c['rows_per_s']} rows/s = "
                f"{c['mb_per_s']} MB/s; commit {c['commit_s']} s"
            ),
            f"  = {c['nodes']} worker nodes at {c['per_node_images_per_s']:g} images/s each",
        ]
        result["driver_ceiling"] = c
    if lines:
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        report("\n".join(lines), result)
        return
    # engines interleaved size by size: a change in the machine's load hits them alike
    rows = [measure(args.workdir, n, args, engine) for n in args.sizes for engine in args.engines]
    lines = [
        f"{'engine':6s} {'images':>7s} {'img/s':>7s} {'fresh s':>8s} {'RSS MB':>7s} {'cache MB':>9s} "
        f"{'+1% s':>7s} {'new-only s':>10s} {'ratio':>6s} {'written MB':>10s} {'shards/runs':>11s}"
    ]
    for r in rows:
        f, i, o = r["fresh"], r["incremental"], r["new_only"]
        lines.append(
            f"{r['engine']:6s} {r['images']:7d} {f['images_per_s'] or 0:7.1f} {f['seconds']:8.1f} "
            f"{f['peak_rss_mb']:7d} {f['cache_mb']:9.1f} {i['seconds']:7.1f} {o['seconds']:10.1f} "
            f"{r['ratio']:6.2f} {i['written_mb']:10.2f} {i['layout']['shards']:5d}/{i['layout']['runs']:<5d}"
        )
    lines += engines_compared(rows)
    result["rows"] = rows
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    report("\n".join(lines), result)


if __name__ == "__main__":
    main()
