"""cnncodes command line: each command parses its options and calls one function of pipeline/."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the terminal

import typer

from pipeline.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Image classification on small data: CNN codes in an HDF5 cache, "
                       "scikit-learn heads, optional fine-tuning.")


def command(name: str) -> Callable:
    """Register a command whose user errors print one line and exit 2 (no traceback)."""
    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except UserError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2)
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130)
        return app.command(name)(run)
    return wrap


BACKBONE = typer.Option("MobileNetV2", "--backbone", "-b",
                        help="Keras Applications name (see `backbones`) or path to a .keras model.")
WEIGHTS = typer.Option("imagenet", help="imagenet, none (random init), or a weights file path.")
LAYER = typer.Option(None, help="Pool this layer's output instead of the top (see `backbones --layers`).")
POOLING = typer.Option("avg", help="Global pooling of a convolutional layer: avg or max.")
IMAGE_SIZE = typer.Option(None, help="Square input size; default: the backbone's own.")
RESIZE = typer.Option("bilinear", help="Resize filter: bilinear, bicubic, lanczos, nearest, area.")
ALPHA = typer.Option(None, help="Width multiplier of MobileNet models (e.g. 0.25).")
RUNTIME = typer.Option("auto", help="auto (TFLite on a CPU-only machine), keras or tflite.")
THREADS = typer.Option(None, help="TFLite (XNNPACK) threads (default: every core).")


def backbone_config(backbone: str, weights: str, layer: Optional[str], pooling: str,
                    image_size: Optional[int], resize: str, alpha: Optional[float]):
    from pipeline.backbones import BackboneConfig

    return BackboneConfig(backbone, weights, layer, pooling, image_size, resize, alpha)


@command("extract")
def extract_command(
    data_dir: Path = typer.Argument(..., help="DATA_DIR/CLASS/*.jpg or DATA_DIR/{train,val,test}/CLASS/*.jpg"),
    backbone: str = BACKBONE, weights: str = WEIGHTS, layer: Optional[str] = LAYER,
    pooling: str = POOLING, image_size: Optional[int] = IMAGE_SIZE, resize: str = RESIZE,
    alpha: Optional[float] = ALPHA,
    cache: Optional[Path] = typer.Option(None, help="Cache file; default: cache/<dataset>-<config>.h5"),
    cache_dir: Path = typer.Option(Path("cache"), help="Folder for default cache names."),
    batch_size: int = typer.Option(32, help="Images per inference batch."),
    chunk_size: int = typer.Option(256, help="Images per crash-safe chunk written to disk."),
    workers: Optional[int] = typer.Option(None, help="Decoding threads (default: one per core)."),
    runtime: str = RUNTIME, threads: Optional[int] = THREADS,
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Extract CNN codes of every image under DATA_DIR into an HDF5 cache (incremental, resumable)."""
    from pipeline.extract import extract, summary_lines

    summary = extract(data_dir, backbone_config(backbone, weights, layer, pooling, image_size, resize, alpha),
                      cache=cache, cache_dir=cache_dir, batch_size=batch_size, chunk_size=chunk_size,
                      workers=workers, runtime=runtime, threads=threads, progress=progress,
                      log=lambda m: typer.echo(m, err=True))
    typer.echo("\n".join(summary_lines(summary)))
    if summary.interrupted:
        raise typer.Exit(130)


@command("backbones")
def backbones_command(
    layers: Optional[str] = typer.Option(None, help="List the layers of this backbone (name or .keras path)."),
    weights: str = typer.Option("none", help="Weights to build with when listing layers."),
) -> None:
    """List the known backbones (name, default input size, feature width), or one backbone's layers."""
    from pipeline.backbones import APPLICATIONS, DEFAULT_BACKBONE, BackboneConfig, layer_names

    if layers:
        for name, shape in layer_names(BackboneConfig(layers, weights).resolved()):
            typer.echo(f"{name:40s} {shape}")
        return
    typer.echo(f"{'backbone':20s} {'size':>5s} {'width':>6s}")
    for name, app_info in APPLICATIONS.items():
        mark = "  (default)" if name == DEFAULT_BACKBONE else ""
        typer.echo(f"{name:20s} {app_info.size:5d} {app_info.width:6d}{mark}")
    typer.echo("Any saved Keras model also works: --backbone PATH.keras [--layer NAME].")


@command("fit-head")
def fit_head_command(
    cache: Path = typer.Argument(..., help="A cache written by `extract`."),
    clf: str = typer.Option("logreg", help="logreg, svm, rbf-svm or knn."),
    cv: int = typer.Option(5, help="Cross-validation folds for choosing C (or k)."),
    n_jobs: int = typer.Option(-1, help="Parallel CV jobs (-1: all cores)."),
    class_weight: Optional[str] = typer.Option(None, help="'balanced' for imbalanced classes."),
    seed: int = typer.Option(0, help="Seed of the split and the CV folds."),
    test_size: float = typer.Option(0.2, help="Test fraction when the cache has no test split."),
    l2_normalize: bool = typer.Option(True, help="L2-normalise each feature vector first."),
    out: Optional[Path] = typer.Option(None, help="Head folder (default: heads/<cache>-<clf>/)."),
) -> None:
    """Fit a scikit-learn head on cached features and report held-out test metrics (no TensorFlow)."""
    from pipeline.heads import fit_head
    from pipeline.report import metrics_table

    result = fit_head(cache, clf, cv=cv, n_jobs=n_jobs, class_weight=class_weight, seed=seed,
                      test_size=test_size, l2_normalize=l2_normalize, out=out, log=typer.echo)
    m = result.metrics
    typer.echo(f"split: {m['split']}; {m['n_train']} train / {m['n_test']} test images")
    for note in m["split_notes"]:
        typer.echo(f"  {note}")
    typer.echo(f"{m['cv_folds']}-fold CV ({m['cv_scoring']}) chose {m['best_params']}: CV score {m['cv_score']:.4f}")
    typer.echo(metrics_table(m))
    typer.echo(f"fitted in {m['fit_seconds']:.1f} s; head saved to {result.folder}/")


@command("predict")
def predict_command(
    paths: List[Path] = typer.Argument(..., help="Image files or folders."),
    head: Optional[Path] = typer.Option(None, help="A head folder written by `fit-head`."),
    model: Optional[Path] = typer.Option(None, help="A .keras or .tflite file from `export` or `finetune`."),
    top_k: int = typer.Option(3, help="Classes per image."),
    out: Optional[Path] = typer.Option(None, help="Write all predictions to this CSV."),
    batch_size: int = typer.Option(32, help="Images per inference batch."),
    workers: Optional[int] = typer.Option(None, help="Decoding threads (default: one per core)."),
    runtime: str = RUNTIME, threads: Optional[int] = THREADS,
) -> None:
    """Classify new images with a head; images already in the head's cache need no backbone."""
    from pipeline.predict import prediction_lines, predict

    predictions = predict(paths, head, model=model, top_k=top_k, out=out, batch_size=batch_size, workers=workers,
                          runtime=runtime, threads=threads, log=lambda m: typer.echo(m, err=True))
    typer.echo("\n".join(prediction_lines(predictions, limit=20 if out else 50)))
    if out:
        typer.echo(f"predictions written to {out}")


@command("export")
def export_command(
    head: Path = typer.Argument(..., help="A linear head folder (logreg or svm) written by `fit-head`."),
    format: str = typer.Option("keras", "--format", help="keras or tflite."),
    quantize: str = typer.Option("none", help="TFLite weights: none, float16 or dynamic (int8)."),
    out: Path = typer.Option(..., help="Output file (.keras or .tflite); class names go beside it as .json."),
    verify: int = typer.Option(64, help="Compare with the head on this many of its dataset's images (0: skip)."),
) -> None:
    """Export backbone + head as one model: raw pixels in, class probabilities out."""
    from pipeline.export import export_head, verify_export
    from pipeline.runtime import load_model_file, sidecar_path
    from pipeline.heads import load_head

    path, _ = export_head(head, out, format=format, quantize=quantize)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {sidecar_path(path)}")
    if verify:
        check = verify_export(load_model_file(path)[0], load_head(head), verify)
        if check:
            typer.echo(f"check on {check['images']} dataset images: max |p_export - p_head| "
                       f"{check['max_abs_prob_diff']:.2e}, top-1 agreement {check['top1_agreement']:.4f}")


@command("finetune")
def finetune_command(
    data_dir: Path = typer.Argument(..., help="The dataset folder (as for extract)."),
    backbone: str = BACKBONE, weights: str = WEIGHTS, layer: Optional[str] = LAYER,
    pooling: str = POOLING, image_size: Optional[int] = IMAGE_SIZE, resize: str = RESIZE,
    alpha: Optional[float] = ALPHA,
    init_head: Optional[Path] = typer.Option(None, help="Start from this logreg head (linear probe, then fine-tune)."),
    unfreeze: str = typer.Option("20", help="Top backbone layers to train in phase 2, or 'all'."),
    from_layer: Optional[str] = typer.Option(None, help="Train the backbone from this layer up (instead of --unfreeze)."),
    epochs: int = typer.Option(10, help="Phase 2 (fine-tuning) epochs at most."),
    head_epochs: Optional[int] = typer.Option(None, help="Phase 1 (head only) epochs; default 5, or 0 with --init-head."),
    batch_size: int = typer.Option(32, help="Images per training batch."),
    lr: float = typer.Option(1e-4, help="Phase 2 learning rate."),
    head_lr: float = typer.Option(1e-3, help="Phase 1 learning rate."),
    optimizer: str = typer.Option("adam", help="adam, or sgd (momentum 0.9)."),
    augment: str = typer.Option("light", help="none, light or strong (flip, rotation, translation, zoom, contrast)."),
    dropout: float = typer.Option(0.2, help="Dropout before the softmax layer."),
    patience: int = typer.Option(3, help="Early-stopping patience on validation loss (epochs)."),
    test_size: float = typer.Option(0.2, help="Test fraction (as fit-head) when there is no test folder."),
    val_size: float = typer.Option(0.15, help="Validation fraction carved from the training part."),
    seed: int = typer.Option(0, help="Seed of the split, the initialisation and the shuffling."),
    cache: Optional[Path] = typer.Option(None, help="The feature cache (its rows and split are used)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: runs/<cache>-finetune/)."),
) -> None:
    """Fine-tune the backbone's upper layers with a new head; same split and report as fit-head."""
    from pipeline.finetune import finetune
    from pipeline.report import metrics_table

    result = finetune(data_dir, backbone_config(backbone, weights, layer, pooling, image_size, resize, alpha),
                      init_head=init_head, unfreeze=unfreeze, from_layer=from_layer, epochs=epochs,
                      head_epochs=head_epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, optimizer=optimizer,
                      augment=augment, dropout=dropout, patience=patience, test_size=test_size,
                      val_size=val_size, seed=seed, cache=cache, out=out, log=typer.echo)
    typer.echo(metrics_table(result.metrics))
    typer.echo(f"trained in {result.metrics['train_seconds']:.1f} s; run saved to {result.folder}/")
    if result.interrupted:
        typer.echo("interrupted: the best weights so far were evaluated and saved.")
        raise typer.Exit(130)


@command("compare")
def compare_command(
    paths: List[Path] = typer.Argument(..., help="Head folders and fine-tuning run folders."),
    out: Path = typer.Option(Path("compare"), help="Folder for compare.md, compare.json, compare.png."),
) -> None:
    """One row per method: test metrics, training seconds, inference ms/image, model size."""
    from pipeline.compare import compare

    rows, folder = compare(paths, out, log=lambda m: typer.echo(m, err=True))
    from pipeline.report import compare_markdown

    typer.echo(compare_markdown(rows))
    typer.echo(f"saved {folder}/compare.md, compare.json, compare.png")


if __name__ == "__main__":
    app()
