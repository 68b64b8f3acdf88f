"""Runs a built backbone on batches of uint8 images, through Keras or a converted TFLite model.

The rest of the code does not care which: both take uint8 (n, size, size, 3) and return the same
float32 (n, dim) features (TFLite float32 through XNNPACK is about twice as fast on a CPU).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from .artifacts import atomic_write, output_dir
from .backbones import BackboneConfig, build_backbone, preprocess_layer_class
from .errors import UserError, install_hint
from .params import Options, check_params, define

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "tflite")
define(runtime=[Options(RUNTIMES)])
QUANTIZATIONS = ("none", "float16", "dynamic")


class Runtime(Protocol):
    """A backbone ready to run: uint8 (n, size, size, 3) in, float32 (n, dim) out."""

    name: str
    image_size: int
    dim: int  # the (first) output's width; a multi-output runtime (several layers) also has `dims`
    # and returns a list of arrays, one per output, in the order of the layers it was built for

    def __call__(self, batch: np.ndarray) -> np.ndarray | list[np.ndarray]: ...


@contextmanager
def interrupt_held() -> Iterator[None]:
    """Hold a Ctrl-C that comes during the block and raise it (KeyboardInterrupt) when the block ends.

    TensorFlow calls back into Python from C++ (numpy's __array__ while it binds a tf.function's
    inputs) and turns an exception raised there into a TypeError: a Ctrl-C that lands inside a model
    call would end the command with a traceback instead of keeping what was finished. A second Ctrl-C
    raises at once. Only on the main thread, and only where Ctrl-C raises KeyboardInterrupt (a server or
    a caller with its own handler keeps it).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            raise KeyboardInterrupt  # replaces what TensorFlow made of a second Ctrl-C


class KerasRuntime:
    """The Keras model inside one traced tf.function (any batch size, one trace)."""

    name = "keras"

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.model = model
        self.image_size = int(model.input_shape[1])
        self.dims = [int(output.shape[-1]) for output in model.outputs]
        self.dim = self.dims[0]
        spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.uint8)
        self._run = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), input_signature=[spec])
        self(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))  # trace now, not in the first batch

    def __call__(self, batch: np.ndarray) -> np.ndarray | list[np.ndarray]:
        with interrupt_held():
            result = self._run(batch)
        return [r.numpy() for r in result] if isinstance(result, (list, tuple)) else result.numpy()


LITE_INSTALL = install_hint("lite")
TF_INSTALL = install_hint("cpu")


def require_tensorflow(what: str) -> None:
    """UserError naming the extra to install when TensorFlow/Keras is absent (a lean install)."""
    if find_spec("tensorflow") is None or find_spec("keras") is None:
        raise UserError(f"{what} needs TensorFlow, which is not installed: {TF_INSTALL}.")


def _interpreter_class() -> Any:
    """The standalone LiteRT interpreter (no TensorFlow import), else TensorFlow's own."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        if find_spec("tensorflow") is None:
            raise UserError(f"running a .tflite model needs the LiteRT interpreter: {LITE_INSTALL}.") from None
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


class TFLiteRuntime:
    """A .tflite model (uint8 pixels in) on the XNNPACK CPU kernels, with a resizable batch."""

    name = "tflite"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path, self.threads = Path(path), threads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            self._interpreter = _interpreter_class()(model_path=str(path), num_threads=threads or os.cpu_count())
        self._input = self._interpreter.get_input_details()[0]
        outputs = self._interpreter.get_output_details()
        if len(outputs) > 1 and self._interpreter.get_signature_list():
            # a SavedModel conversion's tensor order is arbitrary: its signature's output names give the layer
            # order (a frozen conversion, convert_to_tflite without signature, keeps the layers' order)
            named = self._interpreter.get_signature_runner().get_output_details()
            outputs = [named[name] for name in sorted(named)]
        self._outputs = [o["index"] for o in outputs]
        self.image_size = int(self._input["shape"][1])
        self.dims = [int(o["shape"][-1]) for o in outputs]
        self.dim = self.dims[0]
        self.input_dtype = self._input["dtype"]
        self._batch = -1

    def __call__(self, batch: np.ndarray) -> np.ndarray | list[np.ndarray]:
        if len(batch) != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input["index"], batch.astype(self.input_dtype, copy=False))
        self._interpreter.invoke()
        results = [self._interpreter.get_tensor(index).copy() for index in self._outputs]
        return results if len(results) > 1 else results[0]


def convert_to_tflite(
    model: Any,
    path: str | os.PathLike,
    quantize: str = "none",
    input_dtype: str = "uint8",
    *,
    signature: bool = True,
) -> Path:
    """Write a Keras model as a TFLite file (batch dimension resizable), atomically.

    With signature (what `export` writes for deployment), the model is saved as a SavedModel whose `serve`
    signature the file keeps, for LiteRT's signature runner. A bare tf.Module that tracks the model's
    variables saves in a third of the time Keras' ExportArchive takes. Without it (a backbone's cached
    conversion, read only by TFLiteRuntime), the traced function's variables are frozen into constants and
    converted with no SavedModel round trip: EfficientNet-Lite0 converts in 3.9 s instead of 11.1 s, the
    tiny test MobileNetV2 in 2.5 s instead of 9.1 s, with the same features, and the outputs stay in the
    order of the layers.
    """
    import tensorflow as tf

    size = int(model.input_shape[1])
    dtype = tf.uint8 if input_dtype == "uint8" else tf.float32
    path = Path(path)

    def serve(x: Any) -> Any:
        outputs = model(tf.cast(x, tf.float32), training=False)
        if isinstance(outputs, (list, tuple)):  # named, so TFLiteRuntime can restore a signature's order
            return {f"features_{k:03d}": output for k, output in enumerate(outputs)}
        return outputs

    module = tf.Module()
    module.model_variables = [getattr(v, "value", v) for v in model.variables]  # Keras variables wrap tf ones
    module.serve = tf.function(serve, input_signature=[tf.TensorSpec((None, size, size, 3), dtype)])
    with tempfile.TemporaryDirectory() as saved:
        if signature:
            tf.saved_model.save(module, saved, signatures={"serve": module.serve.get_concrete_function()})
            converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serve"])
        else:
            converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
            converter.experimental_lower_to_saved_model = False  # freeze the variables, skip the SavedModel
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        blob = converter.convert()
    from .artifacts import write_bytes

    write_bytes(path, blob)
    return path


def gpu_possible() -> bool:
    """False when no GPU can be visible to TensorFlow, decided from device files without importing it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if not os.path.exists("/proc"):  # not Linux (a Mac's Metal plugin, say): only TensorFlow can tell
        return True
    # NVIDIA's driver, ROCm's compute device, and WSL2's GPU paravirtualisation
    return bool(
        glob.glob("/dev/nvidia[0-9]*")
        or os.path.isdir("/proc/driver/nvidia/gpus")
        or os.path.exists("/dev/kfd")
        or os.path.exists("/dev/dxg")
    )


def has_gpu() -> bool:
    """True when TensorFlow sees a GPU (then Keras is the fast runtime); imports it only if one may be there."""
    if not gpu_possible() or find_spec("tensorflow") is None:
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def tflite_from_bytes(model: bytes, threads: int | None = None) -> TFLiteRuntime:
    """A TFLite runtime from the model's bytes, kept in this machine's temporary folder under their hash (for a
    worker that cannot read the driver's files)."""
    path = Path(tempfile.gettempdir()) / f"cnncodes-{hashlib.sha256(model).hexdigest()[:16]}.tflite"
    if not path.is_file() or path.stat().st_size != len(model):
        with atomic_write(path) as handle:  # several actors of one node may write it at once
            handle.write(model)
    return TFLiteRuntime(path, threads)


def tflite_path(config: BackboneConfig, folder: str | os.PathLike, layers: Sequence[str | None] | None = None) -> Path:
    """Where the converted backbone of this configuration is cached: named by its fingerprint
    (built for several layers: by the fingerprints of all of them, in order)."""
    if layers is None:
        return Path(folder) / f"{config.short_name}-{config.fingerprint()}.tflite"
    blob = json.dumps([replace(config, layer=layer).fingerprint() for layer in layers]).encode()
    return Path(folder) / (
        f"{replace(config, layer=None).short_name}-{len(layers)}layers-{hashlib.sha256(blob).hexdigest()[:16]}.tflite"
    )


def make_runtime(
    config: BackboneConfig,
    kind: str = "auto",
    *,
    tflite_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = logger.info,
    layers: Sequence[str | None] | None = None,
) -> Runtime:
    """The runtime for a resolved config: `auto` is TFLite on a machine without a GPU, Keras otherwise.

    With layers, one model with an output per layer (see build_backbone), converted and cached as one.
    """
    check_params(dict(runtime=kind))
    if kind == "keras" or kind == "auto" and has_gpu():
        require_tensorflow("--runtime keras")
        return KerasRuntime(build_backbone(config, layers))
    path = tflite_path(config, tflite_dir if tflite_dir is not None else output_dir("cache"), layers)
    if path.is_file():  # the cached conversion: no TensorFlow import from here on
        try:
            return TFLiteRuntime(path, threads)
        except (ValueError, RuntimeError):
            path.unlink(missing_ok=True)  # a damaged conversion: convert again
    require_tensorflow(f"converting {config.backbone} to TFLite (once, into {path})")
    model = build_backbone(config, layers)
    try:
        log(f"converting the backbone to TFLite once: {path}")
        convert_to_tflite(model, path, signature=False)
        return TFLiteRuntime(path, threads)
    except Exception as exc:  # the converter raises many kinds for unsupported ops
        if kind == "tflite":
            raise UserError(
                f"{config.backbone} could not be converted to TFLite ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); use --runtime keras."
            ) from None
        log(f"note: TFLite conversion failed ({type(exc).__name__}); using the Keras runtime.")
        return KerasRuntime(model)


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The JSON beside a model file that carries its class names and input settings."""
    from .artifacts import SIDECAR_SUFFIX

    return Path(model_path).with_name(Path(model_path).name + SIDECAR_SUFFIX)


def write_sidecar(model_path: Path, classes: list[str], backbone_config: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Class names, input size and resize filter beside the model file."""
    from .artifacts import write_json

    return write_json(
        sidecar_path(model_path),
        {
            "classes": classes,
            "image_size": backbone_config.get("image_size"),
            "resize": backbone_config.get("resize", "bilinear"),
            "backbone_config": backbone_config,
            **extra,
        },
    )


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a model file; UserError when the model or its sidecar is missing."""
    path, meta_path = Path(model_path), sidecar_path(model_path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a model written by `export` or `finetune`.")
    from .artifacts import read_json

    meta = read_json(meta_path, f"the class names travel in it beside {path.name} (written by export or finetune)")
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise UserError(f"{meta_path} has no list of classes; export the model again.")
    return meta


def load_model_file(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """A .keras or .tflite classifier and its sidecar, as (runtime producing probabilities, sidecar)."""
    path = Path(path)
    meta = read_sidecar(path)
    if path.suffix == ".tflite":
        return TFLiteRuntime(path), meta
    if path.suffix != ".keras":
        raise UserError(f"{path} is neither .keras nor .tflite.")
    require_tensorflow(f"loading {path.name} (a .keras model)")
    import keras

    preprocess_layer_class()  # registers our preprocessing layer for deserialisation
    return KerasRuntime(keras.saving.load_model(path, compile=False)), meta
