"""cli.py: user mistakes exit 2 with one `error:` line and no traceback; `backbones`; a small extract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, RUNTIME, TINY_ARGS, make_dataset
from typer.testing import CliRunner

import cli
from pipeline.cache import load

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def one_class(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "one", classes={"only": (10, 20, 30)}, per_class=2)


def test_unknown_backbone(dataset: Path, tmp_path: Path) -> None:
    assert_user_error(
        invoke("extract", dataset, "--backbone", "MobileNetv3", "--cache", tmp_path / "c.h5"),
        "unknown backbone 'MobileNetv3'",
        "Did you mean",
    )
    assert not (tmp_path / "c.h5").exists()


def test_missing_data_dir(tmp_path: Path) -> None:
    assert_user_error(
        invoke("extract", tmp_path / "nowhere", *TINY_ARGS, "--cache", tmp_path / "c.h5"), "nowhere is not a folder"
    )


def test_one_class_dataset(one_class: Path, tmp_path: Path) -> None:
    assert_user_error(invoke("extract", one_class, *TINY_ARGS, "--cache", tmp_path / "c.h5"), "has one class (only)")


def test_empty_class_folder(dataset: Path, tmp_path: Path) -> None:
    (dataset / "nothing_here").mkdir()
    assert_user_error(
        invoke("extract", dataset, *TINY_ARGS, "--cache", tmp_path / "c.h5"), "nothing_here has no images"
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--pooling", "mean"], "--pooling is 'mean'"),
        (["--chunk-size", "0"], "--chunk-size is 0"),
        (["--runtime", "onnx"], "--runtime is 'onnx'"),
        (["--image-size", "8"], "--image-size is 8"),
        (["--backbone", "ResNet50", "--alpha", "0.5"], "--alpha applies to"),
        (["--weights", "/no/such/weights.h5"], "weights file /no/such/weights.h5 does not exist"),
        (["--backbone", "/no/such/model.keras"], "backbone file /no/such/model.keras does not exist"),
    ],
)
def test_bad_options(dataset: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_user_error(invoke("extract", dataset, *args, "--cache", tmp_path / "c.h5"), fragment)


def test_backbones_lists_applications() -> None:
    result = invoke("backbones")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        r"MobileNetV2\s+224\s+1280\s+\(default\)", next(l for l in lines if l.startswith("MobileNetV2 "))
    )
    assert any(re.fullmatch(r"ResNet50\s+224\s+2048", l) for l in lines)
    assert any(re.fullmatch(r"EfficientNetB3\s+300\s+1536", l) for l in lines)


def test_extract_then_other_config_on_the_same_cache(dataset: Path, tmp_path: Path, shared_runtime) -> None:
    cache = tmp_path / "c.h5"
    result = invoke(
        "extract", dataset, *TINY_ARGS, "--cache", cache, "--batch-size", "5", "--runtime", RUNTIME, "--no-progress"
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert f"cache: {cache} (12 images)" in result.stdout and "new 12, already cached 0" in result.stdout
    assert len(load(cache)) == 12
    again = invoke("extract", dataset, *TINY_ARGS, "--cache", cache, "--runtime", RUNTIME, "--no-progress")
    assert again.exit_code == 0 and "new 0, already cached 12" in again.stdout
    other = [a if a != "32" else "48" for a in TINY_ARGS]
    assert_user_error(
        invoke("extract", dataset, *other, "--cache", cache, "--no-progress"),
        "written with another configuration (image_size: 32 -> 48)",
    )


def test_user_error_in_a_real_process_is_fast_and_clean(one_class: Path, tmp_path: Path) -> None:
    """The real entry point: exit code 2, one error line, no traceback, and TensorFlow never imported."""
    out = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "cli.py",
            "extract",
            str(one_class),
            *TINY_ARGS,
            "--cache",
            str(tmp_path / "c.h5"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [l for l in out.stderr.splitlines() if not l.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "has one class" in errors[0], errors
    assert "Traceback" not in out.stderr and out.stdout == ""
    imported = {l.split("|")[-1].strip() for l in out.stderr.splitlines() if l.startswith("import time:")}
    assert "pipeline.extract" in imported and not {"tensorflow", "keras"} & imported


def test_param_errors_name_flags_on_the_command_line_and_arguments_in_python() -> None:
    from pipeline.params import ParamError, check_params

    with pytest.raises(ParamError) as info:
        check_params(dict(top_k=0))
    assert str(info.value).startswith("top_k is 0; it must be an integer in [1, 1000]")
    assert info.value.as_flags().startswith("--top-k is 0; it must be")
    with pytest.raises(ParamError) as info:
        check_params(dict(runtime="{odd}"))  # braces in the value are kept as they are
    assert str(info.value).startswith("runtime is '{odd}'")


def test_an_option_is_defined_once() -> None:
    from pipeline.params import Interval, define

    define(seed=[Interval(0, 2**32 - 1, integer=True)])  # the same definition again is harmless
    with pytest.raises(ValueError, match="defined twice"):
        define(seed=[Interval(0, 2**31 - 1, integer=True)])


def test_default_outputs_go_under_the_output_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from heads_fixtures import blobs, write_cache

    from pipeline.artifacts import HOME_ENV

    monkeypatch.setenv(HOME_ENV, "")  # restored after the test (the --home callback sets it); "" is the default
    monkeypatch.chdir(tmp_path)
    X, y = blobs(per_class=10)
    cache = write_cache(tmp_path / "blobs.h5", X, y)
    home = tmp_path / "home"
    result = invoke("--home", str(home), "fit-head", str(cache), "--cv", "2", "--n-jobs", "1")
    assert result.exit_code == 0, result.output
    assert (home / "heads" / "blobs-logreg" / "head.json").is_file()
    assert (home / "heads" / "blobs-logreg" / "confusion_matrix.png").is_file()  # the command draws it
    assert not (tmp_path / "heads").exists()
