"""A registry over Keras Applications (constructor, preprocess_input, default size) and Keras model files.

Everything here that decides *which* features a configuration produces (its identity, its
fingerprint) works without TensorFlow; only build_backbone imports Keras.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import zipfile
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from .errors import UserError
from .images import DECODER, RESIZE_METHODS
from .params import Interval, Options, ParamError, check_params, define


class Application(NamedTuple):
    """A Keras Applications model: the submodule holding its preprocess_input, input size, feature width."""

    module: str
    size: int
    width: int


# Keras Applications by their Keras names. Widths are the pooled top features at the default alpha.
APPLICATIONS: dict[str, Application] = {
    "ConvNeXtTiny": Application("convnext", 224, 768),
    "ConvNeXtSmall": Application("convnext", 224, 768),
    "ConvNeXtBase": Application("convnext", 224, 1024),
    "ConvNeXtLarge": Application("convnext", 224, 1536),
    "ConvNeXtXLarge": Application("convnext", 224, 2048),
    "DenseNet121": Application("densenet", 224, 1024),
    "DenseNet169": Application("densenet", 224, 1664),
    "DenseNet201": Application("densenet", 224, 1920),
    "EfficientNetB0": Application("efficientnet", 224, 1280),
    "EfficientNetB1": Application("efficientnet", 240, 1280),
    "EfficientNetB2": Application("efficientnet", 260, 1408),
    "EfficientNetB3": Application("efficientnet", 300, 1536),
    "EfficientNetB4": Application("efficientnet", 380, 1792),
    "EfficientNetB5": Application("efficientnet", 456, 2048),
    "EfficientNetB6": Application("efficientnet", 528, 2304),
    "EfficientNetB7": Application("efficientnet", 600, 2560),
    "EfficientNetV2B0": Application("efficientnet_v2", 224, 1280),
    "EfficientNetV2B1": Application("efficientnet_v2", 240, 1280),
    "EfficientNetV2B2": Application("efficientnet_v2", 260, 1408),
    "EfficientNetV2B3": Application("efficientnet_v2", 300, 1536),
    "EfficientNetV2S": Application("efficientnet_v2", 384, 1280),
    "EfficientNetV2M": Application("efficientnet_v2", 480, 1280),
    "EfficientNetV2L": Application("efficientnet_v2", 480, 1280),
    "InceptionResNetV2": Application("inception_resnet_v2", 299, 1536),
    "InceptionV3": Application("inception_v3", 299, 2048),
    "MobileNet": Application("mobilenet", 224, 1024),
    "MobileNetV2": Application("mobilenet_v2", 224, 1280),
    "MobileNetV3Small": Application("mobilenet_v3", 224, 576),
    "MobileNetV3Large": Application("mobilenet_v3", 224, 960),
    "NASNetMobile": Application("nasnet", 224, 1056),
    "NASNetLarge": Application("nasnet", 331, 4032),
    "ResNet50": Application("resnet", 224, 2048),
    "ResNet101": Application("resnet", 224, 2048),
    "ResNet152": Application("resnet", 224, 2048),
    "ResNet50V2": Application("resnet_v2", 224, 2048),
    "ResNet101V2": Application("resnet_v2", 224, 2048),
    "ResNet152V2": Application("resnet_v2", 224, 2048),
    "VGG16": Application("vgg16", 224, 512),
    "VGG19": Application("vgg19", 224, 512),
    "Xception": Application("xception", 299, 2048),
}
ALPHA_MODELS = ("MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large")
POOLINGS = ("avg", "max")
define(
    backbone=[str],
    weights=[str],
    layer=[str, None],
    pooling=[Options(POOLINGS)],
    image_size=[Interval(32, 1024, integer=True), None],
    resize=[Options(tuple(RESIZE_METHODS))],
    alpha=[Interval(0.1, 2.0), None],
    keras_version=[str, None],
)
DEFAULT_BACKBONE = "MobileNetV2"
# weights="none" is a random initialisation: seeded, so that it is a reproducible configuration.
RANDOM_WEIGHTS_SEED = 0


def is_model_file(backbone: str) -> bool:
    """True when the backbone names a saved Keras model rather than a Keras Applications name."""
    return backbone.endswith((".keras", ".h5")) or os.sep in backbone or "/" in backbone


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    from .images import file_sha256

    return file_sha256(path)


def file_identity(path: str) -> str:
    """sha256 of a weights or model file (memoised per path, modification time and size)."""
    stat = os.stat(path)
    return "sha256:" + _file_sha256(path, stat.st_mtime_ns, stat.st_size)


def library_version(name: str) -> str:
    """An installed distribution's version without importing it ('' when absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def saved_input_size(path: Path) -> int | None:
    """The fixed square input size declared in a .keras file's config.json, read without Keras."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError):
        return None
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if shape and len(shape) == 4 and shape[1] and shape[1] == shape[2]:
                return int(shape[1])
    return None


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that decides the features: backbone, weights, layer, pooling, input size, resize."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    layer: str | None = None
    pooling: str = "avg"
    image_size: int | None = None
    resize: str = "bilinear"
    alpha: float | None = None
    # The Keras release whose ImageNet weights these are (Keras Applications names only). resolved()
    # takes the installed one; without Keras (a lean install running a cached conversion) the recorded
    # one stands, so a head's configuration still names its conversion and matches its features.
    keras_version: str | None = None

    def resolved(self) -> BackboneConfig:
        """Check every option (no TensorFlow needed) and fill in defaults; raise UserError if invalid."""
        check_params(asdict(self))
        backbone, weights, size = self.backbone, self.weights, self.image_size
        if is_model_file(backbone):
            path = Path(backbone).expanduser()
            if not path.is_file():
                raise UserError(
                    f"backbone file {path} does not exist; give a saved Keras model "
                    "(.keras) or a Keras Applications name (see `cnncodes backbones`)."
                )
            if self.alpha is not None:
                raise ParamError("{} applies to MobileNet models only, not to a model file.", "alpha")
            fixed = saved_input_size(path)
            if fixed and size not in (None, fixed):
                raise ParamError(f"{path} takes {fixed}x{fixed} images; drop {{}} {size}.", "image_size")
            return replace(self, backbone=str(path.resolve()), weights="file", image_size=fixed or size)
        if backbone not in APPLICATIONS:
            near = difflib.get_close_matches(backbone, APPLICATIONS, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise UserError(
                f"unknown backbone {backbone!r}.{hint} `cnncodes backbones` lists them; "
                "a path to a .keras file also works."
            )
        if self.alpha is not None and backbone not in ALPHA_MODELS:
            raise ParamError(f"{{}} applies to {', '.join(ALPHA_MODELS)}, not to {backbone}.", "alpha")
        if weights.lower() in ("imagenet", "none"):
            weights = weights.lower()
        elif Path(weights).expanduser().is_file():
            weights = str(Path(weights).expanduser().resolve())
        else:
            raise ParamError(
                f"weights file {weights} does not exist; use {{}} imagenet, none, "
                "or the path of a Keras weights file (.h5 / .weights.h5).",
                "weights",
            )
        keras_version = (library_version("keras") or self.keras_version or "") if weights == "imagenet" else None
        return replace(
            self, weights=weights, image_size=size or APPLICATIONS[backbone].size, keras_version=keras_version
        )

    def identity(self) -> dict[str, Any]:
        """What the features depend on, for a resolved config: the cache key's contents."""
        if self.weights == "file":
            backbone, weights = file_identity(self.backbone), "file"
        elif self.weights == "imagenet":
            backbone, weights = self.backbone, f"imagenet (keras {self.keras_version})"
        elif self.weights == "none":
            backbone, weights = self.backbone, f"none (random, seed {RANDOM_WEIGHTS_SEED})"
        else:
            backbone, weights = self.backbone, file_identity(self.weights)
        return {
            "backbone": backbone,
            "weights": weights,
            "layer": self.layer or "",
            "pooling": self.pooling,
            "image_size": self.image_size or 0,
            "resize": self.resize,
            "alpha": self.alpha or 0.0,
            "decoder": DECODER,
        }

    def fingerprint(self) -> str:
        """Short hash of the identity: equal exactly when the features are interchangeable."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def short_name(self) -> str:
        """A readable name for file names: backbone stem, layer, size."""
        stem = Path(self.backbone).stem if is_model_file(self.backbone) else self.backbone
        parts = [stem] + ([self.layer] if self.layer else []) + [str(self.image_size)]
        return "-".join(parts).replace(os.sep, "_")


@contextlib.contextmanager
def temp_seed(seed: int) -> Iterator[None]:
    """Seed Python, NumPy, TensorFlow and Keras inside the block only; the caller's random state comes back
    afterwards (as Hugging Face datasets' temp_seed), so building a seeded backbone never reseeds a run."""
    import random

    import keras
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from tensorflow.python.eager import context

    keys = ("global_random_seed", seed_generator.GLOBAL_SEED_GENERATOR)
    saved = (
        random.getstate(),
        np.random.get_state(),
        context.global_seed(),
        [global_state.get_global_attribute(k) for k in keys],
    )
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        context.set_global_seed(saved[2])
        for key, value in zip(keys, saved[3]):
            global_state.set_global_attribute(key, value)


def keras_weights_error(exc: Exception, config: BackboneConfig) -> UserError:
    """A clear message for ImageNet weights that could not be fetched (offline machines)."""
    keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    return UserError(
        f"could not load ImageNet weights for {config.backbone} ({type(exc).__name__}: {exc}). "
        f"Offline? Put the Keras weight file under {keras_home}/models (set KERAS_HOME), "
        "or pass --weights PATH, or --weights none for a random initialisation."
    )


@functools.cache
def preprocess_layer_class() -> type:
    """The Keras layer that applies an application's own preprocess_input (registered for loading)."""
    import keras

    @keras.saving.register_keras_serializable(package="cnncodes")
    class PreprocessInput(keras.layers.Layer):
        """keras.applications.<module>.preprocess_input as a layer, so saved models carry it."""

        def __init__(self, application: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.application = application
            self._function = getattr(keras.applications, application).preprocess_input

        def call(self, inputs: Any) -> Any:
            return self._function(inputs)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "application": self.application}

    return PreprocessInput


def _layer_error(model: Any, layer: str, source: str) -> UserError:
    names = [l.name for l in model.layers]
    near = difflib.get_close_matches(layer, names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return UserError(
        f"{source} has no layer {layer!r}.{hint} Its last layers are: "
        f"{', '.join(names[-8:])} (`cnncodes backbones --layers {source}` lists all)."
    )


# Inside loaded_once(): each backbone's whole model (and _full_model's other answers), by what decides its weights.
_LOADED: ContextVar[dict[tuple, tuple[Any, str, str | None, str]] | None] = ContextVar("cnncodes_loaded", default=None)


@contextlib.contextmanager
def loaded_once() -> Iterator[None]:
    """Within the block, each backbone is loaded (or built) once, and every model made from it shares its layers.

    A study lists a backbone's layers, times each layer's model, extracts them all and runs a model file's
    ImageNet checkout: without this it loaded the same weights up to six times. The models share weights, so
    nothing inside the block may train them (the study fine-tunes after it).
    """
    token = _LOADED.set({})
    try:
        yield
    finally:
        _LOADED.reset(token)


def _full_model(config: BackboneConfig) -> tuple[Any, str, str | None, str]:
    """The whole loaded or built model, its name for messages, its preprocess module and default layer."""
    loaded = _LOADED.get()
    key = (config.backbone, config.weights, config.image_size, config.alpha, config.keras_version)
    if loaded is None:
        return _load_full_model(config)
    if key not in loaded:
        loaded[key] = _load_full_model(config)
    return loaded[key]


def whole_model(config: BackboneConfig) -> Any:
    """The backbone's whole model: a model file as saved (its classifier included), a Keras Applications
    model without its top. Loaded once per backbone inside loaded_once()."""
    return _full_model(config)[0]


def _load_full_model(config: BackboneConfig) -> tuple[Any, str, str | None, str]:
    import keras

    if config.weights == "file":
        try:
            model = keras.saving.load_model(config.backbone, compile=False)
        except Exception as exc:  # Keras raises many kinds for unreadable files
            raise UserError(f"could not load Keras model {config.backbone}: {exc}") from None
        default = next(l.name for l in reversed(model.layers) if len(l.output.shape) == 4)
        source, module = Path(config.backbone).name, None
    else:
        app = APPLICATIONS[config.backbone]
        weights = {"imagenet": "imagenet", "none": None}.get(config.weights, config.weights)
        kwargs = {"alpha": config.alpha} if config.alpha is not None else {}
        try:
            with temp_seed(RANDOM_WEIGHTS_SEED) if weights is None else contextlib.nullcontext():
                model = getattr(keras.applications, config.backbone)(
                    include_top=False, weights=weights, input_shape=(config.image_size, config.image_size, 3), **kwargs
                )
        except ValueError as exc:
            raise UserError(f"{config.backbone} cannot be built this way: {exc}") from None
        except Exception as exc:  # download failures surface as URL, HTTP or OS errors
            raise keras_weights_error(exc, config) from None
        default = model.layers[-1].name
        source, module = config.backbone, app.module
    return model, source, module, default


def _base_model(config: BackboneConfig, layers: Sequence[str | None] | None = None) -> tuple[Any, str | None]:
    """The backbone's feature model (input to the chosen layer, or to each of layers) and its preprocess module."""
    import keras

    model, source, module, default = _full_model(config)
    outputs = []
    for name in [config.layer or default] if layers is None else [layer or default for layer in layers]:
        try:
            outputs.append(model.get_layer(name).output)
        except ValueError:
            raise _layer_error(model, name, source) from None
    return keras.Model(model.inputs, outputs[0] if layers is None else outputs, name="backbone"), module


def _pooled(x: Any, pooling: str, name: str, layer: str | None) -> Any:
    """A layer's output as (n, dim) features: global pooling of a 4-D output, a 2-D one as it is."""
    import keras

    if len(x.shape) == 4:
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        return pool(name=name)(x)
    if len(x.shape) != 2:
        raise UserError(
            f"layer {layer} has output shape {tuple(x.shape)}; pick a convolutional (4-D) or pooled (2-D) layer."
        )
    return x


def build_backbone(config: BackboneConfig, layers: Sequence[str | None] | None = None) -> Any:
    """Raw RGB pixels (0..255, image_size x image_size x 3) in, pooled float32 features out.

    With layers, one model with one pooled output per layer, in that order, from one forward pass
    (None stands for the default layer); without, the single output of config.layer.
    """
    import keras

    base, module = _base_model(config, layers)
    size = base.input_shape[1] or config.image_size
    if size is None:
        raise ParamError(f"{config.backbone} takes images of any size; give {{}} N.", "image_size")
    inputs = keras.Input((size, size, 3), name="pixels")
    x = preprocess_layer_class()(module, name="preprocess")(inputs) if module else inputs
    x = base(x)
    if layers is None:
        return keras.Model(inputs, _pooled(x, config.pooling, "pool", config.layer), name="cnncodes_backbone")
    outputs = [_pooled(out, config.pooling, f"pool_{k}", layer) for k, (out, layer) in enumerate(zip(x, layers))]
    return keras.Model(inputs, outputs, name="cnncodes_backbone")


def layer_names(config: BackboneConfig) -> list[tuple[str, str]]:
    """(name, output shape) of every layer of a backbone, for choosing --layer."""
    # every layer of the model, including those after the default one (a model file's pooled layer)
    model, _, _, _ = _full_model(config)
    return [(l.name, str(tuple(l.output.shape[1:]))) for l in model.layers]
