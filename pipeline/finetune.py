"""The Keras end-to-end stage: the backbone's upper layers and a new head, on fit-head's split.

Recipe (the Keras transfer-learning guide): BatchNorm stays in inference mode. In Keras 3 the
outer call's `training` flag reaches every layer of a functional model, whatever a nested call
said, so what keeps BatchNorm in inference mode is freezing it: a non-trainable BatchNormalization
layer uses its moving statistics and does not update them. Every BatchNorm layer of the backbone,
at any depth, stays frozen in both phases. Phase 1 trains the head alone
(or starts from the logistic regression fitted on the cached features: a linear probe, then
fine-tuning). Phase 2 unfreezes the top layers and trains at a low learning rate. Early stopping
on validation loss; the best weights are kept, and written whenever they improve. With them, a
temperature and an unknown detector are fitted on the validation part (as fit-head's on its out-of-fold
predictions), and the saved model returns calibrated probabilities and the unknown score, as export's do.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifacts import (
    HISTORY_CSV,
    LEARNING_CURVES_PNG,
    PREDICTIONS_CSV,
    RUN_JSON,
    RUN_MODEL,
    UNKNOWN_NPZ,
    atomic_path,
    atomic_write,
    chain_fingerprint,
    output_dir,
    predictions_from_rows,
    staged_folder,
    write_json,
    write_predictions,
)
from .backbones import BackboneConfig, build_backbone, temp_seed
from .cache import load
from .calibration import apply_temperature
from .errors import UserError
from .extract import extract
from .heads import NEAR_DUPLICATES, calibration_metrics, fit_unknown, load_head, near_duplicate_hash_pairs, rows_digest
from .images import decode_image
from .keras_head import calibrated_model, linear_weights, sidecar_entries
from .metrics import classification_metrics, save_metrics
from .openset import DEFAULT_ACCEPT, save_detector
from .params import Interval, Matches, Options, ParamError, as_number, check_params, define
from .plots import new_figure, save_figure, write_confusion_png
from .runtime import write_sidecar
from .splits import finetune_parts, rows_of_hash_pairs

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "light", "strong")
OPTIMIZERS = ("adam", "sgd")
HISTORY_FIELDS = ["phase", "epoch", "seconds", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
MEMORY_CACHE_BYTES = 1 << 30  # decoded images are kept in memory across epochs below this size
define(
    epochs=[Interval(0, 1000, integer=True)],
    head_epochs=[Interval(0, 1000, integer=True), None],
    lr=[Interval(1e-8, 1.0)],
    head_lr=[Interval(1e-8, 1.0)],
    optimizer=[Options(OPTIMIZERS)],
    augment=[Options(AUGMENTATIONS)],
    dropout=[Interval(0.0, 0.95)],
    patience=[Interval(1, 1000, integer=True)],
    val_size=[Interval(0.01, 0.9)],
    unfreeze=[Options(("all",)), Matches(r"[0-9]+", "a number of layers")],
)


def augmentation(kind: str) -> list[Any]:
    """Keras preprocessing layers: active while training only, never at evaluation."""
    import keras

    if kind == "none":
        return []
    strong = kind == "strong"
    return [
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.15 if strong else 0.05),
        keras.layers.RandomTranslation(0.1 if strong else 0.05, 0.1 if strong else 0.05),
        keras.layers.RandomZoom(0.2 if strong else 0.1),
        keras.layers.RandomContrast(0.3 if strong else 0.1),
    ]


def build_model(
    config: BackboneConfig, n_classes: int, augment: str = "light", dropout: float = 0.2, init_head: Any = None
) -> Any:
    """pixels -> [augmentation] -> backbone (preprocessing, chosen layer, pooling) -> [L2] -> dropout -> softmax."""
    import keras

    features = build_backbone(config)
    size = int(features.input_shape[1])
    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs
    if augment != "none":
        x = keras.Sequential(augmentation(augment), name="augmentation")(x)
    x = features(x)
    init = None
    if init_head is not None:
        weights, bias, activation, l2 = linear_weights(init_head)
        if activation != "softmax":
            raise ParamError(
                f"{{}} {init_head.folder} is not a logistic-regression head; "
                "fit one with `cnncodes fit-head --clf logreg`.",
                "init_head",
            )
        if l2:
            x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
        init = [weights, bias]
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name="cnncodes_finetune")
    if init is not None:
        model.get_layer("classifier").set_weights(init)
    return model


def all_layers(layer: Any) -> list[Any]:
    """Every layer inside a model, nested sub-models included."""
    found = []
    for inner in getattr(layer, "layers", []):
        found += [inner, *all_layers(inner)]
    return found


def backbone_base(model: Any) -> Any:
    """The backbone's own layers (inside the features sub-model)."""
    return model.get_layer("cnncodes_backbone").get_layer("backbone")


def set_trainable(model: Any, unfreeze: str | int, from_layer: str | None = None) -> int:
    """Phase 2 flags: the top layers of the backbone trainable, BatchNorm frozen. Returns how many train."""
    import keras

    base = backbone_base(model)
    base.trainable = True
    names = [layer.name for layer in base.layers]
    if from_layer is not None:
        if from_layer not in names:
            raise UserError(
                f"--from-layer {from_layer!r} is not a layer of the backbone "
                f"(its last layers: {', '.join(names[-6:])})."
            )
        first = names.index(from_layer)
    elif unfreeze == "all":
        first = 0
    else:
        first = max(0, len(names) - int(unfreeze))
    for k, layer in enumerate(base.layers):
        layer.trainable = k >= first
    for layer in all_layers(base):  # also inside nested blocks of a model file
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return sum(1 for layer in base.layers if layer.trainable and layer.weights)


def freeze_backbone(model: Any) -> None:
    """Phase 1 flags: the whole backbone frozen, only the head trains."""
    backbone_base(model).trainable = False


def image_dataset(
    paths: list[str], labels: np.ndarray, size: int, resize: str, batch_size: int, shuffle: bool, seed: int
) -> Any:
    """tf.data: decode (as extract does) in parallel, keep decoded images in memory when small, batch, prefetch."""
    import tensorflow as tf

    def decode(path: bytes) -> np.ndarray:
        return decode_image(path.decode(), size, resize)

    ds = tf.data.Dataset.from_tensor_slices((paths, labels.astype(np.int32)))
    ds = ds.map(
        lambda p, y: (tf.ensure_shape(tf.numpy_function(decode, [p], tf.uint8), (size, size, 3)), y),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if len(paths) * size * size * 3 < MEMORY_CACHE_BYTES:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _optimizer(name: str, lr: float) -> Any:
    import keras

    return keras.optimizers.Adam(lr) if name == "adam" else keras.optimizers.SGD(lr, momentum=0.9)


class _Interrupt:
    """Ctrl-C during training: stop after the current batch (and remember it)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _callbacks(
    model: Any,
    phase: int,
    history: list[dict],
    best: dict,
    checkpoint: Path,
    interrupt: _Interrupt,
    patience: int,
    log: Callable[[str], None],
) -> list[Any]:
    import keras

    class Progress(keras.callbacks.Callback):
        """Per-epoch line, history row, best-weights checkpoint, Ctrl-C check after every batch."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if interrupt.requested:
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            row = {
                "phase": phase,
                "epoch": len(history) + 1,
                "seconds": time.perf_counter() - self.started,
                **{k: float(logs[k]) for k in HISTORY_FIELDS[3:7] if k in logs},
                "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            }
            history.append(row)
            improved = row.get("val_loss", np.inf) < best["val_loss"]
            if improved:
                best.update(val_loss=row["val_loss"], weights=self.model.get_weights(), epoch=row["epoch"])
                with atomic_path(checkpoint) as tmp:
                    self.model.save(tmp)
            log(
                f"phase {phase} epoch {row['epoch']:3d}  {row['seconds']:6.1f} s  loss {row.get('loss', 0):.4f}  "
                f"acc {row.get('accuracy', 0):.4f}  val_loss {row.get('val_loss', 0):.4f}  "
                f"val_acc {row.get('val_accuracy', 0):.4f}{'  *' if improved else ''}"
            )

    return [Progress(), keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)]


def plot_learning_curves(history: list[dict], path: Path) -> None:
    """Training and validation accuracy and loss per epoch; the start of fine-tuning marked."""
    epochs = [r["epoch"] for r in history]
    fig = new_figure(10, 3.8)
    for ax, key in zip(fig.subplots(1, 2), ("accuracy", "loss")):
        ax.plot(epochs, [r.get(key, np.nan) for r in history], "o-", label=f"training {key}")
        ax.plot(epochs, [r.get(f"val_{key}", np.nan) for r in history], "o-", label=f"validation {key}")
        start = next((r["epoch"] for r in history if r["phase"] == 2), None)
        if start is not None:
            ax.axvline(start - 0.5, color="gray", linestyle="--", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def deployable_model(model: Any, temperature: float | None, detector: Any) -> Any:
    """The trained model as the run saves it: its classifier's logits calibrated, and the unknown score as a second
    output, in export's layers (predict, serve and compare read it as an exported head's)."""
    import keras

    classifier = model.get_layer("classifier")
    features = classifier.input  # the pooled features (dropout is the identity at inference)
    logits = keras.layers.Dense(classifier.units, name="logits")(features)
    deployed = calibrated_model(model.input, features, logits, temperature, detector, "cnncodes_finetune")
    deployed.get_layer("logits").set_weights(classifier.get_weights())
    return deployed


@dataclass
class FinetuneResult:
    """What finetune produced."""

    folder: Path
    metrics: dict[str, Any]
    history: list[dict]
    interrupted: bool


def default_run_dir(cache_path: Path) -> Path:
    """runs/<cache name>-finetune/ in the output home."""
    return output_dir("runs") / f"{Path(cache_path).stem}-finetune"


def finetune(
    data_dir: str | os.PathLike,
    config: BackboneConfig = BackboneConfig(),
    *,
    init_head: str | os.PathLike | None = None,
    unfreeze: str = "20",
    from_layer: str | None = None,
    epochs: int = 10,
    head_epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    optimizer: str = "adam",
    augment: str = "light",
    dropout: float = 0.2,
    patience: int = 3,
    test_size: float = 0.2,
    val_size: float = 0.15,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    log: Callable[[str], None] = logger.info,
    near_pairs: Sequence[tuple[str, str]] | None = None,
    accept: float | str | None = DEFAULT_ACCEPT,
) -> FinetuneResult:
    """Train the head, then the top of the backbone, on the cache's split; evaluate on its untouched test part.

    After training, a temperature calibrates the model and an unknown detector whose threshold accepts `accept`
    of known images (None: no detector) is fitted, both on the validation part; the saved model computes both.
    near_pairs: content-hash pairs of near-duplicates kept together (default: found as fit-head finds them).
    """
    accept = as_number("accept", accept)
    check_params(
        dict(
            epochs=epochs,
            head_epochs=head_epochs,
            batch_size=batch_size,
            lr=lr,
            head_lr=head_lr,
            optimizer=optimizer,
            augment=augment,
            dropout=dropout,
            patience=patience,
            test_size=test_size,
            val_size=val_size,
            seed=seed,
            unfreeze=unfreeze,
            accept=accept,
        )
    )
    config = config.resolved()
    head = load_head(init_head) if init_head is not None else None
    if head is not None:
        head.check_features(config.identity(), head.meta["feature_dim"], f"backbone {config.backbone}")
    started = time.perf_counter()
    # the cache is the list of usable images, their classes, hashes and splits, and its features find the
    # near-duplicates fit-head groups: fit-head's split exactly (a cached dataset costs only the scan)
    summary = extract(data_dir, config, cache=cache, cache_dir=cache_dir, progress=False, log=log)
    rows = load(summary.cache_path)
    if summary.skipped:
        log(f"{len(summary.skipped)} unusable files left out (listed by extract in {summary.cache_path})")
    if near_pairs is None:  # fit-head's default grouping, so both test on the same images
        near_pairs = near_duplicate_hash_pairs(rows.features, rows.content_hash, NEAR_DUPLICATES)
    parts = finetune_parts(rows, test_size, val_size, seed, rows_of_hash_pairs(rows.content_hash, near_pairs))
    head_epochs = (0 if head is not None else 5) if head_epochs is None else head_epochs
    options = {
        "unfreeze": unfreeze,
        "from_layer": from_layer,
        "augment": augment,
        "dropout": dropout,
        "optimizer": optimizer,
        "head_epochs": head_epochs,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "head_lr": head_lr,
        "patience": patience,
        "test_size": test_size,
        "val_size": val_size,
        "seed": seed,
        "init_head": head.meta["fingerprint"] if head is not None else None,
        "accept": accept,
    }
    n_classes, root = len(rows.class_names), Path(rows.attrs["dataset_root"])
    folder = Path(out) if out else default_run_dir(summary.cache_path)
    history: list[dict] = []
    best: dict[str, Any] = {"val_loss": np.inf, "weights": None, "epoch": 0}
    log(f"split: {parts.source}; {len(parts.train)} train / {len(parts.val)} validation / {len(parts.test)} test")
    n_trainable = 0
    # the run's files are staged and swapped in whole; its randomness is scoped to this block
    with temp_seed(seed), staged_folder(folder) as stage, _Interrupt() as interrupt:
        model = build_model(config, n_classes, augment, dropout, head)
        size = int(model.input_shape[1])

        def data(idx: np.ndarray, shuffle: bool) -> Any:
            return image_dataset(
                [str(root / rows.paths[i]) for i in idx],
                rows.labels[idx],
                size,
                config.resize,
                batch_size,
                shuffle,
                seed,
            )

        train, val, test = data(parts.train, True), data(parts.val, False), data(parts.test, False)
        checkpoint = stage / RUN_MODEL
        for phase, n_epochs in ((1, head_epochs), (2, epochs)):
            if n_epochs == 0 or interrupt.requested:
                continue
            if phase == 1:
                freeze_backbone(model)
            else:
                n_layers = len(backbone_base(model).layers)
                if from_layer is None and unfreeze != "all" and int(unfreeze) > n_layers:
                    log(f"note: unfreeze {unfreeze} is more than the backbone's {n_layers} layers: all of them train")
                n_trainable = set_trainable(model, unfreeze, from_layer)
                log(f"fine-tuning: {n_trainable} backbone layers with weights are trainable (BatchNorm frozen)")
            model.compile(
                optimizer=_optimizer(optimizer, head_lr if phase == 1 else lr),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            model.fit(
                train,
                validation_data=val,
                epochs=n_epochs,
                verbose=0,
                shuffle=False,  # tf.data shuffles
                callbacks=_callbacks(model, phase, history, best, checkpoint, interrupt, patience, log),
            )
        if best["weights"] is not None:
            model.set_weights(best["weights"])
        train_seconds = time.perf_counter() - started
        import keras

        # the pooled features (the classifier's input) and the uncalibrated probabilities
        probe = keras.Model(model.input, [model.get_layer("classifier").input, model.outputs[0]])
        t0 = time.perf_counter()
        test_features, raw_test = probe.predict(test, verbose=0)
        inference_ms = 1000 * (time.perf_counter() - t0) / max(1, len(parts.test))
        unknown_started = time.perf_counter()
        val_features, raw_val = probe.predict(val, verbose=0)
        train_features = probe.predict(data(parts.train, False), verbose=0)[0] if accept is not None else None
        # A run has no out-of-fold predictions: its validation part, never trained on (it only chose the best
        # epoch), stands in for them, for the temperature and for the detector's threshold; the training
        # features are the detector's reference. The test part stays for evaluation only.
        temperature, detector = fit_unknown(
            train_features, None, rows.labels[parts.val], raw_val, accept, held_out_features=val_features
        )
        unknown_seconds = time.perf_counter() - unknown_started
        y_test = rows.labels[parts.test]
        calibration = calibration_metrics(temperature, detector, raw_test, y_test, test_features, unknown_seconds)
        proba = apply_temperature(raw_test, temperature)
        fitted_on = "known images of the validation part (held out from training)"
        if detector is not None:
            calibration["unknown"]["fitted_on"] = fitted_on
        # the detector's reference is the training part, its known scores the validation part's
        described = (
            {**detector.describe(), "n_train": int(len(parts.train)), "n_val": int(len(parts.val))}
            if detector is not None
            else None
        )
        metrics = classification_metrics(y_test, proba.argmax(1), rows.class_names, seed=seed)
        fingerprint = chain_fingerprint(
            rows.attrs["fingerprint"],
            kind="finetune",
            options=options,
            rows=rows_digest(rows, np.concatenate([parts.train, parts.val, parts.test])),
            temperature=temperature,
            **({"unknown": described} if described else {}),
        )
        metrics.update(
            {
                "method": "fine-tune" + (" (from logreg)" if head is not None else ""),
                "clf": "finetune",
                "best_params": {
                    "unfreeze": unfreeze if from_layer is None else f"from {from_layer}",
                    "lr": lr,
                    "best_epoch": best["epoch"],
                },
                "cv_score": None,
                "fit_seconds": train_seconds,
                "train_seconds": train_seconds,
                "inference_ms": inference_ms,
                "n_train": int(len(parts.train)),
                "n_val": int(len(parts.val)),
                "split": parts.source,
                "split_notes": [],
                "seed": seed,
                "epochs_run": len(history),
                "trainable_layers": n_trainable,
                "interrupted": interrupt.requested,
                "options": options,
                "fingerprint": fingerprint,
                **calibration,
            }
        )
        deployable_model(model, temperature, detector).save(checkpoint)
        backbone_config = {**json.loads(rows.attrs["config_json"]), "image_size": size}
        write_sidecar(
            checkpoint,
            rows.class_names,
            backbone_config,
            {
                "kind": "fine-tuned model",
                "identity": rows.identity,
                "fingerprint": fingerprint,
                "dataset_root": str(root),
                **sidecar_entries(temperature, detector),
            },
        )
        extra = {
            "calibration": {
                "method": "temperature",
                "temperature": temperature,
                "fitted_on": fitted_on,
                "ece_uncalibrated": calibration["ece_uncalibrated"],
                "ece": calibration["ece"],
            }
        }
        if described is not None:
            extra["unknown"] = {**described, "file": UNKNOWN_NPZ, "fitted_on": fitted_on}
            save_detector(detector, stage / UNKNOWN_NPZ)
        write_json(
            stage / RUN_JSON,
            {
                "kind": "finetune",
                "fingerprint": fingerprint,
                "cache_fingerprint": rows.attrs["fingerprint"],
                "dataset_root": str(root),
                "cache_path": str(Path(summary.cache_path).resolve()),
                "classes": rows.class_names,
                "backbone_config": backbone_config,
                "options": options,
                **extra,
            },
        )
        with atomic_write(stage / HISTORY_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        if history:
            plot_learning_curves(history, stage / LEARNING_CURVES_PNG)
        write_predictions(
            stage / PREDICTIONS_CSV,
            predictions_from_rows(
                parts.test, proba, rows.paths, rows.content_hash, rows.split, rows.labels, rows.class_names
            ),
        )
        save_metrics(metrics, stage)
        write_confusion_png(metrics, stage)
    return FinetuneResult(folder, metrics, history, interrupt.requested)
