"""pipeline/study.py: backbones x layers x heads, one forward pass per backbone, the winner chosen by CV only,
skips with reasons, the budget, Ctrl-C; the checkout and the advice (checkout.py, study_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from heads_fixtures import blobs, fake_hash, write_cache
from model_fixtures import make_pattern_dataset, quiet, save_small_cnn
from typer.testing import CliRunner

import cli
import pipeline.backbones as backbones_module
import pipeline.extract as extract_module
import pipeline.heads as heads_module
import pipeline.study as study_module
from pipeline.artifacts import PREDICTIONS_CSV, folder_kind, read_predictions
from pipeline.cache import load
from pipeline.errors import UserError
from pipeline.heads import load_head, make_pipeline
from pipeline.sources import head_sources, join, join_caches
from pipeline.study import choose_winner, study
from pipeline.study_plan import earlier_stages
from pipeline.study_report import advice, pareto_front
from pipeline.study_results import StudyResults, StudyRow, read_study

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed"),
]

TINY = "MobileNetV2:weights=none:size=32:alpha=0.35"  # random weights, 32 px: builds in about a second
N_IMAGES = 24  # make_pattern_dataset: 3 classes x 8


def run_study(tmp_path: Path, **kwargs):
    """A study of the pattern dataset with the tiny backbone, Keras runtime, one CV job."""
    data = tmp_path / "data"
    if not data.is_dir():
        make_pattern_dataset(data)
    options = dict(
        backbones=TINY,
        layers="top",
        heads="logreg",
        runtime="keras",
        n_jobs=1,
        cache_dir=tmp_path / "cache",
        out=tmp_path / "study",
        log=quiet(),
    )
    return study(data, **{**options, **kwargs})


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The two-layer CNN file (label "small_cnn"): a study of it builds and runs in a fraction of the tiny
    MobileNetV2's time, for the tests whose point is the study's bookkeeping, not a backbone's stages."""
    return str(save_small_cnn(tmp_path_factory.mktemp("study_cnn") / "small_cnn.keras"))


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory):
    """One study with auto layers and a hypercolumn; counts the images through the backbone and its loads."""
    counted = {"images": 0, "runtimes": 0, "loads": 0}
    real, real_load = extract_module.make_runtime, backbones_module._load_full_model

    def counting_load(config):
        counted["loads"] += 1
        return real_load(config)

    def counting(*args, **kwargs):
        runtime = real(*args, **kwargs)
        counted["runtimes"] += 1
        inner = runtime.__call__

        class Counted:
            name, image_size, dim = runtime.name, runtime.image_size, runtime.dim
            outputs = getattr(runtime, "outputs", None)

            def __call__(self, batch):
                counted["images"] += len(batch)
                return inner(batch)

        counted_runtime = Counted()
        for attribute in dir(runtime):  # whatever else the engine reads (output widths...)
            if not attribute.startswith("_") and not hasattr(counted_runtime, attribute):
                setattr(counted_runtime, attribute, getattr(runtime, attribute))
        return counted_runtime

    tmp = tmp_path_factory.mktemp("study_full")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract_module, "make_runtime", counting)
        patch.setattr(backbones_module, "_load_full_model", counting_load)
        result = run_study(tmp, layers="auto,auto+top")
    return result, counted


def test_one_forward_pass_yields_every_layer(full) -> None:
    result, counted = full
    layers = result.data.backbones[TINY]["layers"]
    assert len(layers) == 3 and layers["top"] is None  # the top and two earlier stages
    # one model, each image once, for three caches; the backbone built once for listing, timing and extracting
    assert counted == {"images": N_IMAGES, "runtimes": 1, "loads": 1}
    caches = {r.cache for r in result.data.rows if r.kind == "layer"}
    assert len(caches) == 3
    for path in caches:
        cache = load(path)
        assert len(cache) == N_IMAGES and cache.attrs["layer"] in ("", *layers.values())
    assert any("auto: top, " in note for note in result.data.backbones[TINY]["notes"])


def test_rows_winner_and_outputs(full) -> None:
    result, _ = full
    data, folder = result.data, result.folder
    rows = data.rows
    assert len(rows) == 4  # 3 layers + 1 hypercolumn, one head
    hyper = [r for r in rows if r.kind == "hypercolumn"]
    assert len(hyper) == 1 and hyper[0].layer.endswith("+top")
    singles = {r.layer: r.feature_dim for r in rows if r.kind == "layer"}
    assert hyper[0].feature_dim == singles[hyper[0].layer.split("+")[0]] + singles["top"]
    for r in rows:
        assert 0 <= r.test_ci[0] <= r.test_accuracy <= r.test_ci[1] <= 1
        assert r.n_test > 0 and r.fit_seconds > 0 and r.infer_ms_per_image > 0 and r.model_mb > 0
        assert r.extract_images_per_s > 0
    # the winner: the best CV accuracy of any kind (a hypercolumn too), saved as a normal head folder
    winner = data.winner
    assert winner.head_dir == "winner"
    assert winner.cv_accuracy == max(r.cv_accuracy for r in rows)
    assert folder_kind(folder / "winner") == "head"
    head = load_head(folder / "winner")
    assert head.meta["feature_dim"] == winner.feature_dim
    test = read_predictions(folder / "winner" / PREDICTIONS_CSV)
    assert len(test) == winner.n_test and np.isclose(test.correct.mean(), winner.test_accuracy)
    cache, _ = join_caches([s.cache_path for s in head_sources(head.meta)])
    rows_of = {h: i for i, h in enumerate(cache.content_hash)}
    features = cache.features[[rows_of[h] for h in test.content_hash]]
    assert np.allclose(head.predict_proba(features), test.proba, atol=1e-5)
    # the winner is calibrated and has an unknown detector, as fit-head's heads do (the same function)
    assert head.meta["calibration"]["method"] == "temperature" and head.detector is not None
    assert "test_unknown_rate" in json.loads((folder / "winner" / "metrics.json").read_text())["unknown"]
    # the files
    saved = json.loads((folder / "study.json").read_text())
    for key in (
        "dataset_root",
        "n_images",
        "images_per_class",
        "seed",
        "rows",
        "winner",
        "advice",
        "checkout",
        "skipped",
        "finetune",
        "interrupted",
        "seconds",
    ):
        assert key in saved, key
    assert saved["n_images"] == N_IMAGES and saved["interrupted"] is False and saved["finetune"] is None
    assert read_study(folder) == data and StudyResults.from_json(data.to_json()) == data  # typed, round-trips
    assert (folder / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (folder / "study.md").read_text()
    assert "before the test part was looked at" in md and "**winner**" in md
    assert md.count("| " + TINY) == 4
    # random weights have no ImageNet classifier: the checkout is skipped, with the reason
    assert data.checkout == {}
    assert any(s["config"] == f"{TINY} checkout" and "ImageNet" in s["reason"] for s in data.skipped)
    assert data.advice["quadrant"].startswith("small & ")
    assert any("CV" in line and "vs top" in line for line in data.advice["text"])


def test_winner_is_chosen_on_cv_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cnn: str) -> None:
    """The svm head gets the best CV score but a model trained on shifted labels: it must still win."""
    real = heads_module.fit_arrays

    def rigged(X, y, groups, class_names, clf="logreg", **kwargs):
        fitted = real(X, y, groups, class_names, clf, **kwargs)
        if clf == "svm":
            fitted.cv_score = 0.99
            fitted.model = make_pipeline("logreg").fit(X, (y + 1) % len(class_names))  # wrong on purpose
        else:
            fitted.cv_score = 0.5
        return fitted

    monkeypatch.setattr(heads_module, "fit_arrays", rigged)  # the study fits through fit-head's own code
    data = run_study(tmp_path, backbones=cnn, heads="logreg,svm").data
    by_head = {r.head: r for r in data.rows}
    assert by_head["svm"].test_accuracy < by_head["logreg"].test_accuracy  # the test part disagrees
    assert data.winner.head == "svm" and by_head["svm"].head_dir == "winner"
    metrics = json.loads((tmp_path / "study" / "winner" / "metrics.json").read_text())
    assert metrics["accuracy"] == by_head["svm"].test_accuracy


def test_skips_with_reasons_and_goes_on(tmp_path: Path, cnn: str) -> None:
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip archive")
    data = run_study(tmp_path, backbones=f"{cnn},{bad}", layers="top,no_such_layer").data
    reasons = {s["config"]: s["reason"] for s in data.skipped}
    assert "could not load" in reasons["broken"]
    assert "no layer 'no_such_layer'" in reasons["small_cnn no_such_layer"]
    assert [(r.backbone, r.layer) for r in data.rows] == [("small_cnn", "top")]
    assert data.winner.backbone == "small_cnn"
    md = (tmp_path / "study" / "study.md").read_text()
    assert "## Skipped" in md and "no_such_layer" in md


def test_budget_runs_cheap_configurations_and_lists_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cnn: str
) -> None:
    monkeypatch.setitem(study_module.FIT_COST, "svm", (1e3, 1))  # an svm fit now looks hours long
    data = run_study(tmp_path, backbones=cnn, heads="logreg,svm", budget_minutes=10).data
    assert [r.head for r in data.rows] == ["logreg"]
    (skip,) = [s for s in data.skipped if s["config"].endswith("svm")]
    assert skip["config"] == "small_cnn top svm" and skip["reason"].startswith("over budget: estimated")


def test_ctrl_c_writes_the_table_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cnn: str) -> None:
    real, calls = heads_module.fit_arrays, []

    def interrupted_second_time(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(heads_module, "fit_arrays", interrupted_second_time)
    make_pattern_dataset(tmp_path / "data")
    result = CliRunner().invoke(
        cli.app,
        [
            "study",
            str(tmp_path / "data"),
            "--backbones",
            cnn,
            "--layers",
            "top",
            "--heads",
            "logreg,svm",
            "--runtime",
            "keras",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "study"),
        ],
    )
    assert result.exit_code == 130, (result.stdout, result.stderr, result.exception)
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    assert saved["interrupted"] is True and len(saved["rows"]) == 1 and saved["winner"]["head_dir"] == "winner"
    assert "Interrupted" in (tmp_path / "study" / "study.md").read_text()
    assert "interrupted" in result.stdout


@pytest.mark.slow
def test_finetune_adds_a_row_and_a_paired_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cnn: str) -> None:
    import pipeline.finetune as finetune_module

    real = finetune_module.finetune
    monkeypatch.setattr(finetune_module, "finetune", lambda *a, **k: real(*a, **k, epochs=1, batch_size=8))
    # the two-layer CNN file: tracing the tiny MobileNetV2's training step took most of this test's 17-20 s
    data = run_study(tmp_path, finetune=True, backbones=cnn).data
    tuned = data.finetune
    assert tuned.init_head == "winner"
    assert data.rows[-1].kind == "finetune" and data.rows[-1].head_dir == "finetune"
    assert tuned.paired_test["n"] == data.winner.n_test
    assert "fine-tune vs winner head" in tuned.verdict
    assert any("fine-tuning is" in line for line in data.advice["text"])
    assert folder_kind(tmp_path / "study" / "finetune") == "run"


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(heads="logreg,forest"), "heads is 'forest'; it must be one of logreg"),
        (dict(layers="a+b+c"), "is not a hypercolumn"),
        (dict(backbones="MobileNetV2:depth=3"), "is not one of alpha=..."),
        (dict(backbones="MobileNetV2,MobileNetV2"), "without repeats"),
        (dict(backbones="NoSuchNet"), "unknown backbone"),
        (dict(budget_minutes=0), "budget_minutes is 0"),
    ],
)
def test_user_errors_come_before_any_model(tmp_path: Path, options: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace("+", r"\+").replace(".", r"\.")):
        study(tmp_path / "no_data_needed", **options, log=quiet())


def test_earlier_stages_skip_padding_and_take_the_deepest_first() -> None:
    layers = [
        ("input", "(64, 64, 3)"),
        ("stem", "(32, 32, 8)"),
        ("a1", "(32, 32, 8)"),
        ("a2", "(32, 32, 16)"),
        ("pad", "(33, 33, 16)"),
        ("b1", "(16, 16, 16)"),
        ("b2", "(16, 16, 16)"),
        ("b_end", "(16, 16, 32)"),
        ("pad2", "(17, 17, 32)"),
        ("c1", "(8, 8, 32)"),
        ("c2", "(8, 8, 32)"),
        ("c_end", "(8, 8, 64)"),
        ("top", "(4, 4, 128)"),
        ("pool", "(128,)"),
        ("predictions", "(1000,)"),
    ]
    assert earlier_stages(layers) == ["c_end", "b_end"]
    assert earlier_stages(layers, count=3) == ["c_end", "b_end", "a2"]
    assert earlier_stages([("pool", "(128,)")]) == []


def test_hypercolumn_aligns_rows_by_content_hash(tmp_path: Path) -> None:
    X, y = blobs(per_class=4, dim=3)
    hashes = [fake_hash(k) for k in range(len(y))]
    a = load(write_cache(tmp_path / "a.h5", X, y, hashes=hashes))
    order = np.random.default_rng(0).permutation(len(y))[1:]  # b: another order, one row missing
    b = load(write_cache(tmp_path / "b.h5", -10 * X[order], y[order], hashes=[hashes[k] for k in order]))
    joined, sources = join([a, b], log=quiet())
    assert joined.features.shape == (len(y) - 1, 6) and len(joined.paths) == len(y) - 1 and len(sources) == 2
    for k, h in enumerate(joined.content_hash):
        i = a.content_hash.index(h)
        unit = X[i] / np.linalg.norm(X[i])  # each source L2-normalised, then side by side
        assert np.allclose(joined.features[k], np.concatenate([unit, -unit]), atol=1e-6) and joined.labels[k] == y[i]


def test_choose_winner_uses_cv_then_speed_never_test() -> None:
    def row(kind, cv, test, ms, mb=1.0):
        return StudyRow("b", "top", kind, "logreg", cv, test, [0.0, 1.0], 10, 1.0, ms, mb)

    rows = [
        row("layer", 0.90, 1.00, 1.0),
        row("layer", 0.95, 0.80, 5.0),
        row("hypercolumn", 0.99, 1.0, 1.0),
        row("layer", 0.95, 0.70, 3.0),
    ]
    assert choose_winner(rows) == 2  # best CV whatever the kind; never the test score
    assert choose_winner(rows[:2] + rows[3:]) == 2  # a tie goes to the faster
    assert choose_winner([row("ensemble", 0.9, 0.9, 1.0)]) == 0
    assert choose_winner([]) is None


def test_advice_places_the_dataset_in_a_quadrant() -> None:
    def data(per_class, top1, top_cv, early_cv):
        rows = [
            StudyRow("b", layer, "layer", "logreg", cv, 0.9, [0.8, 0.95], 20, 1.0, 1.0, 1.0)
            for layer, cv in (("top", top_cv), ("block6", early_cv))
        ]
        checkout = {"b": {"summary": {"mean_top1": top1, "mean_entropy": 2.0}}} if top1 is not None else {}
        return StudyResults("", 2 * per_class, {"x": per_class, "y": per_class}, 0, rows, None, 1.0, checkout=checkout)

    assert advice(data(50, 0.8, 0.95, 0.90))["quadrant"] == "small & similar"
    unlike = advice(data(50, 0.2, 0.81, 0.84))
    assert unlike["quadrant"] == "small & different"
    assert "block6 CV 0.840 vs top 0.810 (b): these images are unlike ImageNet" in " ".join(unlike["text"])
    assert advice(data(2000, None, 0.95, 0.90))["quadrant"] == "large & similar"
    mixed = advice(data(2000, 0.8, 0.80, 0.90))  # likeness says similar, the layers say different
    assert mixed["quadrant"] == "large & different" and "mixed" in " ".join(mixed["text"])


def test_pareto_front() -> None:
    points = [(1.0, 0.80), (2.0, 0.90), (1.5, 0.70), (3.0, 0.85), (4.0, 0.95)]
    assert pareto_front(points) == [0, 1, 4]


@pytest.fixture
def imagenet_like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small .keras model ending in 1000 softmax outputs, and Keras' class index replaced (no download)."""
    import keras
    from keras.src.applications import imagenet_utils

    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", {str(i): [f"n{i:08d}", f"thing_{i}"] for i in range(1000)})
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path / "tiny_imagenet.keras"
    keras.Model(inputs, keras.layers.Dense(1000, activation="softmax")(x)).save(path)
    return path


def test_checkout_top5_and_likeness(tmp_path: Path, imagenet_like: Path) -> None:
    from pipeline.backbones import BackboneConfig
    from pipeline.checkout import checkout, imagenet_classifier
    from pipeline.images import scan_dataset

    dataset = scan_dataset(make_pattern_dataset(tmp_path / "data"))
    result = checkout(
        dataset.files, dataset.class_names, BackboneConfig(str(imagenet_like)).resolved(), per_class=4, shown=2
    )
    assert set(result.likeness) == set(dataset.class_names)
    for values in result.likeness.values():
        assert values["n"] == 4 and 0 < values["mean_top1"] <= 1 and 0 <= values["mean_entropy"] <= np.log(1000)
    assert len(result.samples) == 2 * len(dataset.class_names)
    for sample in result.samples:
        probs = [p for _, p in sample["top5"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert all(label.startswith("thing_") for label, _ in sample["top5"])
    assert result.figure.axes  # image and bars per sample
    with pytest.raises(UserError, match="not the 1000 ImageNet classes"):
        imagenet_classifier(BackboneConfig(str(save_small_cnn(tmp_path / "cnn.keras"))).resolved())


def test_study_with_an_imagenet_model_writes_the_checkout(
    tmp_path: Path, imagenet_like: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    loads, real_load = [], keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    data = run_study(tmp_path, backbones=str(imagenet_like)).data
    assert len(loads) == 1  # the file loaded once: its top layer's features and its ImageNet checkout
    check = data.checkout["tiny_imagenet"]
    assert (tmp_path / "study" / check["grid_png"]).is_file()
    assert data.advice["likeness"]["backbones"] == ["tiny_imagenet"]
    md = (tmp_path / "study" / "study.md").read_text()
    assert "## ImageNet checkout: tiny_imagenet" in md and "thing_" in md


def test_ensembles_and_views_can_win_and_save_a_multi_source_head(tmp_path: Path, cnn: str) -> None:
    """Two backbones with --ensembles and 2 cached views: an ensemble row per head, every head trained with
    views; the winner (by CV, any kind) is a head folder that predicts what the study measured."""
    other = str(save_small_cnn(tmp_path / "other_cnn.keras", seed=8))  # other weights, other features
    data = run_study(tmp_path, backbones=f"{cnn},{other}", ensembles=True, views=2).data
    ensembles = [r for r in data.rows if r.kind == "ensemble"]
    assert len(ensembles) == 1 and ensembles[0].backbone == "small_cnn+other_cnn"
    assert data.views == 2 and data.winner.cv_accuracy == max(r.cv_accuracy for r in data.rows)
    head = load_head(tmp_path / "study" / "winner")
    assert head.meta["options"]["views"] == 2
    assert len(head_sources(head.meta)) == (2 if data.winner.kind == "ensemble" else 1)
    test = read_predictions(tmp_path / "study" / "winner" / PREDICTIONS_CSV)
    assert np.isclose(test.correct.mean(), data.winner.test_accuracy)


def test_study_json_of_another_version_reads_or_says_what_to_do(tmp_path: Path) -> None:
    row = StudyRow("b", "top", "layer", "logreg", 0.9, 0.88, [0.8, 0.93], 30, 1.2, 12.0, 9.0)
    data = StudyResults("/data", 60, {"x": 30, "y": 30}, 0, [row], row, 12.0).to_json()
    older = {k: v for k, v in data.items() if k not in ("test_size", "cv", "heads", "layers", "views")}
    older["rows"] = [{k: v for k, v in r.items() if k != "kind"} | {"from_the_future": 1} for r in older["rows"]]
    (tmp_path / "study.json").write_text(json.dumps(older))
    read = read_study(tmp_path)  # optional fields take their defaults, unknown keys are dropped
    assert read.rows == [row] and read.cv == 5 and read.winner == row
    (tmp_path / "study.json").write_text(json.dumps({**data, "rows": [{"backbone": "b"}]}))
    with pytest.raises(UserError, match="study.json is not a study.json this version reads.*cnncodes study"):
        read_study(tmp_path)
