"""The fitted head as Keras layers, for every model file the project writes (export's and fine-tuning's).

The scikit-learn pipeline is folded into standard Keras layers: the L2 normalisation becomes
UnitNormalization; StandardScaler and the linear classifier become one Dense layer. Logistic
regression is softmax(Dense). The calibrated one-vs-rest SVM gives p_k = sigmoid(g_k) / sum_j
sigmoid(g_j), where g_k = -(a_k f_k + b_k) is linear in the features, so it is
softmax(log_sigmoid(Dense)).

Calibration divides those log-probabilities by the head's temperature before the softmax (a Rescaling
layer). A head with an unknown detector gets a second output, the unknown score of pipeline.openset, in
standard layers and ops: log(1 - max p) and the cosine distance to the k-th nearest stored training feature
(a Dense layer whose kernel is the training features, then top-k), each z-scored, summed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .heads import Head

FORMATS = ("keras", "tflite")  # the model files export writes
LINEAR_HEADS = ("logreg", "svm")  # the classifiers that fold into a Dense layer


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


def unknown_score_output(features: Any, probabilities: Any, detector: Any) -> Any:
    """The detector's score as Keras graph ops on the backbone's features and the calibrated probabilities."""
    import keras
    from keras import ops

    from .openset import CONFIDENCE_FLOOR

    def z(value: Any, signal: str) -> Any:
        mean, sd = detector.norm[signal]
        return (value - mean) / sd

    hesitation = ops.log(1.0 - ops.max(probabilities, axis=-1) + CONFIDENCE_FLOOR)
    score = z(hesitation, "msp")
    if detector.method != "msp":
        unit = keras.layers.UnitNormalization(axis=-1, name="unknown_l2")(features)
        cosines = keras.layers.Dense(len(detector.train_unit), use_bias=False, name="unknown_train_features")(unit)
        kth = ops.top_k(cosines, min(detector.k, len(detector.train_unit)), sorted=True)[0][:, -1]
        distance = z(1.0 - kth, "knn")
        score = distance if detector.method == "knn" else score + distance
    return keras.layers.Reshape((1,), name="unknown_score")(score)


def calibrated_model(
    inputs: Any, features: Any, log_probabilities: Any, temperature: float | None, detector: Any, name: str
) -> Any:
    """The Keras model from log-probabilities up to a constant (logits): softmax(logits / temperature), and the
    detector's unknown score (on the features) as a second output when there is a detector."""
    import keras

    x = log_probabilities
    if temperature is not None:
        x = keras.layers.Rescaling(1.0 / temperature, name="temperature")(x)
    probabilities = keras.layers.Activation("softmax", name="probabilities")(x)
    outputs = (
        probabilities if detector is None else [probabilities, unknown_score_output(features, probabilities, detector)]
    )
    model = keras.Model(inputs, outputs, name=name)
    if detector is not None and detector.method != "msp":
        model.get_layer("unknown_train_features").set_weights([detector.train_unit.T.astype(np.float32)])
    return model


def sidecar_entries(temperature: float | None, detector: Any) -> dict[str, Any]:
    """The sidecar keys of a model file from calibrated_model: its outputs, calibration and unknown rule."""
    extra: dict[str, Any] = {"outputs": ["probabilities"] + (["unknown_score"] if detector is not None else [])}
    if temperature is not None:
        extra["calibration"] = {"method": "temperature", "temperature": temperature}
    if detector is not None:
        extra["unknown"] = {
            "threshold": detector.threshold,
            "accept": detector.accept,
            "method": detector.method,
            "rule": "unknown when unknown_score > threshold",
        }
    return extra
