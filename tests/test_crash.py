"""Crash safety of the real command: kill -9 in the middle of an extract, and Ctrl-C (SIGINT).

Each test starts `python cli.py extract` and stops it once at least two journal chunks are on disk. The
backbone is the two-layer CNN file, converted to TFLite once and placed beside every cache: the process runs
the CPU's default runtime without importing TensorFlow (which took 8-10 s of each process), and the journal
and the commit do not depend on the backbone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_dataset
from model_fixtures import Conversion, quiet, save_small_cnn
from typer.testing import CliRunner

import cli
from pipeline.backbones import BackboneConfig
from pipeline.cache import load
from pipeline.extract import extract

pytestmark = pytest.mark.slow

PER_CLASS, SUBSET_PER_CLASS = 150, 20  # 450 images; the old cache holds 60 of them
# One image a batch and a chunk: about 220 commits of the journal, each a file written and synced, so a run
# lasts long enough to be stopped after its second chunk (the CNN alone would finish 450 images in a blink):
# measured, a process writes its second chunk 0.8 s after its start and ends 1.4-1.6 s later.
CHUNK, BATCH = 2, 1
RUNTIME = "tflite"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> BackboneConfig:
    return BackboneConfig(str(save_small_cnn(tmp_path_factory.mktemp("crash_cnn") / "small_cnn.keras"))).resolved()


@pytest.fixture(scope="module")
def conversion(cnn: BackboneConfig, tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    from pipeline.runtime import make_runtime, tflite_path

    folder = tmp_path_factory.mktemp("crash_tflite")
    make_runtime(cnn, "tflite", tflite_dir=folder, log=quiet())
    return Conversion(tflite_path(cnn, folder), [])


def cache_in(folder: Path, conversion: Conversion) -> Path:
    """features.h5 in folder, beside the CNN's conversion, which extract finds as its own earlier one."""
    conversion.place(folder)
    return folder / "features.h5"


def cli_args(data: Path, cache: Path, config: BackboneConfig) -> list[str]:
    return [
        sys.executable,
        "cli.py",
        "extract",
        str(data),
        "--backbone",
        config.backbone,
        "--cache",
        str(cache),
        "--chunk-size",
        str(CHUNK),
        "--batch-size",
        str(BATCH),
        "--runtime",
        RUNTIME,
        "--no-progress",
    ]


def env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _default_sigint() -> None:
    # a shell's background job starts with SIGINT ignored, and Python keeps an inherited SIG_IGN:
    # give the child the default disposition, as in a terminal, so Ctrl-C can be tested wherever we run
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(data: Path, cache: Path, config: BackboneConfig, logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cli_args(data, cache, config),
        cwd=ROOT,
        env=env(),
        stdout=open(logs / "stdout", "w"),
        stderr=open(logs / "stderr", "w"),
        preexec_fn=_default_sigint,
    )


def wait_for_chunks(proc: subprocess.Popen, partial: Path, count: int, logs: Path, timeout: float = 180) -> int:
    """Poll until at least count journal chunks exist; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = len(list(partial.glob("chunk-*.npz")))
        if found >= count:
            return found
        if proc.poll() is not None:
            pytest.fail(
                f"extract ended (exit {proc.returncode}) before {count} journal chunks were written; "
                f"stderr: {(logs / 'stderr').read_text()[-2000:]}"
            )
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {count} journal chunks in {partial} after {timeout} s")


def by_hash(cache) -> dict[str, np.ndarray]:
    return dict(zip(cache.content_hash, cache.features))


def assert_rows_match(got, reference) -> None:
    """Every row of got has the features the uninterrupted run computed for the same content."""
    want = by_hash(reference)
    scale = float(np.abs(reference.features).max())
    assert scale > 0
    for digest, feats in zip(got.content_hash, got.features):
        np.testing.assert_allclose(feats, want[digest], rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, cnn: BackboneConfig, conversion: Conversion):
    """300 images, a 60-image subset at the same relative paths, and an uninterrupted reference cache."""
    base = tmp_path_factory.mktemp("crash")
    full = make_dataset(base / "full", per_class=PER_CLASS)
    subset = base / "subset"
    for path in sorted(full.rglob("img_*")):
        if int(path.stem.split("_")[1]) < SUBSET_PER_CLASS:
            (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, subset / path.parent.name / path.name)
    reference = cache_in(base / "reference", conversion)
    summary = extract(full, cnn, cache=reference, batch_size=32, runtime=RUNTIME, progress=False, log=lambda m: None)
    assert summary.n_rows == 3 * PER_CLASS
    return full, subset, load(reference)


def test_kill_9_keeps_the_old_cache_and_resumes(
    big, cnn: BackboneConfig, conversion: Conversion, tmp_path: Path
) -> None:
    full, subset, reference = big
    cache = cache_in(tmp_path / "cache", conversion)
    partial = cache.with_name(cache.name + ".partial")
    first = extract(subset, cnn, cache=cache, runtime=RUNTIME, progress=False, log=lambda m: None)
    assert first.n_rows == 3 * SUBSET_PER_CLASS
    old = load(cache)

    proc = start(full, cache, cnn, tmp_path / "killed")
    chunks = wait_for_chunks(proc, partial, 2, tmp_path / "killed")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert chunks >= 2 and len(list(partial.glob("chunk-*.npz"))) >= 2

    # the last complete cache is untouched: it still loads and holds the old rows
    still = load(cache)
    assert still.paths == old.paths and still.content_hash == old.content_hash
    np.testing.assert_array_equal(still.features, old.features)
    assert not list(cache.parent.glob("*.tmp*"))

    # the rerun in this process: what is tested is what it finds on disk
    resumed = CliRunner().invoke(cli.app, cli_args(full, cache, cnn)[2:])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    counts = re.search(r"new (\d+), already cached (\d+), resumed from an interrupted run (\d+)", resumed.stdout)
    assert counts, resumed.stdout
    new, cached, resumed_rows = map(int, counts.groups())
    assert resumed_rows >= 2 * CHUNK and cached == 3 * SUBSET_PER_CLASS
    assert new + resumed_rows == 3 * (PER_CLASS - SUBSET_PER_CLASS)  # only the rest was extracted
    assert f"cache: {cache} ({3 * PER_CLASS} images)" in resumed.stdout
    # journal gone, no temp files
    assert sorted(p.name for p in cache.parent.iterdir()) == sorted(
        [conversion.path.name, "features.h5", "features.h5.shards"]
    )

    final = load(cache)
    assert len(final) == 3 * PER_CLASS and sorted(final.content_hash) == sorted(reference.content_hash)
    assert final.paths == reference.paths and final.labels.tolist() == reference.labels.tolist()
    assert_rows_match(final, reference)


def test_ctrl_c_saves_finished_rows(big, cnn: BackboneConfig, conversion: Conversion, tmp_path: Path) -> None:
    full, _, reference = big
    cache = cache_in(tmp_path / "cache", conversion)
    partial = cache.with_name(cache.name + ".partial")
    proc = start(full, cache, cnn, tmp_path / "interrupted")
    wait_for_chunks(proc, partial, 2, tmp_path / "interrupted")
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "interrupted" / "stderr").read_text()[-3000:]
    stdout = (tmp_path / "interrupted" / "stdout").read_text()
    stderr = (tmp_path / "interrupted" / "stderr").read_text()
    assert "interrupted: the cache holds everything finished so far" in stdout
    assert "Traceback" not in stderr

    saved = load(cache)
    assert 2 * CHUNK <= len(saved) < 3 * PER_CLASS
    assert f"cache: {cache} ({len(saved)} images)" in stdout
    assert not partial.exists()
    assert sorted(p.name for p in cache.parent.iterdir()) == sorted(
        [conversion.path.name, "features.h5", "features.h5.shards"]
    )
    assert set(saved.content_hash) <= set(reference.content_hash)
    assert_rows_match(saved, reference)
