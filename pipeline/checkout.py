"""ImageNet checkout: what a backbone's own ImageNet classifier sees in a dataset's images.

A quick look before trusting transfer: the top-5 ImageNet classes of a few images per class, and
an "ImageNet likeness" per class (mean top-1 probability, mean entropy of the 1000-way softmax).
Images ImageNet knows well get confident, low-entropy predictions; images unlike ImageNet get flat ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backbones import APPLICATIONS, BackboneConfig, preprocess_layer_class, whole_model
from .errors import UserError
from .images import ImageError, ImageFile, decode_image

IMAGENET_CLASSES = 1000
MAX_ENTROPY = math.log(IMAGENET_CLASSES)  # nats: a uniform guess over the 1000 classes
LIKENESS_PER_CLASS = 16  # images per class behind the likeness figures
SHOWN_PER_CLASS = 2  # of those, the ones drawn in the grid and listed in study.md


@dataclass
class Checkout:
    """One backbone's checkout: likeness per class, sample top-5 lists, the grid figure."""

    likeness: dict[str, dict[str, float]]
    samples: list[dict[str, Any]]
    figure: Any  # matplotlib Figure
    per_class: int

    def summary(self) -> dict[str, float]:
        """Mean over classes of the per-class mean top-1 probability and mean entropy."""
        values = list(self.likeness.values())
        return {
            "mean_top1": float(np.mean([v["mean_top1"] for v in values])),
            "mean_entropy": float(np.mean([v["mean_entropy"] for v in values])),
        }


def imagenet_classifier(config: BackboneConfig) -> Any:
    """The backbone's 1000-class ImageNet model taking raw pixels (0..255); UserError saying why if none."""
    import keras

    if config.weights == "file":
        model = whole_model(config)  # in a study, the model its layers were listed, timed and extracted from
        if model.output_shape[-1] != IMAGENET_CLASSES or len(model.output_shape) != 2:
            raise UserError(
                f"{Path(config.backbone).name} ends in {model.output_shape[-1]} outputs, not the "
                f"{IMAGENET_CLASSES} ImageNet classes"
            )
        return model
    if config.weights != "imagenet":
        raise UserError(f"weights {config.weights!r} are not ImageNet's: no ImageNet classifier")
    app = APPLICATIONS[config.backbone]
    if config.image_size != app.size:
        raise UserError(
            f"the ImageNet classifier of {config.backbone} takes {app.size} px, the study uses {config.image_size} px"
        )
    kwargs = {"alpha": config.alpha} if config.alpha is not None else {}
    try:
        top = getattr(keras.applications, config.backbone)(include_top=True, weights="imagenet", **kwargs)
    except Exception as exc:  # offline downloads fail with URL, HTTP or OS errors; bad alphas with ValueError
        raise UserError(
            f"its ImageNet classifier (with top) could not be loaded: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    inputs = keras.Input((app.size, app.size, 3))
    return keras.Model(inputs, top(preprocess_layer_class()(app.module)(inputs)))


def _probabilities(outputs: np.ndarray) -> np.ndarray:
    """Softmax the outputs unless they already are probabilities (a model file may end in logits)."""
    outputs = np.asarray(outputs, np.float64)
    if (outputs >= 0).all() and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def decode_top5(proba: np.ndarray) -> list[list[tuple[str, float]]]:
    """ImageNet labels of the 5 most probable classes (Keras' decode_predictions and its class index)."""
    from keras.applications.imagenet_utils import decode_predictions

    try:
        decoded = decode_predictions(proba, top=5)
    except Exception as exc:  # offline without the class index file: a download error of some kind
        raise UserError(
            f"the ImageNet class index could not be read ({type(exc).__name__}); offline, link "
            "imagenet_class_index.json into $KERAS_HOME/models"
        ) from None
    return [[(label, float(p)) for _, label, p in row] for row in decoded]


def sample_files(files: Sequence[ImageFile], n_classes: int, per_class: int, seed: int) -> list[ImageFile]:
    """Up to per_class files of each class, drawn by seed, class by class."""
    rng = np.random.default_rng(seed)
    chosen: list[ImageFile] = []
    for label in range(n_classes):
        members = [f for f in files if f.label == label]
        chosen += [members[k] for k in sorted(rng.permutation(len(members))[:per_class])]
    return chosen


def checkout(
    files: Sequence[ImageFile],
    class_names: Sequence[str],
    config: BackboneConfig,
    *,
    per_class: int = LIKENESS_PER_CLASS,
    shown: int = SHOWN_PER_CLASS,
    seed: int = 0,
) -> Checkout:
    """Run the backbone's ImageNet classifier on a seeded sample of each class of a scanned dataset."""
    from .runtime import KerasRuntime

    runtime = KerasRuntime(imagenet_classifier(config))
    kept, images = [], []
    for file in sample_files(files, len(class_names), per_class, seed):
        try:
            images.append(decode_image(file.path, runtime.image_size, config.resize))
            kept.append(file)
        except ImageError:
            continue  # an unusable file: extract lists it; the sample is one smaller
    if not kept:
        raise UserError("none of the sampled images could be read")
    proba = np.concatenate([_probabilities(runtime(np.stack(images[k : k + 32]))) for k in range(0, len(images), 32)])
    top5 = decode_top5(proba)
    entropy = -(proba * np.log(np.clip(proba, 1e-12, None))).sum(axis=1)
    labels = np.array([f.label for f in kept])
    likeness = {
        name: {
            "mean_top1": float(proba[labels == c].max(axis=1).mean()),
            "mean_entropy": float(entropy[labels == c].mean()),
            "n": int((labels == c).sum()),
        }
        for c, name in enumerate(class_names)
        if (labels == c).any()
    }
    picked = [k for c in range(len(class_names)) for k in np.flatnonzero(labels == c)[:shown]]
    samples = [
        {"path": kept[k].relpath, "class": class_names[labels[k]], "top5": [[label, p] for label, p in top5[k]]}
        for k in picked
    ]
    return Checkout(likeness, samples, grid_figure([images[k] for k in picked], samples), per_class)


def grid_figure(images: list[np.ndarray], samples: list[dict[str, Any]], columns: int = 4) -> Any:
    """Each sample image beside a bar chart of its ImageNet top-5 (a matplotlib Figure)."""
    from .plots import new_figure

    n_rows = max(1, math.ceil(len(samples) / columns))
    fig = new_figure(4.6 * columns, 1.7 * n_rows)
    axes = fig.subplots(n_rows, 2 * columns, squeeze=False, gridspec_kw={"width_ratios": [1, 1.6] * columns})
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, (image, sample) in enumerate(zip(images, samples)):
        ax_img, ax_bar = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        ax_img.imshow(image)
        ax_img.set_title(sample["class"], fontsize=8)
        labels, probs = zip(*sample["top5"])
        ax_bar.set_axis_on()
        ax_bar.barh(range(5), probs, color="tab:blue")
        ax_bar.set_xlim(0, 1)
        ax_bar.set_yticks(range(5), [label[:18] for label in labels], fontsize=7)
        ax_bar.invert_yaxis()
        ax_bar.tick_params(axis="x", labelsize=6)
    fig.suptitle("ImageNet top-5 of sample images (the backbone's own classifier)", fontsize=10)
    return fig
