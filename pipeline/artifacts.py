"""Head and run folders: their file names, fingerprints, atomic writes and per-image predictions.

Every stage that writes or reads an artifact goes through here, never by guessing file names.
A file is written to a temporary file in its own folder, fsynced, renamed over the target and the
folder fsynced, so a reader sees the old file or the new one. A whole head or run folder is
staged beside its target and swapped in with one atomic exchange, so its files always belong
together (a crash never leaves a new model beside old metrics).
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from .errors import UserError
from .images import ImageFile

# -- file names: the one place they are spelled --------------------------------------------------
HEAD_JSON = "head.json"  # what the head was trained on (classes, backbone identity, options, fingerprints)
HEAD_MODEL = "head.skops"  # the fitted scikit-learn pipeline, loadable without unpickling
LEGACY_HEAD_MODEL = "head.joblib"  # heads of format 1 (a pickle: loaded only with --trust-pickle)
METRICS_JSON = "metrics.json"  # test metrics (+ intervals), same keys for heads and runs
PREDICTIONS_CSV = "predictions.csv"  # per-image test predictions
CV_PREDICTIONS_CSV = "cv_predictions.csv"  # out-of-fold predictions of the training part (when computed)
UNKNOWN_NPZ = "unknown.npz"  # the unknown detector's arrays: L2-normalised training features, out-of-fold scores
CONFUSION_PNG = "confusion_matrix.png"
RUN_MODEL = "model.keras"  # a fine-tuning run's model (+ its sidecar model.keras.json)
RUN_JSON = "run.json"  # what a fine-tuning run was trained on (fingerprints, options)
HISTORY_CSV = "history.csv"
LEARNING_CURVES_PNG = "learning_curves.png"
EXPORTED_MODEL_STEM = "model"  # `train --export FORMAT` writes model.FORMAT (+ its sidecar) into the head folder
STUDY_JSON = "study.json"  # a study folder's table, winner, advice and checkout
STUDY_MD, STUDY_PNG = "study.md", "study.png"  # the study's table and advice as text, its accuracy/cost figure
AUDIT_JSON = "audit.json"  # an audit folder's findings and the names of its files below
LABEL_ISSUES_CSV, NEAR_DUPLICATES_CSV, OUTLIERS_CSV = "label_issues.csv", "near_duplicates.csv", "outliers.csv"
LEARNING_CURVE_PNG, CLASS_BALANCE_PNG = "learning_curve.png", "class_balance.png"
COMPARE_MD, COMPARE_JSON, COMPARE_PNG = "compare.md", "compare.json", "compare.png"  # a compare folder
SIDECAR_SUFFIX = ".json"  # model.keras -> model.keras.json: class names and input settings
VIEWS_SUFFIX = ".views.h5"  # cache/x.h5 -> cache/x.views.h5: the augmented views of its images (pipeline/views.py)
PREDICTION_COLUMNS = ("path", "content_hash", "split", "true", "predicted")
PROBA_PREFIX = "proba_"  # then one column per class: proba_<class name>
TMP_MARK = ".tmp-"

# -- where outputs go by default -----------------------------------------------------------------
HOME_ENV = "CNNCODES_HOME"  # the output home (`cnncodes --home DIR` sets it); default: the working directory
OUTPUT_DIRS = {
    "cache": "cache",
    "heads": "heads",
    "runs": "runs",
    "compare": "compare",
    "audits": "audits",
    "studies": "studies",
    "models": "models",
}
REPORT_HTML = "report.html"  # `report`'s default page (in the output home), and the page `train` puts in its folder


def output_home() -> Path:
    """The folder under which every default output goes: $CNNCODES_HOME, else the working directory."""
    return Path(os.environ.get(HOME_ENV) or ".")


def output_dir(kind: str) -> Path:
    """The default folder of one kind of output (cache, heads, runs, compare, audits, studies)."""
    return output_home() / OUTPUT_DIRS[kind]


def exported_model_name(format: str) -> str:
    """model.tflite or model.keras: the file `train --export FORMAT` writes into the head folder."""
    return f"{EXPORTED_MODEL_STEM}.{format}"


# -- atomic writes -------------------------------------------------------------------------------
def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside folder durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> Path:
    """A unique sibling of path for staging it: `.<name>.tmp-<pid>-<random><suffix>` (same filesystem;
    the suffix kept last for writers that insist on it, such as Keras)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside path to write; on success it is fsynced and renamed over path.

    On any exception, Ctrl-C included, the temporary file is removed and path is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside path; on success it replaces path (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace path's contents with text, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace path's contents with data, atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Replace path with value as indented JSON, atomically."""
    return write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """JSON from path; a missing or damaged file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; {what}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); write it again ({what}).") from None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


@contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `folder` to write every file into; swapped in whole on success.

    With renameat2's exchange the swap is one atomic step. Elsewhere the old folder is renamed
    aside first, and `recover_folder` puts it back if the process died between the two renames.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    stage = temporary_name(folder)
    stage.mkdir()
    try:
        yield stage
        for child in stage.iterdir():
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(stage)
        if folder.is_dir() and _exchange(stage, folder):
            fsync_dir(folder.parent)
            shutil.rmtree(stage, ignore_errors=True)  # now the old folder
            return
        aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.rename(folder, aside)
        os.rename(stage, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def recover_folder(folder: str | os.PathLike) -> None:
    """Undo a swap that died half-way (old folder set aside, new one not in place); drop dead stagings."""
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    for aside in parent.glob(f".{folder.name}.old-*"):
        if not folder.exists():
            os.rename(aside, folder)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for stage in parent.glob(f".{folder.name}{TMP_MARK}*"):
        pid = stage.name[len(f".{folder.name}{TMP_MARK}") :].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True) if stage.is_dir() else stage.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """True while a process with this id exists (a temporary file of a live writer is not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- fingerprints --------------------------------------------------------------------------------
def chain_fingerprint(parent: str, **params: Any) -> str:
    """A child artifact's fingerprint: its parent's (the cache's) plus what was done to it (HF datasets)."""
    blob = json.dumps({"parent": parent, **params}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- per-image predictions -----------------------------------------------------------------------
@dataclass
class Predictions:
    """Per-image predictions of one method: which image, its true class, the probabilities."""

    paths: list[str]
    content_hash: list[str]
    split: list[str]
    y_true: np.ndarray  # class indices into class_names
    proba: np.ndarray  # (n, n_classes)
    class_names: list[str]

    @property
    def y_pred(self) -> np.ndarray:
        return self.proba.argmax(axis=1) if len(self.proba) else np.zeros(0, np.int64)

    @property
    def correct(self) -> np.ndarray:
        return self.y_pred == self.y_true

    def __len__(self) -> int:
        return len(self.paths)


def paired_outcomes(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Whether each method was right on every test image both scored: the one pairing rule of compare, study
    and report.

    An image is matched by (content hash, path) first; what is left is matched by content hash, occurrence by
    occurrence in path order, so byte-identical copies stay separate images and the same images under other
    paths (another cache of the same files) still pair.
    """

    def occurrences(p: Predictions) -> dict[tuple[str, str], list[int]]:
        keyed: dict[tuple[str, str], list[int]] = {}
        for k, key in enumerate(zip(p.content_hash, p.paths)):
            keyed.setdefault(key, []).append(k)
        return keyed

    in_a, in_b = occurrences(a), occurrences(b)
    pairs: list[tuple[int, int]] = []
    left_a: dict[str, list[int]] = {}
    left_b: dict[str, list[int]] = {}
    for key in sorted(set(in_a) | set(in_b)):
        rows_a, rows_b = in_a.get(key, []), in_b.get(key, [])
        pairs += zip(rows_a, rows_b)
        left_a.setdefault(key[0], []).extend(rows_a[len(rows_b) :])
        left_b.setdefault(key[0], []).extend(rows_b[len(rows_a) :])
    for content_hash, rows_a in left_a.items():
        pairs += zip(rows_a, left_b.get(content_hash, []))
    pairs.sort()
    rows_a = np.array([i for i, _ in pairs], dtype=np.int64)
    rows_b = np.array([j for _, j in pairs], dtype=np.int64)
    return a.correct[rows_a], b.correct[rows_b]


def predictions_csv(predictions: Predictions) -> str:
    """The CSV text: path, content_hash, split, true, predicted, proba_<class>..."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = predictions.class_names
    writer.writerow([*PREDICTION_COLUMNS, *(PROBA_PREFIX + n for n in names)])
    for k, path in enumerate(predictions.paths):
        writer.writerow(
            [
                path,
                predictions.content_hash[k],
                predictions.split[k],
                names[predictions.y_true[k]],
                names[predictions.y_pred[k]],
                *(f"{p:.6g}" for p in predictions.proba[k]),
            ]
        )
    return buffer.getvalue()


def write_predictions(path: str | os.PathLike, predictions: Predictions) -> Path:
    """Write predictions.csv (or cv_predictions.csv) atomically."""
    return write_text(path, predictions_csv(predictions))


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read a predictions CSV back; UserError when it is missing or not in this format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; fit the head (or run finetune) again to write it.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = rows[0] if rows else []
    if tuple(header[: len(PREDICTION_COLUMNS)]) != PREDICTION_COLUMNS or not all(
        h.startswith(PROBA_PREFIX) for h in header[len(PREDICTION_COLUMNS) :]
    ):
        raise UserError(
            f"{path} is not a predictions file (columns {', '.join(PREDICTION_COLUMNS)}, {PROBA_PREFIX}<class>...)."
        )
    names = [h[len(PROBA_PREFIX) :] for h in header[len(PREDICTION_COLUMNS) :]]
    index = {n: i for i, n in enumerate(names)}
    body = rows[1:]
    try:
        proba = np.array([[float(v) for v in r[len(PREDICTION_COLUMNS) :]] for r in body], dtype=np.float64).reshape(
            len(body), len(names)
        )
        y_true = np.array([index[r[3]] for r in body], dtype=np.int64)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path} has a malformed row ({exc}).") from None
    return Predictions([r[0] for r in body], [r[1] for r in body], [r[2] for r in body], y_true, proba, names)


def sample_images(predictions: Predictions, dataset_root: str | os.PathLike, n: int) -> list[ImageFile]:
    """Up to n of the predicted images (spread evenly over them) that are still on disk under dataset_root."""
    if not len(predictions):
        return []
    root = Path(dataset_root)
    rows = np.unique(np.linspace(0, len(predictions) - 1, min(n, len(predictions))).astype(int))
    return [
        ImageFile(root / predictions.paths[i], predictions.paths[i], int(predictions.y_true[i]), predictions.split[i])
        for i in rows
        if (root / predictions.paths[i]).is_file()
    ]


def predictions_from_rows(
    rows: np.ndarray,
    proba: np.ndarray,
    paths: Sequence[str],
    content_hash: Sequence[str],
    split: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
) -> Predictions:
    """Predictions for the given rows of a cache (its paths, hashes, splits and labels)."""
    return Predictions(
        [paths[i] for i in rows],
        [content_hash[i] for i in rows],
        [split[i] or "" for i in rows],
        np.asarray(labels)[rows].astype(np.int64),
        np.asarray(proba, dtype=np.float64),
        list(class_names),
    )


# -- folder kinds --------------------------------------------------------------------------------
def folder_kind(folder: str | os.PathLike) -> str | None:
    """'head', 'run' or 'study' for a folder this tool wrote, else None."""
    folder = Path(folder)
    if (folder / HEAD_JSON).is_file():
        return "head"
    if (folder / RUN_MODEL).is_file() and (folder / METRICS_JSON).is_file():
        return "run"
    if (folder / STUDY_JSON).is_file():
        return "study"
    return None
