"""Runs a built backbone on batches of uint8 images, through Keras or a converted TFLite model.

The rest of the code does not care which: both take uint8 (n, size, size, 3) and return the same
float32 (n, dim) features (TFLite float32 through XNNPACK is about twice as fast on a CPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .backbones import BackboneConfig, build_backbone, preprocess_layer_class
from .errors import UserError

RUNTIMES = ("auto", "keras", "tflite")
QUANTIZATIONS = ("none", "float16", "dynamic")


class Runtime(Protocol):
    """A backbone ready to run: uint8 (n, size, size, 3) in, float32 (n, dim) out."""

    name: str
    image_size: int
    dim: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class KerasRuntime:
    """The Keras model inside one traced tf.function (any batch size, one trace)."""

    name = "keras"

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.model = model
        self.image_size = int(model.input_shape[1])
        self.dim = int(model.output_shape[-1])
        spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.uint8)
        self._run = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False),
                                input_signature=[spec])
        self(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))  # trace now, not in the first batch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch).numpy()


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # the successor package, when installed
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


class TFLiteRuntime:
    """A .tflite model (uint8 pixels in) on the XNNPACK CPU kernels, with a resizable batch."""

    name = "tflite"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            self._interpreter = _interpreter_class()(model_path=str(path), num_threads=threads or os.cpu_count())
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.image_size = int(self._input["shape"][1])
        self.dim = int(self._output["shape"][-1])
        self.input_dtype = self._input["dtype"]
        self._batch = -1

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input["index"], batch.astype(self.input_dtype, copy=False))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()


def convert_to_tflite(model: Any, path: str | os.PathLike, quantize: str = "none",
                      input_dtype: str = "uint8") -> Path:
    """Write a Keras model as a TFLite file (batch dimension resizable), atomically.

    The model is exported as a SavedModel endpoint first: converting a traced function directly
    leaves uninitialised resource variables in the TFLite graph (NaN features).
    """
    import keras
    import tensorflow as tf

    size = int(model.input_shape[1])
    dtype = tf.uint8 if input_dtype == "uint8" else tf.float32
    path = Path(path)
    with tempfile.TemporaryDirectory() as saved:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda x: model(tf.cast(x, tf.float32), training=False),
                             input_signature=[tf.TensorSpec((None, size, size, 3), dtype)])
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serve"])
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        blob = converter.convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return path


def has_gpu() -> bool:
    """True when TensorFlow sees a GPU (then Keras is the fast runtime)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def tflite_path(config: BackboneConfig, folder: str | os.PathLike) -> Path:
    """Where the converted backbone of this configuration is cached: named by its fingerprint."""
    return Path(folder) / f"{config.short_name}-{config.fingerprint()}.tflite"


def make_runtime(config: BackboneConfig, kind: str = "auto", *, tflite_dir: str | os.PathLike = "cache",
                 threads: int | None = None, log: Callable[[str], None] = print) -> Runtime:
    """The runtime for a resolved config: `auto` is TFLite on a machine without a GPU, Keras otherwise."""
    if kind not in RUNTIMES:
        raise UserError(f"--runtime is {kind!r}; it must be one of {', '.join(RUNTIMES)}.")
    if kind == "keras" or kind == "auto" and has_gpu():
        return KerasRuntime(build_backbone(config))
    path = tflite_path(config, tflite_dir)
    if path.is_file():
        try:
            return TFLiteRuntime(path, threads)
        except (ValueError, RuntimeError):
            path.unlink(missing_ok=True)  # a damaged conversion: convert again
    model = build_backbone(config)
    try:
        log(f"converting the backbone to TFLite once: {path}")
        convert_to_tflite(model, path)
        return TFLiteRuntime(path, threads)
    except Exception as exc:  # the converter raises many kinds for unsupported ops
        if kind == "tflite":
            raise UserError(f"{config.backbone} could not be converted to TFLite ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); use --runtime keras.") from None
        log(f"note: TFLite conversion failed ({type(exc).__name__}); using the Keras runtime.")
        return KerasRuntime(model)


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The JSON beside a model file that carries its class names and input settings."""
    return Path(model_path).with_name(Path(model_path).name + ".json")


def write_sidecar(model_path: Path, classes: list[str], backbone_config: dict[str, Any],
                  extra: dict[str, Any]) -> Path:
    """Class names, input size and resize filter beside the model file."""
    path = sidecar_path(model_path)
    path.write_text(json.dumps({"classes": classes, "image_size": backbone_config.get("image_size"),
                                "resize": backbone_config.get("resize", "bilinear"),
                                "backbone_config": backbone_config, **extra}, indent=2))
    return path


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a model file; UserError when the model or its sidecar is missing."""
    path, meta_path = Path(model_path), sidecar_path(model_path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a model written by `export` or `finetune`.")
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: the class names travel in it beside {path.name}.")
    return json.loads(meta_path.read_text())


def load_model_file(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """A .keras or .tflite classifier and its sidecar, as (runtime producing probabilities, sidecar)."""
    path = Path(path)
    meta = read_sidecar(path)
    if path.suffix == ".tflite":
        return TFLiteRuntime(path), meta
    if path.suffix != ".keras":
        raise UserError(f"{path} is neither .keras nor .tflite.")
    import keras

    preprocess_layer_class()  # registers our preprocessing layer for deserialisation
    return KerasRuntime(keras.saving.load_model(path, compile=False)), meta
