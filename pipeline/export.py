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

from .backbones import BackboneConfig, build_backbone
from .errors import UserError
from .heads import Head, linear_weights, load_head
from .params import Options, check_params
from .runtime import QUANTIZATIONS, convert_to_tflite, write_sidecar

FORMATS = ("keras", "tflite")
LINEAR_HEADS = ("logreg", "svm")


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
                quantize: str = "none") -> tuple[Path, Any]:
    """Write the head with its backbone as one .keras or .tflite file (+ sidecar JSON); return (path, model)."""
    check_params(dict(format=format, quantize=quantize),
                 {"format": [Options(FORMATS)], "quantize": [Options(QUANTIZATIONS)]})
    if format == "keras" and quantize != "none":
        raise UserError("--quantize applies to --format tflite only.")
    if Path(out).suffix != f".{format}":
        raise UserError(f"--out {out} does not end in .{format}; with --format {format} write a .{format} "
                        f"file (predict --model tells the format by the suffix).")
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
