"""One deployable model: raw pixels in, class probabilities out (backbone + pooling + the fitted linear head).

The head becomes Keras layers as pipeline.keras_head folds it (the scikit-learn pipeline as Dense layers,
the calibration, the unknown score); this module puts the backbone (a branch per backbone of a multi-source
head) in front, writes the model file and its sidecar, and checks it against the head's own predictions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import PREDICTIONS_CSV, Predictions, atomic_path, read_predictions, sample_images
from .errors import UserError
from .heads import Head, load_head
from .keras_head import FORMATS, LINEAR_HEADS, calibrated_model, linear_weights, sidecar_entries
from .params import Interval, Options, ParamError, check_params, define
from .runtime import QUANTIZATIONS, convert_to_tflite, load_model_file, write_sidecar
from .sources import build_feature_model, head_sources

define(format=[Options(FORMATS)], quantize=[Options(QUANTIZATIONS)], verify=[Interval(0, 1_000_000, integer=True)])


def build_classifier(head: Head) -> Any:
    """The Keras model: pixels -> backbone (preprocessing inside) -> folded head -> calibrated probabilities,
    and the unknown score as a second output when the head has a detector."""
    clf = head.meta["options"]["clf"]
    if clf not in LINEAR_HEADS:
        raise UserError(
            f"head {head.folder} is a {clf} head; only linear heads export ({', '.join(LINEAR_HEADS)}). "
            "Fit one with `fit-head --clf logreg` or `--clf svm`."
        )
    import keras

    backbone = build_feature_model(head_sources(head.meta))  # one backbone, or a branch per backbone
    weights, bias, activation, l2 = linear_weights(head)
    x = backbone.output
    if l2:
        x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
    x = keras.layers.Dense(len(bias), name="head")(x)
    if activation == "log_sigmoid":
        x = keras.layers.Activation("log_sigmoid", name="calibration")(x)
    model = calibrated_model(backbone.input, backbone.output, x, head.temperature, head.detector, f"cnncodes_{clf}")
    model.get_layer("head").set_weights([weights, bias])
    return model


def export_head(
    head_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "keras",
    quantize: str = "none",
    verify: int = 64,
) -> tuple[Path, dict[str, float]]:
    """Write the head with its backbone as one .keras or .tflite file (+ sidecar JSON), then check it.

    The check runs the written file on up to `verify` of the head's test images (from its
    predictions.csv and dataset root: no cache needed) and compares with the head's own test
    probabilities and accuracy. Returns (path, check); check is empty when verify is 0.
    """
    check_params(dict(format=format, quantize=quantize, verify=verify))
    if format == "keras" and quantize != "none":
        raise ParamError("{} applies to {} tflite only.", "quantize", "format")
    if Path(out).suffix != f".{format}":
        raise ParamError(
            f"{{}} {out} does not end in .{format}; with {{}} {format} write a .{format} "
            "file (predict --model tells the format by the suffix).",
            "out",
            "format",
        )
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
    extra = {
        "head": str(Path(head_dir).resolve()),
        "format": format,
        "quantize": quantize,
        "kind": "exported head",
        "dataset_root": head.meta["dataset_root"],
        **sidecar_entries(head.temperature, head.detector),
    }
    write_sidecar(out, head.classes, config, extra)
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
    exported, scores, rows = [], [], []
    for batch in stream_features(files, model_runtime, resize):
        exported.append(batch.outputs[0])
        if len(batch.outputs) > 1:
            scores.append(batch.outputs[1].reshape(-1))
        rows += [row_of[f.relpath] for f in batch.files]
    a, b, truth = np.concatenate(exported), test.proba[rows], test.y_true[rows]
    check = {
        "images": len(a),
        "max_abs_prob_diff": float(np.abs(a - b).max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "export_accuracy": float((a.argmax(1) == truth).mean()),
        "head_accuracy": float((b.argmax(1) == truth).mean()),
        "n_test": len(test),
    }
    if scores:
        check.update(compare_unknown(head, np.concatenate(scores), [test.content_hash[r] for r in rows]))
    return check


def compare_unknown(head: Head, exported_scores: np.ndarray, hashes: list[str]) -> dict[str, float]:
    """The exported unknown decisions against the head's own (as predict makes them, from the cached features
    of the same images, every source of the head); empty when the head's caches are gone."""
    from .sources import cached_features

    known = cached_features(head_sources(head.meta), hashes, lambda message: None)
    if not all(h in known for h in hashes):
        return {}
    features = np.stack([known[h] for h in hashes])
    head_scores = head.unknown_scores(features, head.predict_proba(features))
    threshold = head.detector.threshold
    return {
        "unknown_agreement": float(np.mean((exported_scores > threshold) == (head_scores > threshold))),
        "max_abs_score_diff": float(np.abs(exported_scores - head_scores).max()),
        "unknown_export": int((exported_scores > threshold).sum()),
        "unknown_head": int((head_scores > threshold).sum()),
    }


def verify_lines(check: dict[str, float], asked: int) -> list[str]:
    """What export's check found, in words."""
    if not asked:
        return []
    if not check:
        return ["check skipped: none of the head's test images is on disk under its dataset root."]
    return [
        f"check on {check['images']} of the head's {check['n_test']} test images: max |p_export - p_head| "
        f"{check['max_abs_prob_diff']:.2e}, top-1 agreement {check['top1_agreement']:.4f}",
        f"test accuracy on those images: exported {check['export_accuracy']:.4f}, head {check['head_accuracy']:.4f}",
    ] + (
        [
            f"unknown decisions: exported and head agree on {check['unknown_agreement']:.4f} of them "
            f"({check['unknown_export']} vs {check['unknown_head']} unknown); max |score difference| "
            f"{check['max_abs_score_diff']:.2e}"
        ]
        if "unknown_agreement" in check
        else []
    )
