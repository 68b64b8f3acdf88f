"""One deployable model: raw pixels in, class probabilities out (backbone + pooling + the fitted linear head).

The scikit-learn pipeline is folded into standard Keras layers: the L2 normalisation becomes
UnitNormalization; StandardScaler and the linear classifier become one Dense layer. Logistic
regression is softmax(Dense). The calibrated one-vs-rest SVM gives p_k = sigmoid(g_k) / sum_j
sigmoid(g_j), where g_k = -(a_k f_k + b_k) is linear in the features, so it is
softmax(log_sigmoid(Dense)).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import PREDICTIONS_CSV, Predictions, atomic_path, read_predictions, sample_images
from .errors import UserError
from .heads import Head, load_head
from .params import Interval, Options, check_params
from .runtime import QUANTIZATIONS, convert_to_tflite, load_model_file, write_sidecar
from .sources import build_feature_model, head_sources

FORMATS = ("keras", "tflite")
LINEAR_HEADS = ("logreg", "svm")


def linear_weights(head: Head) -> tuple[np.ndarray, np.ndarray, str, bool]:
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

    backbone = build_feature_model(head_sources(head.meta))  # one backbone, or a branch per backbone
    weights, bias, activation, l2 = linear_weights(head)
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


def export_head(head_dir: str | os.PathLike, out: str | os.PathLike, *, format: str = "keras",
                quantize: str = "none", verify: int = 64) -> tuple[Path, dict[str, float]]:
    """Write the head with its backbone as one .keras or .tflite file (+ sidecar JSON), then check it.

    The check runs the written file on up to `verify` of the head's test images (from its
    predictions.csv and dataset root: no cache needed) and compares with the head's own test
    probabilities and accuracy. Returns (path, check); check is empty when verify is 0.
    """
    check_params(dict(format=format, quantize=quantize, verify=verify),
                 {"format": [Options(FORMATS)], "quantize": [Options(QUANTIZATIONS)],
                  "verify": [Interval(0, 1_000_000, integer=True)]})
    if format == "keras" and quantize != "none":
        raise UserError("--quantize applies to --format tflite only.")
    if Path(out).suffix != f".{format}":
        raise UserError(f"--out {out} does not end in .{format}; with --format {format} write a .{format} "
                        f"file (predict --model tells the format by the suffix).")
    head = load_head(head_dir)
    test = read_predictions(Path(head_dir) / PREDICTIONS_CSV) if verify else None
    model = build_classifier(head)
    out = Path(out)
    if format == "keras":
        with atomic_path(out) as tmp:
            model.save(tmp)
    else:
        convert_to_tflite(model, out, quantize=quantize)
    config = {**head.meta["backbone_config"], "image_size": int(model.input_shape[1])}
    write_sidecar(out, head.classes, config, {"head": str(Path(head_dir).resolve()), "format": format,
                                              "quantize": quantize, "kind": "exported head",
                                              "dataset_root": head.meta["dataset_root"]})
    check = verify_export(load_model_file(out)[0], head, test, verify) if test is not None else {}
    return out, check


def verify_export(model_runtime: Any, head: Head, test: Predictions, max_images: int = 64) -> dict[str, float]:
    """Run the exported model on the head's test images; compare probabilities and accuracy with the head's."""
    from .stream import stream_features

    files = sample_images(test, head.meta["dataset_root"], max_images)
    if not files:
        return {}
    row_of = {p: i for i, p in enumerate(test.paths)}
    resize = head_sources(head.meta)[0].identity["resize"]
    exported, rows = [], []
    for batch in stream_features(files, model_runtime, resize):
        exported.append(batch.features)
        rows += [row_of[f.relpath] for f in batch.files]
    a, b, truth = np.concatenate(exported), test.proba[rows], test.y_true[rows]
    return {"images": len(a), "max_abs_prob_diff": float(np.abs(a - b).max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "export_accuracy": float((a.argmax(1) == truth).mean()),
            "head_accuracy": float((b.argmax(1) == truth).mean()), "n_test": len(test)}


def verify_lines(check: dict[str, float], asked: int) -> list[str]:
    """What export's check found, in words."""
    if not asked:
        return []
    if not check:
        return ["check skipped: none of the head's test images is on disk under its dataset root."]
    return [f"check on {check['images']} of the head's {check['n_test']} test images: max |p_export - p_head| "
            f"{check['max_abs_prob_diff']:.2e}, top-1 agreement {check['top1_agreement']:.4f}",
            f"test accuracy on those images: exported {check['export_accuracy']:.4f}, "
            f"head {check['head_accuracy']:.4f}"]
