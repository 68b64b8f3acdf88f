"""Load test of `serve`: concurrent clients on loopback against the server in a subprocess, vs `predict`.

    python bench/serve_load.py HEAD_DIR [--clients 8] [--requests 100] [--runtime auto] [--max-batch 32 1]

The images are re-encoded copies (JPEG q95, in a temporary folder) of the head's dataset images, so
`predict --head` cannot take their features from the cache and both paths run the backbone. Each
client sends its own images, one per request, in a bounded loop. For each --max-batch value (1 turns
the micro-batcher off) it prints images/s, p50/p99 latency, errors and the server's RSS before and
after; then `predict` on the same images: its whole-process rate and its rate net of start-up (a
1-image run). The last line is one JSON object.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, report  # noqa: E402 (sets the import path and environment)
from PIL import Image

from pipeline.artifacts import HEAD_JSON, read_json
from pipeline.images import scan_dataset


def copies(head: Path, n: int, folder: Path) -> list[Path]:
    """n of the head's dataset images re-encoded as new JPEG files (new bytes: not in the cache)."""
    root = read_json(head / HEAD_JSON, "give a head folder")["dataset_root"]
    files = scan_dataset(root).files
    picked = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).astype(int)]
    out = []
    for k, f in enumerate(picked):
        path = folder / f"{k:04d}_{f.path.stem}.jpg"
        with Image.open(f.path) as img:
            img.convert("RGB").save(path, quality=95)
        out.append(path)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def client(url: str, images: list[tuple[str, bytes]], latencies: list[float], errors: list[str]) -> None:
    """One client: its images one request at a time (a bounded loop)."""
    import httpx

    async with httpx.AsyncClient(timeout=120) as session:
        for name, data in images:
            start = time.perf_counter()
            response = await session.post(url + "predict", files={"files": (name, data, "image/jpeg")})
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors.append(f"{name}: {response.status_code} {response.text[:200]}")


async def load(url: str, per_client: list[list[tuple[str, bytes]]]) -> tuple[float, list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(url, images, latencies, errors) for images in per_client))
    return time.perf_counter() - start, latencies, errors


def serve_run(
    head: Path, runtime: str, max_batch: int, per_client: list[list[tuple[str, bytes]]], log_path: Path
) -> dict[str, Any]:
    """Start the server, measure its RSS, run the clients, measure again, stop it."""
    import httpx
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "cli.py",
                "serve",
                "--head",
                str(head),
                "--port",
                str(port),
                "--runtime",
                runtime,
                "--max-batch",
                str(max_batch),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"serve exited:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        startup = time.perf_counter() - started
        rss_before = psutil.Process(server.pid).memory_info().rss / 1e6
        seconds, latencies, errors = asyncio.run(load(url, per_client))
        rss_after = psutil.Process(server.pid).memory_info().rss / 1e6
        health = httpx.get(url + "health").json()
    finally:
        server.terminate()
        server.wait(60)
    n = sum(len(images) for images in per_client)
    return {
        "max_batch": max_batch,
        "images": n,
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
        "errors": len(errors),
        "first_errors": errors[:3],
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "model_calls": health["model_calls"],
        "mean_batch": round(health["images"] / max(health["model_calls"], 1), 2),
        "startup_s": round(startup, 1),
    }


def predict_run(head: Path, paths: list[Path], runtime: str, out: Path) -> float:
    """Wall seconds of one `cli.py predict` process on these files."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "cli.py",
            "predict",
            *map(str, paths),
            "--head",
            str(head),
            "--runtime",
            runtime,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("head", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="images per client, one per request")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[32, 1])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = copies(args.head, args.clients * args.requests, folder)
        blobs = [(p.name, p.read_bytes()) for p in paths]
        # client k sends images k, k + clients, ... (every client its own, cycling when there are fewer)
        per_client = [
            [blobs[(k + args.clients * r) % len(blobs)] for r in range(args.requests)] for k in range(args.clients)
        ]
        runs = [serve_run(args.head, args.runtime, b, per_client, Path(tmp) / f"serve-{b}.log") for b in args.max_batch]
        whole = predict_run(args.head, paths, args.runtime, Path(tmp) / "all.csv")
        one = predict_run(args.head, paths[:1], args.runtime, Path(tmp) / "one.csv")
    predict = {
        "images": len(paths),
        "seconds": round(whole, 1),
        "images_per_s": round(len(paths) / whole, 1),
        "startup_s": round(one, 1),
        "net_images_per_s": round((len(paths) - 1) / max(whole - one, 1e-9), 1),
    }
    result = {
        "head": str(args.head),
        "runtime": args.runtime,
        "clients": args.clients,
        "per_client": args.requests,
        "images": "re-encoded JPEG copies (q95) of the head's dataset images, served by the backbone",
        "serve": runs,
        "predict": predict,
    }
    lines = [
        f"serve --max-batch {r['max_batch']}: {r['images_per_s']} img/s, p50 {r['p50_ms']} ms, "
        f"p99 {r['p99_ms']} ms, errors {r['errors']}, RSS {r['rss_before_mb']} -> {r['rss_after_mb']} MB, "
        f"{r['model_calls']} model calls (mean batch {r['mean_batch']})"
        for r in runs
    ]
    lines.append(
        f"predict --head on the same {len(paths)} images: {predict['images_per_s']} img/s whole process "
        f"({predict['seconds']} s), {predict['net_images_per_s']} img/s net of its "
        f"{predict['startup_s']} s start-up"
    )
    report("\n".join(lines), result)


if __name__ == "__main__":
    main()
