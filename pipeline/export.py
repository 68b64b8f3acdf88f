"""One deployable model: raw pixels in, class probabilities out (backbone + pooling + the fitted linear head).

The scikit-learn pipeline is folded into standard Keras layers: the L2 normalisation becomes
UnitNormalization; StandardScaler and the linear classifier become one Dense layer. Logistic
regression is softmax(Dense). The calibrated one-vs-rest SVM gives p_k = sigmoid(g_k) / sum_j
sigmoid(g_j), where g_k = -(a_k f_k + b_k) is linear in the features, so it is
softmax(log_sigmoid(Dense)).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import BackboneConfig, build_backbone
from .errors import UserError
from .heads import Head, load_head
from .params import Options, check_params
from .runtime import QUANTIZATIONS, convert_to_tflite

FORMATS = ("keras", "tflite")
LINEAR_HEADS = ("logreg", "svm")


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The JSON beside a model file that carries its class names and input settings."""
    return Path(model_path).with_name(Path(model_path).name + ".json")


def _linear_parts(head: Head) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(W, b, activation, l2) with probabilities = activation(l2(x) @ W + b), scaler folded in."""
    pipeline = head.model
    steps = dict(pipeline.steps)
    scaler, clf = steps["scale"], steps["clf"]
    mean = scaler.mean_ if scaler.with_mean else 0.0
    scale = scaler.scale_ if scaler.with_std else 1.0
    n_classes = len(head.classes)
    if head.meta["options"]["clf"] == "logreg":
        coef, intercept = clf.coef_.T, clf.intercept_
        if n_classes == 2:  # binary logistic regression: p1 = sigmoid(z) = softmax([0, z])[1]
            coef, intercept = np.hstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        activation = "softmax"
    else:
        calibrated = clf.calibrated_classifiers_[0]
        machines = calibrated.estimator.estimators_
        coef = np.stack([m.coef_.ravel() for m in machines], axis=1)
        intercept = np.array([m.intercept_[0] for m in machines])
        a = np.array([c.a_ for c in calibrated.calibrators])
        b = np.array([c.b_ for c in calibrated.calibrators])
        coef, intercept = -a * coef, -(a * intercept + b)  # g = -(a f + b)
        if n_classes == 2:  # one machine for class 1: p1 = sigmoid(g), p0 = sigmoid(-g)
            coef, intercept = np.hstack([-coef, coef]), np.concatenate([-intercept, intercept])
        activation = "log_sigmoid"
    weights = coef / np.asarray(scale)[:, None] if np.ndim(scale) else coef / scale
    bias = intercept - np.asarray(mean) @ weights if np.ndim(mean) else intercept
    return weights.astype(np.float32), bias.astype(np.float32), activation, "l2" in steps


def build_classifier(head: Head) -> Any:
    """The Keras model: pixels -> backbone (preprocessing inside) -> folded head -> probabilities."""
    clf = head.meta["options"]["clf"]
    if clf not in LINEAR_HEADS:
        raise UserError(f"head {head.folder} is a {clf} head; only linear heads export ({', '.join(LINEAR_HEADS)}). "
                        "Fit one with `fit-head --clf logreg` or `--clf svm`.")
    import keras

    config = BackboneConfig(**head.meta["backbone_config"]).resolved()
    head.check_features(config.identity(), head.meta["feature_dim"], f"backbone {config.backbone}")
    backbone = build_backbone(config)
    weights, bias, activation, l2 = _linear_parts(head)
    x = backbone.output
    if l2:
        x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
    x = keras.layers.Dense(len(bias), name="head")(x)
    if activation == "log_sigmoid":
        x = keras.layers.Activation("log_sigmoid", name="calibration")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    model = keras.Model(backbone.input, outputs, name=f"cnncodes_{clf}")
    model.get_layer("head").set_weights([weights, bias])
    return model


def write_sidecar(model_path: Path, classes: list[str], backbone_config: dict[str, Any],
                  extra: dict[str, Any]) -> Path:
    """Class names, input size and resize filter beside the model file."""
    path = sidecar_path(model_path)
    path.write_text(json.dumps({"classes": classes, "image_size": backbone_config.get("image_size"),
                                "resize": backbone_config.get("resize", "bilinear"),
                                "backbone_config": backbone_config, **extra}, indent=2))
    return path


def export_head(head_dir: str | os.PathLike, out: str | os.PathLike, *, format: str = "keras",
                quantize: str = "none") -> tuple[Path, Any]:
    """Write the head with its backbone as one .keras or .tflite file (+ sidecar JSON); return (path, model)."""
    check_params(dict(format=format, quantize=quantize),
                 {"format": [Options(FORMATS)], "quantize": [Options(QUANTIZATIONS)]})
    if format == "keras" and quantize != "none":
        raise UserError("--quantize applies to --format tflite only.")
    head = load_head(head_dir)
    model = build_classifier(head)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "keras":
        model.save(out)
    else:
        convert_to_tflite(model, out, quantize=quantize)
    config = {**head.meta["backbone_config"], "image_size": int(model.input_shape[1])}
    write_sidecar(out, head.classes, config, {"head": str(Path(head_dir).resolve()), "format": format,
                                              "quantize": quantize, "kind": "exported head"})
    return out, model


def load_model_file(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """A .keras or .tflite classifier and its sidecar, as (runtime producing probabilities, sidecar)."""
    from .backbones import preprocess_layer_class
    from .runtime import KerasRuntime, TFLiteRuntime

    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a model written by `export` or `finetune`.")
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: the class names travel in it beside {path.name}.")
    meta = json.loads(meta_path.read_text())
    if path.suffix == ".tflite":
        return TFLiteRuntime(path), meta
    if path.suffix != ".keras":
        raise UserError(f"{path} is neither .keras nor .tflite.")
    import keras

    preprocess_layer_class()  # registers our preprocessing layer for deserialisation
    return KerasRuntime(keras.saving.load_model(path, compile=False)), meta


def verify_export(model_runtime: Any, head: Head, max_images: int = 64) -> dict[str, float]:
    """Run the exported model on images of the head's dataset and compare with the head on cached features."""
    from .cache import load
    from .extract import stream_features
    from .images import ImageFile

    cache = load(head.meta["cache_path"])
    root = Path(cache.attrs["dataset_root"])
    rows = np.linspace(0, len(cache) - 1, min(max_images, len(cache))).astype(int)
    files = [ImageFile(root / cache.paths[i], cache.paths[i]) for i in rows if (root / cache.paths[i]).is_file()]
    if not files:
        return {}
    resize = head.meta["backbone_config"].get("resize", "bilinear")
    index = {p: i for i, p in zip(rows, (cache.paths[i] for i in rows))}
    exported, expected = [], []
    for batch in stream_features(files, model_runtime, resize):
        exported.append(batch.features)
        expected.append(head.predict_proba(cache.features[[index[f.relpath] for f in batch.files]]))
    a, b = np.concatenate(exported), np.concatenate(expected)
    return {"images": len(a), "max_abs_prob_diff": float(np.abs(a - b).max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}
