"""train: the same cache, split, C and test predictions as extract + fit-head; one-line errors; staged outputs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, RUNTIME, TINY, TINY_ARGS, make_dataset, requires_shared
from typer.testing import CliRunner

import cli
from pipeline.artifacts import (
    CV_PREDICTIONS_CSV,
    HEAD_JSON,
    HEAD_MODEL,
    METRICS_JSON,
    PREDICTIONS_CSV,
    REPORT_HTML,
    TMP_MARK,
    read_predictions,
)
from pipeline.backbones import BackboneConfig
from pipeline.extract import extract
from pipeline.heads import fit_head, load_head
from pipeline.train import summary_lines, train

runner = CliRunner()
QUIET = dict(progress=False, log=lambda m: None)


def invoke(*args: object):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_same_head(trained: Path, fitted: Path) -> None:
    """Same split, same chosen C, same per-image test (and out-of-fold) predictions."""
    a, b = load_head(trained), load_head(fitted)
    assert a.meta["metrics"] == b.meta["metrics"] and a.meta["options"] == b.meta["options"]
    assert a.meta["fingerprint"] == b.meta["fingerprint"]  # the cache's fingerprint, the options and the rows
    for name in (PREDICTIONS_CSV, CV_PREDICTIONS_CSV):
        pa, pb = read_predictions(trained / name), read_predictions(fitted / name)
        assert pa.paths == pb.paths and pa.split == pb.split
        np.testing.assert_array_equal(pa.y_true, pb.y_true)
        np.testing.assert_allclose(pa.proba, pb.proba, rtol=0, atol=1e-6)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", per_class=8)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, cache folder) extracted once: a train process that finds every image cached imports no TensorFlow,
    so the kill tests below spend their seconds on the stages they kill."""
    root = tmp_path_factory.mktemp("extracted")
    data = make_dataset(root / "data", per_class=8)
    extract(data, BackboneConfig(**TINY), cache_dir=root / "c", runtime=RUNTIME, **QUIET)
    return data, root / "c"


def test_train_equals_extract_then_fit_head(data: Path, tmp_path: Path, shared_runtime) -> None:
    config = BackboneConfig(**TINY)
    result = train(data, config, cache_dir=tmp_path / "a", runtime=RUNTIME, cv=3, out=tmp_path / "model", **QUIET)
    summary = extract(data, config, cache_dir=tmp_path / "b", runtime=RUNTIME, **QUIET)
    fit_head(summary.cache_path, cv=3, out=tmp_path / "head", log=lambda m: None)
    assert result.extract.cache_path.name == summary.cache_path.name  # extract's own default cache name
    assert_same_head(tmp_path / "model", tmp_path / "head")
    assert (tmp_path / "model" / REPORT_HTML).stat().st_size > 10_000
    text = "\n".join(summary_lines(result))
    for fragment in (
        "test accuracy",
        "label issues",
        "near-duplicates",
        f"cnncodes serve --head {tmp_path / 'model'}",
        "cnncodes predict",
        str(result.extract.cache_path),
        "took: ",
    ):
        assert fragment in text, fragment


@pytest.mark.slow
def test_train_on_real_images_equals_extract_then_fit_head(tmp_path: Path, lite0_tflite) -> None:
    """A small real dataset (12 photos per class of usd_bills_kaggle) and EfficientNet-Lite0, as a user runs it."""
    source = requires_shared("datasets", "usd_bills_kaggle")
    lite0 = requires_shared("keras-models", "efficientnet_lite0_imagenet.keras")
    data = tmp_path / "bills"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (data / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:12]:
            (data / folder.name / image.name).symlink_to(image)
    config = BackboneConfig(str(lite0), layer="avg_pool")
    # TFLite, as on a user's CPU, with the session's conversion beside both caches
    for cache_dir in ("a", "b"):
        lite0_tflite.place(tmp_path / cache_dir)
    result = train(data, config, cache_dir=tmp_path / "a", runtime="tflite", out=tmp_path / "model", **QUIET)
    summary = extract(data, config, cache_dir=tmp_path / "b", runtime="tflite", **QUIET)
    assert (result.extract.runtime, summary.runtime) == ("tflite", "tflite")
    fit_head(summary.cache_path, out=tmp_path / "head", log=lambda m: None)
    assert_same_head(tmp_path / "model", tmp_path / "head")
    assert result.head.metrics["accuracy"] > 0.5  # real features; chance is 1/7


def test_help_lists_every_option_with_its_default() -> None:
    import typer.main

    command = typer.main.get_command(cli.app).commands["train"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli.app, ["train", "--help"])
    text = re.sub(r"[\s│]+", " ", result.stdout)
    options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
    assert len(options) >= 30
    for option in options:
        assert option.opts[0] in text, option.opts[0]
        if option.default is None:  # no value to show: the help says what happens without the option
            assert "default: " in option.help, option.opts[0]
        else:
            shown = option.opts[0][2:] if isinstance(option.default, bool) else option.default
            assert f"[default: {shown}]" in text, option.opts[0]
    for name in (
        "--backbone",
        "--layer",
        "--clf",
        "--cache-dir",
        "--runtime",
        "--seed",
        "--test-size",
        "--cv",
        "--export",
        "--out",
        "--views",
    ):
        assert name in text


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_bad_folder_unknown_backbone_missing_extra_bad_option(data: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model"
    assert_user_error(invoke("train", tmp_path / "nowhere", *TINY_ARGS, "--out", out), "nowhere")
    assert_user_error(
        invoke("train", data, "--backbone", "MobileNetv3", "--out", out), "unknown backbone 'MobileNetv3'"
    )
    assert_user_error(invoke("train", data, *TINY_ARGS, "--clf", "forest", "--out", out), "--clf")
    assert_user_error(invoke("train", data, *TINY_ARGS, "--export", "onnx", "--out", out), "--export")
    assert_user_error(
        invoke("train", data, *TINY_ARGS, "--export", "tflite", "--clf", "knn", "--out", out),
        "--export needs a linear head",
    )
    import pipeline.runtime

    monkeypatch.setattr(pipeline.runtime, "find_spec", lambda name: None)  # a lean install: no TensorFlow
    assert_user_error(
        invoke("train", data, *TINY_ARGS, "--export", "tflite", "--out", out), "needs TensorFlow", "pip install"
    )
    assert not out.exists() and not list(tmp_path.glob("cache*"))  # refused before any work


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if TMP_MARK in p.name or ".old-" in p.name] + (
        [p.name for p in folder.iterdir() if TMP_MARK in p.name] if folder.is_dir() else []
    )


def _default_sigint() -> None:
    # a background job starts with SIGINT ignored; give the child a terminal's default, as tests/test_crash.py does
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Runs `cli.py train` with one library function replaced by one that (after calling the real one, or instead
# of it) sends the process a signal: kill -9 or Ctrl-C at a chosen point.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import pipeline.{module} as target
real = target.{function}
def {function}(*args, **kwargs):
    if {after_real}:
        real(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
target.{function} = {function}
from cli import app
sys.argv = ["cli.py"] + {argv!r}
app()
"""


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
@pytest.mark.parametrize(
    "module,function,after_real",
    [
        ("artifacts", "write_predictions", True),  # half way through staging the head folder: after its first CSV
        ("web.report", "write_text", False),  # the report, as it is about to be written
    ],
)
def test_killed_train_leaves_no_half_written_folder_or_report(
    extracted: tuple[Path, Path], tmp_path: Path, signal_name: str, module: str, function: str, after_real: bool
) -> None:
    data, caches = extracted
    shutil.copytree(caches, tmp_path / "c")  # the stages killed here come after extraction
    out = tmp_path / "model"
    argv = [
        "train",
        str(data),
        *TINY_ARGS,
        "--runtime",
        RUNTIME,
        "--cv",
        "3",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out),
        "--no-progress",
    ]
    code = DRIVER.format(
        root=str(ROOT), module=module, function=function, after_real=after_real, signal=signal_name, argv=argv
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
        preexec_fn=_default_sigint,
    )
    assert done.returncode in (-9, 130), (done.returncode, done.stderr[-2000:])
    if signal_name == "SIGINT":
        assert done.returncode == 130 and "Traceback" not in done.stderr
    if function == "write_predictions":  # killed while the head folder was staged: no folder at all
        assert not out.exists()
    else:  # killed before the report: the head is whole and loads, the report is absent
        assert {p.name for p in out.iterdir()} >= {HEAD_JSON, HEAD_MODEL, METRICS_JSON, PREDICTIONS_CSV}
        load_head(out)
        assert not (out / REPORT_HTML).exists()
    if signal_name == "SIGINT":
        assert leftovers(out) == []  # Ctrl-C cleans its staging; kill -9 leaves it to the next run's recovery
    rerun = invoke(
        "train",
        data,
        *TINY_ARGS,
        "--runtime",
        RUNTIME,
        "--cv",
        "3",
        "--cache-dir",
        tmp_path / "c",
        "--out",
        out,
        "--no-progress",
    )
    assert rerun.exit_code == 0, rerun.stderr
    assert (out / REPORT_HTML).is_file() and leftovers(out) == []


def test_train_reuses_the_cache_of_extract(data: Path, tmp_path: Path, shared_runtime) -> None:
    config = BackboneConfig(**TINY)
    first = extract(data, config, cache_dir=tmp_path / "c", runtime=RUNTIME, **QUIET)
    seen = shared_runtime()
    result = train(data, config, cache_dir=tmp_path / "c", runtime=RUNTIME, cv=3, out=tmp_path / "m", **QUIET)
    assert result.extract.cache_path == first.cache_path and result.extract.n_new == 0
    assert shared_runtime() == seen  # no image went through the backbone again


def test_train_with_views_equals_extract_then_fit_head_with_views(data: Path, tmp_path: Path, shared_runtime) -> None:
    from pipeline.views import view_recipe

    config, views = BackboneConfig(**TINY), view_recipe(2, seed=1)
    train(data, config, cache_dir=tmp_path / "a", runtime=RUNTIME, cv=3, out=tmp_path / "model", views=views, **QUIET)
    summary = extract(data, config, cache_dir=tmp_path / "b", runtime=RUNTIME, views=views, **QUIET)
    fit_head(summary.cache_path, cv=3, views=True, out=tmp_path / "head", log=lambda m: None)
    assert_same_head(tmp_path / "model", tmp_path / "head")
    assert load_head(tmp_path / "model").meta["options"]["views"] == 2  # trained on the views, scored on clean
    options = (*TINY_ARGS, "--runtime", RUNTIME, "--cache-dir", tmp_path / "a", "--out", tmp_path / "m2")
    result = invoke("train", data, *options, "--views", 2, "--views-seed", 1)
    assert result.exit_code == 0, result.output
    assert load_head(tmp_path / "m2").meta["options"]["views"] == 2
    # views of another recipe are never mixed in: one line naming the options that made the cached ones
    assert_user_error(invoke("train", data, *options, "--views", 3), "made with --views 2 --views-seed 1; give those")
