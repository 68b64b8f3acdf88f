"""The cnncodes command (also `python cli.py` in a checkout): each command parses its options and calls one
function of the pipeline package."""

from __future__ import annotations

import atexit
import functools
import gc
import os
from pathlib import Path
from typing import Callable

import typer

from pipeline.artifacts import HOME_ENV
from pipeline.errors import UserError
from pipeline.params import ParamError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Image classification on small data: CNN codes in an HDF5 cache, scikit-learn heads, optional fine-tuning.",
)


@app.callback()
def main(
    home: Path | None = typer.Option(
        None,
        envvar=HOME_ENV,
        help=f"Output home: default caches, heads, runs, audits, studies, compare and "
        f"report go under it (also ${HOME_ENV}; default: the working directory).",
    ),
) -> None:
    """Image classification on small data."""
    from pipeline import lean_imports

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the command's own process: TensorFlow's start-up chatter off

    # this process is the command's own: scikit-learn may load without pandas (see pipeline/lean_imports.py)
    lean_imports.install()
    # the process ends with the command: at exit, leave its objects to the operating system instead of
    # collecting them (with scikit-learn loaded that collection alone took 0.3 s of every command)
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    if home is not None:
        os.environ[HOME_ENV] = str(home)  # the library reads the home from the environment (one documented place)


def command(name: str) -> Callable:
    """Register a command whose user errors print one line and exit 2 (no traceback)."""

    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except UserError as exc:
                typer.echo(f"error: {exc.as_flags() if isinstance(exc, ParamError) else exc}", err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        return app.command(name)(run)

    return wrap


BACKBONE = typer.Option(
    "MobileNetV2", "--backbone", "-b", help="Keras Applications name (see `backbones`) or path to a .keras model."
)
WEIGHTS = typer.Option("imagenet", help="imagenet, none (random init), or a weights file path.")
LAYER = typer.Option(
    None, help="Pool this layer's output instead of the top (see `backbones --layers`); default: the top."
)
POOLING = typer.Option("avg", help="Global pooling of a convolutional layer: avg or max.")
IMAGE_SIZE = typer.Option(None, help="Square input size; default: the backbone's own.")
RESIZE = typer.Option("bilinear", help="Resize filter: bilinear, bicubic, lanczos, nearest, area.")
ALPHA = typer.Option(None, help="Width multiplier of MobileNet models (e.g. 0.25); default: the model's own.")
RUNTIME = typer.Option("auto", help="auto (TFLite on a CPU-only machine), keras or tflite.")
THREADS = typer.Option(None, help="TFLite (XNNPACK) threads (default: every core).")
STORAGE_OPTIONS = typer.Option(
    None,
    help="fsspec options of s3:// gs:// az:// URLs as a JSON object, or @FILE "
    "holding one (default: $CNNCODES_STORAGE_OPTIONS; credentials are best left to "
    "the environment, e.g. AWS_*). See docs/scale-out.md.",
)
CACHE = typer.Option(None, help="Cache file; default: cache/<dataset>-<config>.h5")
CACHE_DIR = typer.Option(None, help="Folder for default cache names (default: HOME/cache).")
BATCH_SIZE = typer.Option(32, help="Images per inference batch.")
CHUNK_SIZE = typer.Option(256, help="Images per crash-safe chunk written to disk.")
CLF = typer.Option("logreg", help="logreg, svm, rbf-svm or knn.")
CV = typer.Option(5, help="Cross-validation folds for choosing C (or k).")
N_JOBS = typer.Option(-1, help="Parallel CV jobs (-1: all cores).")
CLASS_WEIGHT = typer.Option(None, help="'balanced' for imbalanced classes; default: none (every image weighs 1).")
SEED = typer.Option(0, help="Seed of the split and the CV folds.")
TEST_SIZE = typer.Option(0.2, help="Test fraction when the cache has no test split.")
L2_NORMALIZE = typer.Option(True, help="L2-normalise each feature vector first.")
GROUP_NEAR_DUPLICATES = typer.Option(
    0.55,
    help="Keep near-duplicates (whitened cosine >= this, as `audit` measures it) on one side of the "
    "split and of every fold, as byte-identical files are; 0 turns it off.",
)
THRESHOLD = typer.Option(0.55, help="Cosine (of whitened features) at or above which two images are near-duplicates.")
PROJECTION = typer.Option("tsne", help="Embedding map projection: tsne or pca (faster).")
THUMB_PX = typer.Option(96, help="Thumbnail size in pixels (JPEG, embedded once per image).")
QUANTIZE = typer.Option("none", help="TFLite weights: none, float16 or dynamic (int8).")
VERIFY = typer.Option(64, help="Check the written model on this many of the head's test images (0: skip).")
PROGRESS = typer.Option(True, help="Show a progress bar.")
FLIP = typer.Option(True, help="With --views: flip views horizontally at random (--no-flip: never).")
VIEWS_SEED = typer.Option(0, help="With --views: the seed of the augmentations.")
ACCEPT = typer.Option("0.95", help="The unknown detector's threshold accepts this share of known images (out of fold).")
UNKNOWN = typer.Option(
    True,
    "--unknown/--no-unknown",
    help="Fit the unknown detector (--no-unknown: none; the head is calibrated either way).",
)


def backbone_config(
    backbone: str,
    weights: str,
    layer: str | None,
    pooling: str,
    image_size: int | None,
    resize: str,
    alpha: float | None,
):
    from pipeline.backbones import BackboneConfig

    return BackboneConfig(backbone, weights, layer, pooling, image_size, resize, alpha)


@command("train")
def train_command(
    data_dir: Path = typer.Argument(..., help="DATA_DIR/CLASS/*.jpg or DATA_DIR/{train,val,test}/CLASS/*.jpg"),
    backbone: str = BACKBONE,
    weights: str = WEIGHTS,
    layer: str | None = LAYER,
    pooling: str = POOLING,
    image_size: int | None = IMAGE_SIZE,
    resize: str = RESIZE,
    alpha: float | None = ALPHA,
    cache: Path | None = CACHE,
    cache_dir: Path | None = CACHE_DIR,
    batch_size: int = BATCH_SIZE,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = typer.Option(None, help="Decoding threads (default: one per core)."),
    runtime: str = RUNTIME,
    threads: int | None = THREADS,
    clf: str = CLF,
    cv: int = CV,
    n_jobs: int = N_JOBS,
    class_weight: str | None = CLASS_WEIGHT,
    seed: int = SEED,
    test_size: float = TEST_SIZE,
    l2_normalize: bool = L2_NORMALIZE,
    group_near_duplicates: float = GROUP_NEAR_DUPLICATES,
    accept: str | None = ACCEPT,
    unknown: bool = UNKNOWN,
    threshold: float = THRESHOLD,
    projection: str = typer.Option(
        "pca",
        help="Embedding map projection: pca, or tsne (as `report` draws it; "
        "10 s for 1,000 images, more than the rest of train).",
    ),
    thumb_px: int = THUMB_PX,
    export: str | None = typer.Option(
        None, help="Also write the deployable model: tflite or keras (needs TensorFlow); default: none."
    ),
    quantize: str = QUANTIZE,
    verify: int = VERIFY,
    out: Path | None = typer.Option(
        None, help="Model folder: the head, report.html and the exported model (default: HOME/models/<cache>-<clf>/)."
    ),
    progress: bool = PROGRESS,
    storage_options: str | None = STORAGE_OPTIONS,
    views: int = typer.Option(
        0,
        help="Also cache K augmented views of every image and train on those of the training images "
        "(extract --views K + fit-head --views); scores stay on the clean images.",
    ),
    flip: bool = FLIP,
    views_seed: int = VIEWS_SEED,
) -> None:
    """Folder to trusted model in one process: extract, fit-head, the audit's headline, report [, export]."""
    from pipeline.train import summary_lines, train
    from pipeline.views import view_recipe

    result = train(
        data_dir,
        backbone_config(backbone, weights, layer, pooling, image_size, resize, alpha),
        clf=clf,
        cache=cache,
        cache_dir=cache_dir,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        runtime=runtime,
        threads=threads,
        cv=cv,
        n_jobs=n_jobs,
        class_weight=class_weight,
        seed=seed,
        test_size=test_size,
        l2_normalize=l2_normalize,
        group_near_duplicates=group_near_duplicates,
        threshold=threshold,
        projection=projection,
        thumb_px=thumb_px,
        export=export,
        quantize=quantize,
        verify=verify,
        out=out,
        accept=accept if unknown else None,
        storage_options=storage_options,
        progress=progress,
        views=view_recipe(views, views_seed, flip),
        log=lambda m: typer.echo(m, err=True),
    )
    typer.echo("\n".join(summary_lines(result)))


@command("extract")
def extract_command(
    data_dir: str = typer.Argument(
        ...,
        help="DATA_DIR/CLASS/*.jpg or DATA_DIR/{train,val,test}/CLASS/*.jpg; a "
        "folder or an object-store URL (s3://bucket/prefix, gs://, az://).",
    ),
    backbone: str = BACKBONE,
    weights: str = WEIGHTS,
    layer: str | None = LAYER,
    pooling: str = POOLING,
    image_size: int | None = IMAGE_SIZE,
    resize: str = RESIZE,
    alpha: float | None = ALPHA,
    cache: Path | None = CACHE,
    cache_dir: Path | None = CACHE_DIR,
    batch_size: int = BATCH_SIZE,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = typer.Option(
        None, help="Decoding threads (default: one per core); with --engine ray, decoding tasks at once."
    ),
    runtime: str = RUNTIME,
    threads: int | None = THREADS,
    engine: str = typer.Option(
        "auto",
        help="auto (ray when --ray-address or RAY_ADDRESS names a cluster and "
        "there are 2,000 new images or more, else local), local (one process), "
        "or ray (Ray Data workers: pip install 'cnncodes[ray]').",
    ),
    ray_address: str | None = typer.Option(
        None,
        help="The Ray cluster: auto, or HEAD_IP:6379 (default: "
        "$RAY_ADDRESS; --engine ray without one starts a local "
        "cluster).",
    ),
    actors: int | None = typer.Option(
        None,
        help="With --engine ray: inference actors (default: one per node; "
        "with --gpus-per-actor, as many as the cluster's GPUs hold).",
    ),
    gpus_per_actor: float = typer.Option(
        0.0, help="With --engine ray: GPUs each inference actor reserves (Keras runs there)."
    ),
    compact: bool = typer.Option(False, help="Rewrite the cache into one shard file afterwards (see `compact`)."),
    progress: bool = PROGRESS,
    storage_options: str | None = STORAGE_OPTIONS,
    views: int = typer.Option(
        0,
        help="Also cache K augmented views of every image (random resized crop, flip, "
        "mild colour jitter), for `fit-head --views`.",
    ),
    flip: bool = FLIP,
    views_seed: int = VIEWS_SEED,
) -> None:
    """Extract CNN codes of every image under DATA_DIR into an HDF5 cache (incremental, resumable)."""
    from pipeline.extract import extract, summary_lines
    from pipeline.views import view_recipe

    summary = extract(
        data_dir,
        backbone_config(backbone, weights, layer, pooling, image_size, resize, alpha),
        cache=cache,
        cache_dir=cache_dir,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        runtime=runtime,
        threads=threads,
        engine=engine,
        compact=compact,
        progress=progress,
        log=lambda m: typer.echo(m, err=True),
        ray_address=ray_address,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        storage_options=storage_options,
        views=view_recipe(views, views_seed, flip),
    )
    typer.echo("\n".join(summary_lines(summary)))
    if summary.interrupted:
        raise typer.Exit(130)


@command("backbones")
def backbones_command(
    layers: str | None = typer.Option(None, help="List the layers of this backbone (name or .keras path)."),
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
    caches: list[Path] = typer.Argument(
        ...,
        help="A cache written by `extract`; several (layers of a backbone, "
        "or backbones): their features side by side, per image.",
    ),
    clf: str = CLF,
    cv: int = CV,
    n_jobs: int = N_JOBS,
    class_weight: str | None = CLASS_WEIGHT,
    seed: int = SEED,
    test_size: float = TEST_SIZE,
    l2_normalize: bool = L2_NORMALIZE,
    group_near_duplicates: float = GROUP_NEAR_DUPLICATES,
    views: bool = typer.Option(
        False,
        "--views",
        help="Also train on the cached augmented views of the training "
        "images (`extract --views K`); scores stay on the clean images.",
    ),
    accept: str | None = ACCEPT,
    unknown: bool = UNKNOWN,
    out: Path | None = typer.Option(None, help="Head folder (default: heads/<cache>-<clf>/)."),
) -> None:
    """Fit a scikit-learn head on cached features and report held-out test metrics (no TensorFlow)."""
    from pipeline.heads import fit_head
    from pipeline.plots import write_confusion_png
    from pipeline.tables import metrics_table, unknown_lines

    result = fit_head(
        caches,
        clf,
        cv=cv,
        n_jobs=n_jobs,
        class_weight=class_weight,
        seed=seed,
        test_size=test_size,
        l2_normalize=l2_normalize,
        group_near_duplicates=group_near_duplicates,
        views=views,
        accept=accept if unknown else None,
        out=out,
        log=typer.echo,
    )
    m = result.metrics
    typer.echo(f"split: {m['split']}; {m['n_train']} train / {m['n_test']} test images")
    for note in m["split_notes"]:
        typer.echo(f"  {note}")
    typer.echo(f"{m['cv_folds']}-fold CV ({m['cv_scoring']}) chose {m['best_params']}: CV score {m['cv_score']:.4f}")
    typer.echo(metrics_table(m))
    write_confusion_png(m, result.folder)
    typer.echo("\n".join(unknown_lines(m)))
    typer.echo(f"fitted in {m['fit_seconds']:.1f} s; head saved to {result.folder}/")


@command("predict")
def predict_command(
    paths: list[str] = typer.Argument(..., help="Image files or folders, local or object-store URLs (s3://...)."),
    head: Path | None = typer.Option(None, help="A head folder written by `fit-head`."),
    model: Path | None = typer.Option(None, help="A .keras or .tflite file from `export` or `finetune`."),
    top_k: int = typer.Option(3, help="Classes per image."),
    out: Path | None = typer.Option(None, help="Write all predictions to this CSV."),
    batch_size: int = typer.Option(32, help="Images per inference batch."),
    workers: int | None = typer.Option(None, help="Decoding threads (default: one per core)."),
    runtime: str = RUNTIME,
    threads: int | None = THREADS,
    trust_pickle: bool = typer.Option(
        False,
        help="Load an old head saved as a pickle (head.joblib), which can run code: only for heads you made yourself.",
    ),
    storage_options: str | None = STORAGE_OPTIONS,
    accept: str | None = typer.Option(
        None,
        help="Call unknown what scores above the threshold that accepts "
        "this share of known images (default: the head's, 0.95).",
    ),
    unknown_threshold: str | None = typer.Option(None, help="Call unknown what scores above this."),
    no_unknown: bool = typer.Option(False, "--no-unknown", help="No unknown decision: always the closest class."),
) -> None:
    """Classify new images with a head; images already in the head's cache need no backbone."""
    from pipeline.predict import predict, prediction_lines

    predictions = predict(
        paths,
        head,
        model=model,
        top_k=top_k,
        out=out,
        batch_size=batch_size,
        workers=workers,
        runtime=runtime,
        threads=threads,
        trust_pickle=trust_pickle,
        accept=accept,
        unknown_threshold=unknown_threshold,
        no_unknown=no_unknown,
        log=lambda m: typer.echo(m, err=True),
        storage_options=storage_options,
    )
    typer.echo("\n".join(prediction_lines(predictions, limit=20 if out else 50)))
    if out:
        typer.echo(f"predictions written to {out}")


@command("export")
def export_command(
    head: Path = typer.Argument(..., help="A linear head folder (logreg or svm) written by `fit-head`."),
    format: str = typer.Option("keras", "--format", help="keras or tflite."),
    quantize: str = QUANTIZE,
    out: Path = typer.Option(..., help="Output file (.keras or .tflite); class names go beside it as .json."),
    verify: int = VERIFY,
) -> None:
    """Export backbone + head as one model: raw pixels in, class probabilities out."""
    from pipeline.export import export_head, verify_lines

    path, check = export_head(head, out, format=format, quantize=quantize, verify=verify)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path}.json")
    typer.echo("\n".join(verify_lines(check, verify)))


@command("finetune")
def finetune_command(
    data_dir: Path = typer.Argument(..., help="The dataset folder (as for extract)."),
    backbone: str = BACKBONE,
    weights: str = WEIGHTS,
    layer: str | None = LAYER,
    pooling: str = POOLING,
    image_size: int | None = IMAGE_SIZE,
    resize: str = RESIZE,
    alpha: float | None = ALPHA,
    init_head: Path | None = typer.Option(None, help="Start from this logreg head (linear probe, then fine-tune)."),
    unfreeze: str = typer.Option("20", help="Top backbone layers to train in phase 2, or 'all'."),
    from_layer: str | None = typer.Option(None, help="Train the backbone from this layer up (instead of --unfreeze)."),
    epochs: int = typer.Option(10, help="Phase 2 (fine-tuning) epochs at most."),
    head_epochs: int | None = typer.Option(None, help="Phase 1 (head only) epochs; default 5, or 0 with --init-head."),
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
    cache: Path | None = typer.Option(None, help="The feature cache (its rows and split are used)."),
    out: Path | None = typer.Option(None, help="Run folder (default: runs/<cache>-finetune/)."),
    accept: str | None = typer.Option(
        "0.95", help="The unknown detector's threshold accepts this share of known images (of the validation part)."
    ),
    unknown: bool = UNKNOWN,
) -> None:
    """Fine-tune the backbone's upper layers with a new head; same split and report as fit-head."""
    from pipeline.finetune import finetune
    from pipeline.tables import metrics_table, unknown_lines

    result = finetune(
        data_dir,
        backbone_config(backbone, weights, layer, pooling, image_size, resize, alpha),
        init_head=init_head,
        unfreeze=unfreeze,
        from_layer=from_layer,
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
        cache=cache,
        out=out,
        log=typer.echo,
        accept=accept if unknown else None,
    )
    typer.echo(metrics_table(result.metrics))
    typer.echo("\n".join(unknown_lines(result.metrics)))
    typer.echo(f"trained in {result.metrics['train_seconds']:.1f} s; run saved to {result.folder}/")
    if result.interrupted:
        typer.echo("interrupted: the best weights so far were evaluated and saved.")
        raise typer.Exit(130)


@command("compare")
def compare_command(
    paths: list[Path] = typer.Argument(..., help="Head folders and fine-tuning run folders."),
    out: Path | None = typer.Option(
        None, help="Folder for compare.md, compare.json, compare.png (default: HOME/compare)."
    ),
) -> None:
    """One row per method: test metrics, training seconds, inference ms/image, model size."""
    from pipeline.compare import compare

    rows, folder = compare(paths, out, log=lambda m: typer.echo(m, err=True))
    from pipeline.tables import compare_markdown

    typer.echo(compare_markdown(rows))
    typer.echo(f"saved {folder}/compare.md, compare.json, compare.png")


@command("compact")
def compact_command(cache: Path = typer.Argument(..., help="A cache written by `extract`.")) -> None:
    """Rewrite a cache's shards into one file in row order: reclaims deleted rows, speeds up reading."""
    from pipeline.cache import compact, layout_line

    before, after = compact(cache)
    typer.echo(f"compacted {cache}: {layout_line(before)} -> {layout_line(after)}")


@command("study")
def study_command(
    data_dir: Path = typer.Argument(..., help="The dataset folder (as for extract)."),
    backbones: str = typer.Option(
        "MobileNetV2",
        help="Comma-separated Keras names or .keras paths, each with "
        "optional :alpha=A :weights=W :size=N :pooling=P (e.g. MobileNet:alpha=0.25).",
    ),
    layers: str = typer.Option(
        "auto,auto+top",
        help="Comma-separated: top, auto (top + two earlier stages), "
        "layer names, or A+B hypercolumns (auto+top: the deepest auto stage with the top).",
    ),
    heads: str = typer.Option("logreg,svm", help="Comma-separated classifiers: logreg, svm, rbf-svm, knn."),
    finetune: bool = typer.Option(False, "--finetune", help="Also fine-tune the winner's backbone; paired test."),
    ensembles: bool = typer.Option(
        False,
        "--ensembles",
        help="Also each pair of backbones side by side, each with its best layer (the winner may be such an ensemble).",
    ),
    group_near_duplicates: float = typer.Option(
        0.55, help="As fit-head's: near-duplicates on one side of the split and of every fold; 0 turns it off."
    ),
    views: int = typer.Option(
        0,
        help="Cache K augmented views of every image and train every head on them too "
        "(as extract --views K + fit-head --views).",
    ),
    budget_minutes: float | None = typer.Option(
        None, help="Run the cheapest useful configurations first within this time; list the rest as skipped."
    ),
    seed: int = typer.Option(0, help="Seed of the split, the CV folds and the samples."),
    test_size: float = typer.Option(0.2, help="Test fraction (as fit-head) when there is no test folder."),
    cv: int = typer.Option(5, help="Cross-validation folds."),
    runtime: str = RUNTIME,
    cache_dir: Path | None = typer.Option(
        None, help="Folder of the feature caches, shared with extract (default: HOME/cache)."
    ),
    out: Path | None = typer.Option(None, help="Study folder (default: studies/<dataset>/)."),
) -> None:
    """Which backbone, layer and head suit this dataset: a CV-chosen winner head, the table, CS231n's advice."""
    from pipeline.study import study

    result = study(
        data_dir,
        backbones,
        layers,
        heads,
        finetune=finetune,
        budget_minutes=budget_minutes,
        seed=seed,
        test_size=test_size,
        cv=cv,
        runtime=runtime,
        cache_dir=cache_dir,
        out=out,
        ensembles=ensembles,
        group_near_duplicates=group_near_duplicates,
        views=views,
        log=lambda m: typer.echo(m, err=True),
    )
    typer.echo("\n".join(result.lines()))
    if result.interrupted:
        raise typer.Exit(130)


@command("report")
def report_command(
    folders: list[Path] = typer.Argument(..., help="Head, fine-tuning run and study folders."),
    audit: Path | None = typer.Option(None, help="An audit folder (written by `audit`) to include."),
    out: Path | None = typer.Option(None, help="The HTML file to write (default: HOME/report.html)."),
    projection: str = PROJECTION,
    thumb_px: int = THUMB_PX,
    seed: int = typer.Option(0, help="Seed of the projection and of the per-class samples."),
) -> None:
    """One self-contained HTML report (opens from disk, no network): tables, confusion matrix, galleries, map."""
    from pipeline.web.report import build_report

    build_report(
        folders, audit, out, projection=projection, thumb_px=thumb_px, seed=seed, log=lambda m: typer.echo(m, err=True)
    )


@command("serve")
def serve_command(
    head: Path | None = typer.Option(None, help="A head folder written by `fit-head`."),
    model: Path | None = typer.Option(None, help="A .keras or .tflite file from `export` or `finetune`."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    allowed_hosts: str = typer.Option(
        "",
        help="More Host names to answer to, comma-separated (the bound host "
        "and, on loopback, localhost are always allowed; * for any).",
    ),
    max_upload_mb: float = typer.Option(20, help="Largest accepted image file, in MB."),
    max_request_mb: float = typer.Option(100, help="Largest request body, in MB (refused as soon as it passes)."),
    max_megapixels: float = typer.Option(
        24, help="Largest image, in megapixels at the scale it decodes (JPEGs after draft scaling)."
    ),
    max_decodes: int = typer.Option(2, help="Images decoded at once (bounds the memory decoding takes)."),
    max_connections: int = typer.Option(256, help="Open connections; above it the longest-idle one is closed."),
    docs: bool = typer.Option(False, help="Serve FastAPI's /docs page (it loads Swagger UI from a CDN)."),
    max_batch: int = typer.Option(32, help="Most images in one model call (requests arriving together share it)."),
    batch_wait_ms: float = typer.Option(5, help="How long the first waiting request waits for others to join."),
    top_k: int = typer.Option(5, help="Classes per image by default (POST /predict?top_k=N overrides)."),
    runtime: str = RUNTIME,
    threads: int | None = THREADS,
) -> None:
    """Classify uploaded images: a page at /, POST /predict (JSON), GET /health; the model is loaded once."""
    from pipeline.web.serve import serve

    serve(
        head,
        model,
        host=host,
        port=port,
        allowed_hosts=[h.strip() for h in allowed_hosts.split(",") if h.strip()],
        max_upload_mb=max_upload_mb,
        max_request_mb=max_request_mb,
        max_megapixels=max_megapixels,
        max_decodes=max_decodes,
        max_connections=max_connections,
        docs=docs,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        top_k=top_k,
        runtime=runtime,
        threads=threads,
        log=lambda m: typer.echo(m, err=True),
    )


@command("audit")
def audit_command(
    cache: Path = typer.Argument(..., help="A cache written by `extract`."),
    head: Path | None = typer.Option(
        None, help="Judge leakage against this head's test images (default: fit-head's split for --seed)."
    ),
    out: Path | None = typer.Option(None, help="Audit folder (default: audits/<cache>/)."),
    threshold: float = THRESHOLD,
    seed: int = typer.Option(0, help="Seed of the split, the CV folds and the learning-curve subsamples."),
    cv: int = typer.Option(5, help="Cross-validation folds for the out-of-fold probabilities."),
    n_jobs: int = typer.Option(-1, help="Parallel CV jobs (-1: all cores)."),
) -> None:
    """Can the score be trusted? Label issues, near-duplicates (leakage), outliers, learning curve (no TensorFlow)."""
    from pipeline.audit import audit

    result = audit(
        cache, head, out, threshold=threshold, seed=seed, cv=cv, n_jobs=n_jobs, log=lambda m: typer.echo(m, err=True)
    )
    typer.echo("\n".join(result.summary))
    typer.echo(f"audited in {result.report['seconds']:.1f} s; written to {result.folder}/")


if __name__ == "__main__":
    app()
