"""The lean runtime: once a backbone's TFLite conversion is cached, extract and predict (and the
runtime functions a server uses) run on the LiteRT interpreter without importing TensorFlow; what
a lean install (no TensorFlow, or no LiteRT) says; GPU detection without TensorFlow; the console
command.

Each command runs in a fresh interpreter, which then prints the top-level modules it imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from model_fixtures import CLASSES3, make_pattern_dataset, quiet, save_small_cnn

import pipeline.runtime as runtime_module
from pipeline.backbones import BackboneConfig
from pipeline.runtime import TFLiteRuntime, gpu_possible, tflite_path, write_sidecar

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras")
NO_TF = ("tensorflow", "keras", "tensorboard")  # a lean install: none of these can be imported
NO_RUNTIME = NO_TF + ("ai_edge_litert",)
# Runs in a fresh interpreter: packages named in BLOCKED cannot be imported (as if not installed),
# then CODE runs; the exit code and the imported top-level modules are printed last.
DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
for name in {blocked!r}:
    sys.modules[name] = None
code = 0
try:
{code}
except SystemExit as exit:
    code = exit.code or 0
print("EXIT " + str(code))
print("MODULES " + json.dumps(sorted({{m.split(".")[0] for m, v in sys.modules.items() if v is not None}})))
"""

pytestmark = pytest.mark.slow  # one TFLite conversion of a small CNN, then a few fresh interpreters


class Ran:
    """What a fresh interpreter did: exit code, output, imported top-level modules."""

    def __init__(self, done: subprocess.CompletedProcess) -> None:
        lines = done.stdout.splitlines()
        assert lines and lines[-1].startswith("MODULES "), done.stdout[-2000:] + done.stderr[-3000:]
        self.modules = set(json.loads(lines[-1][len("MODULES ") :]))
        self.code = int(lines[-2].split()[1])
        self.out = "\n".join(lines[:-2])
        self.err = done.stderr


def run_fresh(code: str, blocked: tuple[str, ...] = ()) -> Ran:
    """Run python code in a fresh interpreter from the project root, as on a CPU machine (every GPU hidden)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    body = "\n".join("    " + line for line in code.strip().splitlines())
    done = subprocess.run(
        [sys.executable, "-c", DRIVER.format(root=str(ROOT), blocked=list(blocked), code=body)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Ran(done)


def run_cli(args: list[str], blocked: tuple[str, ...] = ()) -> Ran:
    """`python cli.py ARGS` in a fresh interpreter."""
    return run_fresh(f"from cli import app\napp({[str(a) for a in args]!r}, prog_name='cnncodes')", blocked)


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CNN model file converted to TFLite once (cached beside its feature cache), a logreg
    head on that cache, new images, and a .tflite model file with its sidecar."""
    pytest.importorskip(
        "ai_edge_litert", reason="the LiteRT interpreter is the lite extra: pip install 'cnncodes[lite]'"
    )
    from pipeline.extract import extract
    from pipeline.heads import fit_head

    root = tmp_path_factory.mktemp("lean")
    config = BackboneConfig(str(save_small_cnn(root / "small_cnn.keras"))).resolved()
    data = make_pattern_dataset(root / "data")
    summary = extract(data, config, cache=root / "caches" / "cnn.h5", runtime="tflite", progress=False, log=quiet())
    assert summary.runtime == "tflite" and summary.n_new == 3 * 8
    converted = tflite_path(config, root / "caches")
    assert converted.is_file()
    head = fit_head(summary.cache_path, "logreg", out=root / "head", n_jobs=1, log=quiet()).folder
    # A pixels-in model file as `export` writes one (its outputs stand for class probabilities here:
    # what is tested is which interpreter runs it, not what it computes).
    model = root / "model.tflite"
    shutil.copy(converted, model)
    width = TFLiteRuntime(model).dim
    write_sidecar(model, [f"class{k:02d}" for k in range(width)], dict(config.__dict__), {})
    return {
        "data": data,
        "new": make_pattern_dataset(root / "new", seed=1),
        "head": head,
        "model": model,
        "backbone": Path(config.backbone),
        "caches": root / "caches",
    }


def assert_no_tensorflow(ran: Ran) -> None:
    assert ran.code == 0, ran.out + ran.err[-3000:]
    assert not set(HEAVY) & ran.modules, sorted(set(HEAVY) & ran.modules)
    assert "ai_edge_litert" in ran.modules  # and the standalone interpreter ran the model


# -- no TensorFlow import once the conversion is cached ----------------------------------------


@pytest.mark.parametrize("kind, blocked", [("tflite", ()), ("auto", NO_TF)], ids=["full-install", "lean-install"])
def test_extract_with_cached_conversion_imports_no_tensorflow(lean, kind: str, blocked: tuple[str, ...]) -> None:
    cache = lean["caches"] / f"new-{kind}-{len(blocked)}.h5"  # beside the cached conversion, cold itself
    ran = run_cli(
        ["extract", lean["new"], "--backbone", lean["backbone"], "--cache", cache, "--runtime", kind, "--no-progress"],
        blocked,
    )
    assert_no_tensorflow(ran)
    assert "new 24" in ran.out and "with tflite" in ran.out, ran.out
    assert "converting" not in ran.out + ran.err
    from pipeline.cache import load

    assert set(load(cache).runtime) == {"tflite"}


@pytest.mark.parametrize("blocked", [(), NO_TF], ids=["full-install", "lean-install"])
def test_predict_head_on_new_images_imports_no_tensorflow(lean, blocked: tuple[str, ...]) -> None:
    ran = run_cli(["predict", lean["new"], "--head", lean["head"], "--runtime", "auto"], blocked)
    assert_no_tensorflow(ran)
    assert "24 images classified, 0 skipped" in ran.out, ran.out
    assert re.search(rf"img_00\.png: ({'|'.join(CLASSES3)}) [01]\.\d{{3}}", ran.out), ran.out


@pytest.mark.parametrize("blocked", [(), NO_TF], ids=["full-install", "lean-install"])
def test_predict_model_file_imports_no_tensorflow(lean, blocked: tuple[str, ...]) -> None:
    ran = run_cli(["predict", lean["data"], "--model", lean["model"], "--top-k", "2"], blocked)
    assert_no_tensorflow(ran)
    assert "24 images classified, 0 skipped" in ran.out and "class" in ran.out, ran.out


def test_what_a_server_loads_imports_no_tensorflow(lean) -> None:
    """serve builds on load_classifier (load_model_file for a .tflite file, make_runtime for a head)."""
    ran = run_fresh(f"""
import numpy as np
from pipeline.predict import load_classifier
from pipeline.runtime import has_gpu
pixels = np.zeros((2, 32, 32, 3), np.uint8)
for kind, path in (("model", {str(lean["model"])!r}), ("head", {str(lean["head"])!r})):
    classifier = load_classifier(**{{kind: path}}, log=print)
    print(kind, classifier.predict_proba(pixels).shape, len(classifier.classes))
print("gpu", has_gpu())
""")
    assert_no_tensorflow(ran)
    assert "model (2, 24) 24" in ran.out and "head (2, 3) 3" in ran.out and "gpu False" in ran.out, ran.out
    assert "converting" not in ran.out


@pytest.mark.integration
def test_lean_install_runs_a_head_on_keras_applications_imagenet_weights(tmp_path: Path, mobilenet_keras_home) -> None:
    """MobileNet 0.25 with ImageNet weights (KERAS_HOME): its features are keyed by the Keras release that
    made them. A lean install has no Keras to ask, yet finds the head's cached conversion and runs it."""
    made, cache, head = mobilenet_keras_home.done, mobilenet_keras_home.cache, tmp_path / "head"
    assert made.returncode == 0 and "with tflite" in made.stdout, made.stdout + made.stderr[-3000:]
    assert len(list(cache.parent.glob("MobileNet-*.tflite"))) == 1  # the conversion, cached beside the cache
    from pipeline.heads import fit_head

    fit_head(cache, "logreg", out=head, n_jobs=1, log=quiet())  # here: it reads the cache, not KERAS_HOME
    no_keras_metadata = "import pipeline.backbones\npipeline.backbones.library_version = lambda name: ''\n"
    new = make_pattern_dataset(tmp_path / "new", seed=1)
    ran = run_fresh(
        no_keras_metadata + f"from cli import app\napp({['predict', str(new), '--head', str(head)]!r}, "
        "prog_name='cnncodes')",
        NO_TF,
    )
    assert_no_tensorflow(ran)
    assert "24 images classified, 0 skipped" in ran.out and "converting" not in ran.out, ran.out


# -- a lean install says what to install ---------------------------------------------------------


def test_lean_install_without_a_cached_conversion_asks_for_tensorflow(lean, tmp_path: Path) -> None:
    ran = run_cli(
        ["extract", lean["new"], "--backbone", lean["backbone"], "--cache", tmp_path / "c.h5", "--runtime", "auto"],
        NO_TF,
    )
    assert ran.code == 2, ran.out + ran.err
    assert "error: converting" in ran.err and "needs TensorFlow" in ran.err and "pip install 'cnncodes[cpu]'" in ran.err
    assert "Traceback" not in ran.err
    assert not (tmp_path / "c.h5").exists()


def test_lean_install_keras_runtime_asks_for_tensorflow(lean, tmp_path: Path) -> None:
    ran = run_cli(
        ["extract", lean["new"], "--backbone", lean["backbone"], "--cache", tmp_path / "c.h5", "--runtime", "keras"],
        NO_TF,
    )
    assert ran.code == 2 and "--runtime keras needs TensorFlow" in ran.err and "'cnncodes[cpu]'" in ran.err, ran.err


def test_without_litert_or_tensorflow_a_tflite_model_asks_for_the_lite_extra(lean) -> None:
    ran = run_cli(["predict", lean["data"], "--model", lean["model"]], NO_RUNTIME)
    assert ran.code == 2, ran.out + ran.err
    assert "LiteRT interpreter" in ran.err and "pip install 'cnncodes[lite]'" in ran.err and "Traceback" not in ran.err


# -- GPU detection without TensorFlow ----------------------------------------------------------


@pytest.mark.parametrize("devices", ["-1", "", " "])
def test_cuda_visible_devices_hiding_every_gpu_means_no_gpu(monkeypatch: pytest.MonkeyPatch, devices: str) -> None:
    monkeypatch.setattr(runtime_module.glob, "glob", lambda pattern: ["/dev/nvidia0"])  # even with a driver
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", devices)
    assert gpu_possible() is False


def test_gpu_possible_reads_the_device_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    present: set[str] = {"/proc"}
    monkeypatch.setattr(runtime_module.glob, "glob", lambda pattern: sorted(p for p in present if "nvidia" in p))
    monkeypatch.setattr(runtime_module.os.path, "exists", lambda p: p in present)
    monkeypatch.setattr(runtime_module.os.path, "isdir", lambda p: p in present)
    assert gpu_possible() is False  # a Linux machine without GPU device files
    for device in ("/dev/nvidia0", "/proc/driver/nvidia/gpus", "/dev/kfd", "/dev/dxg"):
        present.add(device)
        assert gpu_possible() is True, device
        present.discard(device)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    present.discard("/proc")  # not Linux: only TensorFlow can tell
    assert gpu_possible() is True


def test_has_gpu_imports_no_tensorflow_on_a_machine_without_gpu() -> None:
    ran = run_fresh("from pipeline.runtime import has_gpu\nprint('gpu', has_gpu())")
    assert ran.code == 0 and "gpu False" in ran.out
    assert "tensorflow" not in ran.modules


# -- the console command -----------------------------------------------------------------------


def command_names(help_text: str) -> list[str]:
    """The command names of a Typer --help screen (the first word of each row of its Commands box)."""
    box = help_text.split("Commands", 1)[1]
    return re.findall(r"^\W+\s([a-z][a-z-]*)\s{2,}\S", box, flags=re.M)


def test_console_command_lists_the_same_commands_as_cli_py(tmp_path: Path) -> None:
    try:
        metadata.distribution("cnncodes")
    except metadata.PackageNotFoundError:
        pytest.skip("cnncodes is not installed in this environment (pip install -e .)")
    script = Path(sys.executable).with_name("cnncodes")
    assert script.is_file(), f"{script} missing: [project.scripts] did not install the console command"
    env = {**os.environ, "COLUMNS": "200"}
    # from another folder: the command must find cli.py through the installed package, not the cwd
    installed = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    local = subprocess.run(
        [sys.executable, "cli.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert installed.returncode == local.returncode == 0, installed.stderr + local.stderr
    assert "Usage: cnncodes" in installed.stdout
    from cli import app

    registered = [c.name for c in app.registered_commands]
    assert len(registered) >= 7
    assert command_names(installed.stdout) == command_names(local.stdout) == registered
